"""SAMI distillation: masked encoder path, decoder, metrics, training, saved model, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.random_weights import random_state_dict
from benchmarks.synthetic import make_dataset
from efficientsam import build_efficient_sam, load_model, save_checkpoint
from efficientsam.checkpoint import read_checkpoint_metadata
from efficientsam.cli import main
from efficientsam.training.sami import (
    SamiConfig,
    SamiDecoder,
    SamiDistiller,
    agreement_prompts,
    embedding_metrics,
    encode_visible,
    held_out_metrics,
    random_token_split,
    teacher_embeddings,
)


@pytest.fixture(scope="module")
def s_teacher():
    """EfficientSAM-S with random weights of the right shapes (real weights are not available)."""
    model = build_efficient_sam("s")
    model.load_state_dict(random_state_dict(model, seed=5678))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [sample.image for sample in make_dataset(2, seed=3, prefix="sami")]


@pytest.fixture(scope="module")
def targets(s_teacher, images) -> list[torch.Tensor]:
    return teacher_embeddings(s_teacher, images)


def test_config_rejects_bad_values():
    for bad in ({"mask_ratio": 1.0}, {"batch_size": 0}, {"decoder_width": 250}, {"steps": -1}):
        with pytest.raises(ValueError):
            SamiConfig(**bad)


def test_token_split_is_a_partition_with_equal_counts():
    visible, masked = random_token_split(3, 4096, 0.75, torch.Generator().manual_seed(1))
    assert visible.shape == (3, 1024) and masked.shape == (3, 3072)
    for row in range(3):
        together = torch.cat([visible[row], masked[row]]).sort().values
        assert torch.equal(together, torch.arange(4096))
    assert not torch.equal(visible[0], visible[1])  # a different mask per image


def test_visible_path_with_every_token_is_the_encoder(ti_model):
    encoder = ti_model.image_encoder
    images = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    everything = torch.arange(4096)[None]
    with torch.no_grad():
        tokens = encode_visible(encoder, images, everything)
        grid = tokens.reshape(1, 64, 64, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(encoder.neck(grid), encoder(images), atol=1e-4, rtol=1e-4)


def test_decoder_keeps_visible_tokens_as_anchors():
    torch.manual_seed(0)
    decoder = SamiDecoder(encoder_dim=32, width=64, depth=2, heads=4, grid=8).eval()
    visible, masked = random_token_split(2, 64, 0.75, torch.Generator().manual_seed(2))
    features = torch.randn(2, visible.shape[1], 32)
    with torch.no_grad():
        first = decoder(features, visible, masked)
        decoder.mask_token.add_(1.0)
        second = decoder(features, visible, masked)
    assert first.shape == (2, 64, 256)
    rows = torch.arange(2)[:, None]
    # Visible outputs depend only on their own encoder output; masked ones on the mask token.
    torch.testing.assert_close(first[rows, visible], second[rows, visible])
    assert not torch.allclose(first[rows, masked], second[rows, masked])


def test_embedding_metrics_of_the_teacher_and_of_its_mean():
    teacher = torch.randn(3, 256, 64, 64, generator=torch.Generator().manual_seed(4)) + 2.0
    same = embedding_metrics(teacher, teacher)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["centred_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["nmse"] == pytest.approx(0.0, abs=1e-6)
    mean = teacher.mean(dim=(0, 2, 3), keepdim=True).expand_as(teacher)
    constant = embedding_metrics(mean, teacher)
    assert constant["cosine"] > 0.5  # why the centred cosine is reported too
    assert constant["centred_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert constant["nmse"] == pytest.approx(1.0, rel=1e-3)


def test_agreement_prompts_are_deterministic_and_inside_the_image():
    points, boxes = agreement_prompts((120, 200), seed=3)
    again, again_boxes = agreement_prompts((120, 200), seed=3)
    assert np.array_equal(points, again) and np.array_equal(boxes, again_boxes)
    assert points.shape == (3, 2) and boxes.shape == (2, 4)
    assert (points >= 0).all() and (points[:, 0] <= 200).all() and (points[:, 1] <= 120).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 2] <= 200).all()
    assert (boxes[:, 3] > boxes[:, 1]).all() and (boxes[:, 3] <= 120).all()


def test_held_out_metrics_of_the_teacher_itself_are_perfect(ti_model, images):
    cache: dict[str, torch.Tensor] = {}
    targets = teacher_embeddings(ti_model, images[:1], cache)
    assert teacher_embeddings(ti_model, images[:1], cache)[0] is targets[0]  # computed once
    metrics = held_out_metrics(ti_model.image_encoder, ti_model, images[:1], targets, seed=2)
    assert metrics["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["nmse"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["mask_agreement"] == pytest.approx(1.0)
    noisy = held_out_metrics(
        ti_model.image_encoder, ti_model, images[:1], [targets[0] * -1.0], seed=2
    )
    assert noisy["mask_agreement"] < 0.9 and noisy["cosine"] < 0


@pytest.mark.slow
def test_sami_steps_lower_the_masked_token_mse(ti_model, images, targets):
    before_weights = {k: v.clone() for k, v in ti_model.image_encoder.state_dict().items()}
    config = SamiConfig(steps=3, batch_size=1, warmup_steps=0, align_steps=0, seed=1)
    distiller = SamiDistiller(ti_model, config)
    batch = distiller._batch(images, [0, 1])
    stacked = torch.cat(targets)

    def masked_mse() -> float:
        with torch.no_grad():
            return float(distiller.masked_loss(batch, stacked, torch.Generator().manual_seed(9)))

    initial = masked_mse()
    report = distiller.fit(images, targets)
    assert [entry["stage"] for entry in report.history] == ["sami"] * 3
    assert masked_mse() < 0.8 * initial
    # The neck is not trained by masked pretraining; the given model is never modified.
    for key, value in ti_model.image_encoder.state_dict().items():
        assert torch.equal(value, before_weights[key]), key
    assert torch.equal(distiller.encoder.neck[0].weight, ti_model.image_encoder.neck[0].weight)
    assert not torch.equal(
        distiller.encoder.blocks[0].attn.qkv.weight,
        ti_model.image_encoder.blocks[0].attn.qkv.weight,
    )


def test_result_model_loads_as_ti_with_the_teachers_decoder(tmp_path, ti_model, s_teacher):
    distiller = SamiDistiller(ti_model, SamiConfig(steps=0, align_steps=0))
    model = distiller.result_model(s_teacher)
    path = save_checkpoint(model, tmp_path / "sami.safetensors", {"teacher": "s.pt"})
    loaded = load_model(path)
    assert loaded.variant == "ti"
    state = loaded.state_dict()
    for prefix, source in (
        ("mask_decoder.", s_teacher),
        ("prompt_encoder.", s_teacher),
        ("image_encoder.", ti_model),
    ):
        reference = {k: v for k, v in source.state_dict().items() if k.startswith(prefix)}
        assert reference
        for key, value in reference.items():
            assert torch.equal(state[key], value), key
    assert read_checkpoint_metadata(path)["teacher"] == "s.pt"


@pytest.mark.slow
def test_cli_distils_and_prints_the_metrics(tmp_path, ti_checkpoint, s_teacher, capsys):
    """The acceptance command: a few steps on a handful of small synthetic images; the model
    loads as Ti with the teacher's decoder, and the held-out images (not trained on) agree with
    the teacher more than the student at init did."""
    folder, held_out = tmp_path / "images", tmp_path / "held-out"
    folder.mkdir()
    held_out.mkdir()
    for index, sample in enumerate(make_dataset(5, seed=5, prefix="cli")):
        target = folder if index < 3 else held_out
        Image.fromarray(sample.image).save(target / f"{sample.image_id}.png")
    teacher_path = tmp_path / "teacher_s.pt"
    torch.save({"model": s_teacher.state_dict()}, teacher_path)
    out = tmp_path / "out" / "ti_sami.safetensors"
    status = main(
        ["sami", "--teacher", str(teacher_path), "--student", str(ti_checkpoint)]
        + ["--images", str(folder), "--held-out", str(held_out), "--steps", "2"]
        + ["--align-steps", "2"]
        + ["--batch-size", "1", "--seed", "3", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert status == 0
    for row in ("per-token cosine", "centred cosine", "normalised MSE", "mask agreement"):
        assert row in printed
    model = load_model(out)
    assert model.variant == "ti"
    for key, value in s_teacher.mask_decoder.state_dict().items():
        assert torch.equal(model.mask_decoder.state_dict()[key], value), key
    metadata = read_checkpoint_metadata(out)
    assert metadata["teacher"] == str(teacher_path)
    assert metadata["student_init"] == str(ti_checkpoint)
    assert metadata["steps"] == 2 and metadata["align_steps"] == 2
    before, after = metadata["metrics_before"], metadata["metrics_after"]
    assert set(after) == {"cosine", "centred_cosine", "nmse", "mask_agreement"}
    assert after["mask_agreement"] > before["mask_agreement"], (before, after)
    assert after["nmse"] < before["nmse"] and after["cosine"] > before["cosine"]


def test_cli_rejects_a_folder_without_images(tmp_path, ti_checkpoint, capsys):
    status = main(
        ["sami", "--teacher", str(ti_checkpoint), "--student", str(ti_checkpoint)]
        + ["--images", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "x.safetensors")]
    )
    assert status == 2
    assert "no .png/.jpg images" in capsys.readouterr().err
