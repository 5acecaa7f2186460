"""Checkpoint files: reading state dicts (.pt, .pt.zip as shipped, .safetensors), strict
loading into a model, saving with metadata, and tensor fingerprints.

Checkpoints are never unpickled beyond plain tensors and containers (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_METADATA_VARIANT = "efficientsam_variant"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def _torch_load(source: str | Path | io.BytesIO, name: str) -> object:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        text = " ".join(str(error).split())
        blocked = re.search(r"unsupported GLOBAL ([\w.]+)", text, flags=re.IGNORECASE)
        if blocked:
            raise CheckpointError(
                f"{name}: refusing to load: the file pickles a Python object "
                f"({blocked.group(1)}), not just tensors"
            ) from error
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        reason = detail.group(1).strip() if detail else (text[:200] or type(error).__name__)
        raise CheckpointError(
            f"{name}: not a readable PyTorch checkpoint (truncated, corrupt or another kind of "
            f"file): {reason}"
        ) from error


def _read_zip_member(path: Path) -> io.BytesIO | None:
    """If ``path`` is a zip archive that holds a checkpoint file (the shipped
    ``efficient_sam_vits.pt.zip``) rather than being a torch.save archive itself, return that
    member's bytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(name.endswith("data.pkl") for name in names):
                return None  # a torch.save file (itself a zip archive)
            members = [n for n in names if n.endswith((".pt", ".pth")) and not n.endswith("/")]
            if len(members) != 1:
                raise CheckpointError(
                    f"{path}: zip archive should hold exactly one .pt/.pth checkpoint, "
                    f"found {members or names[:5]}"
                )
            return io.BytesIO(archive.read(members[0]))
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path}: corrupt zip archive: {error}") from error


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as handle:
        header = handle.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(header) == 9 and header[8:9] == b"{"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors without building a model.

    Accepts ``torch.save({"model": state_dict})`` (the official format), a bare state dict, a
    zip archive holding such a ``.pt`` (as EfficientSAM-S is shipped) and ``.safetensors``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error
    source: str | io.BytesIO = str(path)
    if zipfile.is_zipfile(path):
        member = _read_zip_member(path)
        if member is not None:
            source = member
    loaded = _torch_load(source, str(path))
    if isinstance(loaded, Mapping) and "model" in loaded and isinstance(loaded["model"], Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise CheckpointError(
            f"{path}: expected {{'model': state_dict}} or a state dict of tensors, "
            f"got {type(loaded).__name__}"
        )
    return dict(loaded)


def _describe_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with errors that name the offending keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_describe_keys(mismatched)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Save the model's persistent tensors as ``.safetensors`` (or the official ``.pt`` format
    when ``path`` ends in ``.pt``). ``metadata`` values are stored as JSON strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {
        key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()
    }
    if path.suffix in (".pt", ".pth"):
        torch.save({"model": state_dict}, path)
        return path
    from safetensors.torch import save_file

    header = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    variant = getattr(model, "variant", None)
    if variant:
        header[SAFETENSORS_METADATA_VARIANT] = variant
    save_file(state_dict, str(path), metadata=header)
    return path


def read_checkpoint_metadata(path: str | Path) -> dict[str, object]:
    """The JSON metadata stored by :func:`save_checkpoint` in a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    metadata: dict[str, object] = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return metadata


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """A hex digest of tensor names, shapes, dtypes and values (order-independent)."""
    digest = hashlib.blake2b(digest_size=length)
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
