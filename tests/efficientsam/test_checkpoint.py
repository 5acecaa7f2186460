"""Checkpoint formats, strict loading and clear errors."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from efficientsam import CheckpointError, load_model, save_checkpoint
from efficientsam.checkpoint import (
    load_state_dict_file,
    read_checkpoint_metadata,
    tensors_fingerprint,
)


@pytest.fixture(scope="module")
def ti_state(ti_checkpoint):
    return load_state_dict_file(ti_checkpoint)


def _same_weights(model, state):
    return all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_official_format_loads_strictly(ti_checkpoint, ti_state):
    assert len(ti_state) == 278
    model = load_model(ti_checkpoint)
    assert model.variant == "ti" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert "pixel_mean" not in model.state_dict()  # non-persistent, as in the official files
    assert _same_weights(model, ti_state)


def test_shipped_zip_is_read_without_unzipping(tmp_path, ti_checkpoint, ti_state):
    archive = tmp_path / "efficient_sam_vitt.pt.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(ti_checkpoint, "weights/efficient_sam_vitt.pt")
    assert _same_weights(load_model(archive), ti_state)


def test_safetensors_and_bare_state_dict(tmp_path, ti_model, ti_state):
    path = save_checkpoint(ti_model, tmp_path / "model.safetensors", {"parent": "base", "n": 3})
    assert _same_weights(load_model(path), ti_state)
    assert read_checkpoint_metadata(path) == {
        "parent": "base",
        "n": 3,
        "efficientsam_variant": "ti",
    }
    bare = tmp_path / "bare.pt"
    torch.save(ti_state, bare)
    assert _same_weights(load_model(bare), ti_state)


def test_missing_and_unexpected_keys_are_named(tmp_path, ti_state):
    state = dict(ti_state)
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.norm.weight"] = torch.ones(192)
    path = tmp_path / "bad.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert "missing keys: mask_decoder.iou_token.weight" in str(error.value)
    assert "unexpected keys: image_encoder.norm.weight" in str(error.value)


def test_shape_mismatch_is_named(tmp_path, ti_state):
    state = dict(ti_state)
    state["mask_decoder.mask_tokens.weight"] = torch.zeros(5, 256)
    path = tmp_path / "bad.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"mask_decoder.mask_tokens.weight \(5, 256\)"):
        load_model(path)


def test_unknown_width_is_rejected(tmp_path, ti_state):
    state = dict(ti_state)
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    path = tmp_path / "vitb.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="unknown EfficientSAM variant: encoder width 768"):
        load_model(path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.999])
def test_truncated_file_gives_a_clear_error(tmp_path, ti_checkpoint, keep_fraction):
    data = ti_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pt")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_arbitrary_pickles_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load.*makedirs"):
        load_model(path)
    assert not marker.exists()
    # Same for a plain pickle file (no zip container).
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError):
        load_model(plain)
    assert not marker.exists()


def test_fingerprint_changes_with_values(ti_state):
    first = tensors_fingerprint(ti_state)
    changed = dict(ti_state)
    changed["mask_decoder.iou_token.weight"] = ti_state["mask_decoder.iou_token.weight"] + 1e-6
    assert tensors_fingerprint(ti_state) == first
    assert tensors_fingerprint(changed) != first
