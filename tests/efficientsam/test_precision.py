"""The encoder's fast mode (bfloat16 blocks, float32 decoder) and how "auto" picks a precision."""

import json
import logging

import numpy as np
import pytest
import torch

from efficientsam.arrays import mask_iou
from efficientsam.precision import (
    MIN_MEAN_IOU,
    MIN_SPEEDUP,
    PrecisionCheck,
    builtin_check_image,
    check_fast_precision,
    check_prompts,
    choose_precision,
    cpu_flags,
    native_fast_precision,
)
from efficientsam.predictor import ImageEmbedding, Predictor
from efficientsam.prompts import Prompt
from efficientsam.utils import image_to_tensor
from tests.conftest import REFERENCE_DIR


def fixture_prompts() -> list[Prompt]:
    """The reference fixtures' queries as prompts (box corners -> box, padding dropped)."""
    manifest = json.loads((REFERENCE_DIR / "manifest.json").read_text())
    prompts = []
    for case in manifest["cases"]:
        for points, labels in zip(case["points_xy_pixels"][0], case["labels"][0], strict=True):
            kept = [(p, lab) for p, lab in zip(points, labels, strict=True) if lab != -1]
            corners = [p for p, lab in kept if lab in (2, 3)]
            clicks = [(p, lab) for p, lab in kept if lab in (0, 1)]
            box = [*corners[0], *corners[1]] if corners else None
            prompts.append(
                Prompt.create(
                    [p for p, _ in clicks] or None, [lab for _, lab in clicks] or None, box
                )
            )
    return prompts


@pytest.mark.slow
def test_bfloat16_masks_match_float32_on_fixture_and_builtin_prompts(ti_model, reference_image):
    fast, exact = Predictor(ti_model, precision="bfloat16"), Predictor(ti_model)
    embedding = fast.set_image(reference_image)
    assert embedding.key.preprocessing.endswith("bfloat16-blocks")  # never float32's entries
    assert embedding.embeddings.dtype == torch.float32
    exact.set_image(reference_image)
    prompts = fixture_prompts() + check_prompts(reference_image.shape[:2])
    assert len(prompts) >= 24
    ious = [
        mask_iou(a.best_mask, b.best_mask)
        for a, b in zip(fast.predict_prompts(prompts), exact.predict_prompts(prompts), strict=True)
    ]
    assert np.mean(ious) >= MIN_MEAN_IOU, ious
    assert min(ious) >= 0.97, ious


def test_fast_mode_decodes_in_float32(ti_model, reference_embeddings):
    """The same embedding gives the same masks in every precision: only the encoder changes."""
    exact, fast = Predictor(ti_model), Predictor(ti_model, precision="bfloat16")
    key = exact.embedding_key("same")
    shared = ImageEmbedding(reference_embeddings, (480, 640), key, True, 0.0)
    prompts = check_prompts((480, 640))[:4]
    for a, b in zip(exact.decode(shared, prompts), fast.decode(shared, prompts), strict=True):
        np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_patch_embedding_stays_float32_in_the_fast_mode(ti_model, reference_image):
    seen = {}

    def record(module, args, output):
        seen[module] = output.dtype

    encoder = ti_model.image_encoder
    handles = [
        encoder.patch_embed.register_forward_hook(record),
        encoder.blocks[0].mlp.fc1.register_forward_hook(record),
    ]
    try:
        with torch.inference_mode():
            out = ti_model.get_image_embeddings(image_to_tensor(reference_image), torch.bfloat16)
    finally:
        for handle in handles:
            handle.remove()
    assert seen[encoder.patch_embed] == torch.float32
    assert seen[encoder.blocks[0].mlp.fc1] == torch.bfloat16  # the blocks' matmuls are fast
    assert out.dtype == torch.float32 and out.shape == (1, 256, 64, 64)


def test_native_fast_precision_by_cpu_flags(tmp_path):
    cpu = torch.device("cpu")
    assert native_fast_precision(cpu, {"avx512f", "amx_bf16", "amx_tile"}) == "bfloat16"
    # AVX-512 BF16 alone: torch's bfloat16 attention is no faster there, so no fast mode
    assert native_fast_precision(cpu, {"avx512f", "avx512_bf16"}) is None
    assert native_fast_precision(cpu, set()) is None
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_bf16\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_check_verdict_needs_both_quality_and_speed():
    good = PrecisionCheck("bfloat16", 0.995, 0.99, 20, 1.0, 0.45)
    assert good.passed and good.speedup == pytest.approx(1 / 0.45)
    assert not PrecisionCheck("bfloat16", 0.985, 0.98, 20, 1.0, 0.45).passed  # masks differ
    assert not PrecisionCheck("bfloat16", 0.999, 0.99, 20, 1.0, 0.95).passed  # not faster
    assert "0.9850 mean" in PrecisionCheck("bfloat16", 0.985, 0.98, 20, 1.0, 0.45).describe()
    assert good.as_dict()["passed"] is True
    assert MIN_SPEEDUP > 1


def test_builtin_image_is_deterministic_with_objects():
    first, second = builtin_check_image(), builtin_check_image()
    np.testing.assert_array_equal(first, second)
    assert first.shape == (480, 640, 3) and first.dtype == np.uint8
    assert len(np.unique(first.reshape(-1, 3)[::97], axis=0)) > 50  # not a flat picture


@pytest.mark.slow
def test_auto_follows_the_start_up_check(ti_model, monkeypatch, caplog):
    """With AMX flags the real check runs (bfloat16 computes on any CPU, only slower) and the
    choice is whatever it measured; without, float32 at once, logged with the reason."""
    import efficientsam.precision as precision

    caplog.set_level(logging.INFO, logger="efficientsam.precision")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    choice = choose_precision(ti_model, "auto")
    assert choice.check is not None and choice.check.prompts == len(check_prompts())
    assert choice.check.mean_iou >= MIN_MEAN_IOU  # the quality half holds on any CPU
    assert choice.precision == ("bfloat16" if choice.check.passed else "float32")
    assert ("passed" if choice.check.passed else "failed") in choice.reason
    assert f"precision auto -> {choice.precision}" in caplog.text
    assert check_fast_precision(ti_model, "bfloat16") is choice.check  # measured once

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    choice = choose_precision(ti_model, "auto")
    assert choice.precision == "float32" and choice.check is None
    assert "no native" in choice.reason
    assert choose_precision(ti_model, "bfloat16").precision == "bfloat16"  # as set
    with pytest.raises(ValueError, match="precision"):
        choose_precision(ti_model, "int8")
