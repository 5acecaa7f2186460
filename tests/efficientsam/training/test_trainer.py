"""FineTuner: what it trains, what it leaves alone, determinism, prompts that reach the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efficientsam.predictor import Predictor
from efficientsam.training import FineTuner, TrainingConfig, TrainingImage
from efficientsam.training import trainer as trainer_module
from efficientsam.training.data import LOW_RES_SIZE, low_res_target
from efficientsam.training.trainer import PROMPT_EMBEDDINGS

from .conftest import disc

QUICK = {"steps": 2, "batch_size": 2, "log_every": 1, "warmup_steps": 0}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_decoder_only_changes_decoder_and_prompt_embeddings_only(ti_model, random_images):
    before = _snapshot(ti_model)
    flags = {name: p.requires_grad for name, p in ti_model.named_parameters()}
    entries = []
    tuner = FineTuner(ti_model, TrainingConfig(**QUICK))
    report = tuner.fit(random_images, progress=entries.append)

    changed = tuner.changed_tensors()
    allowed = {key for key in before if key.startswith("mask_decoder.")} | set(PROMPT_EMBEDDINGS)
    assert changed and set(changed) <= allowed
    assert "mask_decoder.iou_prediction_head.fc.weight" in changed
    assert not any(key.startswith("image_encoder.") for key in changed)
    trained = tuner.model.state_dict()
    for key, value in changed.items():
        assert value.device.type == "cpu" and torch.equal(value, trained[key])
        assert not torch.equal(value, before[key])
    for key, value in trained.items():  # everything else is bit-identical
        if key not in changed:
            assert torch.equal(value, before[key]), key

    # the original model is untouched: values and requires_grad flags
    for key, value in ti_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {name: p.requires_grad for name, p in ti_model.named_parameters()} == flags

    assert tuner.model is not ti_model and not tuner.model.training
    assert not any(p.requires_grad for p in tuner.model.parameters())
    assert report.steps == 2 and len(report.history) == 2 and report.seconds > 0
    assert report.trainable_parameters == sum(ti_model.state_dict()[key].numel() for key in allowed)
    assert entries == report.history
    assert {"step", "steps", "epoch", "loss", "train_iou", "lr", "seconds"} <= set(entries[-1])
    assert entries[-1]["step"] == entries[-1]["steps"] == 2


def test_nothing_changed_before_fit(ti_model):
    assert FineTuner(ti_model, TrainingConfig()).changed_tensors() == {}


def test_same_seed_same_weights_other_seed_other_weights(ti_model, random_images):
    results = []
    for seed in (5, 5, 6):
        tuner = FineTuner(ti_model, TrainingConfig(**QUICK, seed=seed))
        tuner.fit(random_images)
        results.append(tuner.changed_tensors())
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(results[0][k], results[2][k]) for k in results[0])


def test_prompts_reaching_the_model_are_simulated_as_users_prompt(ti_model, monkeypatch):
    """One mask: every prompt's box/first clicks come from it, corrective clicks have the
    right sign (positive inside the mask, negative outside), never more than 6 tokens."""
    mask = disc(90, 120, 60, 40, 25)
    target = low_res_target(mask)
    images = [TrainingImage("one", torch.randn(1, 256, 64, 64), [mask])]
    seen = []
    original = trainer_module.prompt_tokens

    def recording(prompts, sizes, frame=1024):
        seen.extend(prompts)
        return original(prompts, sizes, frame)

    monkeypatch.setattr(trainer_module, "prompt_tokens", recording)
    config = TrainingConfig(steps=2, batch_size=4, corrective_rounds=6, warmup_steps=0)
    FineTuner(ti_model, config).fit(images)

    boxes = [p for p in seen if p.box is not None]
    clicks_only = [p for p in seen if p.box is None]
    assert boxes and clicks_only and any(len(p.points) > 3 for p in seen)
    for prompt in seen:
        assert prompt.num_tokens <= 6
    for prompt in boxes:  # noisy box around the disc (35..85 x 15..65), noise <= 20 px
        x0, y0, x1, y1 = prompt.box
        assert abs(x0 - 35) <= 20 and abs(y0 - 15) <= 20 and abs(x1 - 85) <= 20
    corrective = 0
    for prompt in seen:
        first = 0 if prompt.box is not None else 1
        x, y = prompt.points[0] if first else (0, 0)
        if first:
            assert prompt.labels[0] == 1 and mask[int(y), int(x)]
        for (x, y), label in zip(prompt.points[first:], prompt.labels[first:], strict=True):
            row, col = int(y * LOW_RES_SIZE / 90), int(x * LOW_RES_SIZE / 120)
            if label == 0 or not target[row, col]:  # later clicks are corrective ones
                corrective += 1
                assert target[row, col] == (label == 1)
    assert corrective > 0


def test_embeddings_from_the_predictor_train(ti_model):
    """Predictor.embed returns inference-mode tensors: training must still work on them."""
    image = np.random.default_rng(0).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    embedding = Predictor(ti_model).embed(image).embeddings
    assert embedding.is_inference()
    images = [TrainingImage("p", embedding, [disc(48, 64, 30, 20, 10)])]
    tuner = FineTuner(ti_model, TrainingConfig(steps=1, batch_size=1))
    assert tuner.fit(images).steps == 1
    assert tuner.changed_tensors()


@pytest.mark.parametrize("per_image", [1, 3])
def test_sampler_epochs_and_grouping(per_image):
    """Every mask is seen once per epoch (per_image 1); per_image 3: masks come in groups of
    one image."""
    samples = [
        trainer_module._Sample(image, np.ones((2, 2), bool), np.ones((2, 2), bool), (2, 2))
        for image, count in enumerate([3, 1, 2, 3])
        for _ in range(count)
    ]
    sampler = trainer_module._Sampler(samples, per_image, np.random.default_rng(0))
    if per_image == 1:
        epoch = sampler.draw(len(samples))
        assert sorted(map(id, epoch)) == sorted(map(id, samples))
        return
    runs = []
    for _ in range(10):
        batch = sampler.draw(4)
        assert len(batch) == 4
        run = [batch[0]]
        for sample in batch[1:]:
            if sample.image_index == run[-1].image_index:
                run.append(sample)
            else:
                runs.append(run)
                run = [sample]
        runs.append(run)
    for run in runs:  # an image's masks come together, distinct, at most 3
        assert len(run) <= 3 and len({id(s) for s in run}) == len(run)
    assert max(len(run) for run in runs) == 3


def test_fit_needs_masks(ti_model):
    empty = TrainingImage("e", torch.zeros(1, 256, 64, 64), [np.zeros((8, 8), bool)])
    with pytest.raises(ValueError, match="no non-empty masks"):
        FineTuner(ti_model, TrainingConfig()).fit([empty])


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"batch_size": 0},
        {"learning_rate": 0},
        {"box_probability": 2},
        {"lora_rank": -1},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        TrainingConfig(**bad)


@pytest.mark.slow
def test_lora_merges_into_the_encoder_weights(ti_model):
    """LoRA on the encoder's qkv/proj: the encoder runs on the image, the adapters are merged
    at the end (plain Linear modules, the original state-dict keys), the original untouched."""
    before = _snapshot(ti_model)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    images = [TrainingImage("l", torch.zeros(1, 256, 64, 64), [disc(64, 64, 30, 30, 12)], image)]
    tuner = FineTuner(ti_model, TrainingConfig(steps=1, batch_size=1, lora_rank=2))
    tuner.fit(images)
    changed = tuner.changed_tensors()
    assert set(tuner.model.state_dict()) == set(before)
    assert "image_encoder.blocks.0.attn.qkv.weight" in changed
    assert "image_encoder.blocks.11.attn.proj.weight" in changed
    assert "image_encoder.patch_embed.proj.weight" not in changed
    assert "image_encoder.blocks.0.attn.qkv.bias" not in changed
    assert type(tuner.model.image_encoder.blocks[0].attn.qkv) is torch.nn.Linear
    for key, value in ti_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a changed encoder has another fingerprint: the embedding cache never serves it old ones
    from efficientsam.predictor import Predictor

    base_fingerprint = Predictor(ti_model).encoder_fingerprint
    assert Predictor(tuner.model).encoder_fingerprint != base_fingerprint
    decoder_only = FineTuner(ti_model, TrainingConfig(steps=1, batch_size=1))
    decoder_only.fit(images)
    assert Predictor(decoder_only.model).encoder_fingerprint == base_fingerprint
    with pytest.raises(ValueError, match="needs TrainingImage.image"):
        FineTuner(ti_model, TrainingConfig(lora_rank=2)).fit(
            [TrainingImage("n", torch.zeros(1, 256, 64, 64), [disc(64, 64, 30, 30, 12)])]
        )
