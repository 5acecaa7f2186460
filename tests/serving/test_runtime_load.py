"""The base checkpoint is read once, and a load that failed is retried from the same tensors."""

from __future__ import annotations

import pytest

import efficientsam.checkpoint
from serving.runtime import ModelRuntime
from serving.settings import Settings
from tests.conftest import TI_CHECKPOINT


def test_a_failed_load_is_retried_with_the_same_error_and_no_second_read(monkeypatch, tmp_path):
    reads = []
    real = efficientsam.checkpoint.load_state_dict_file

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(efficientsam.checkpoint, "load_state_dict_file", counting)
    # a CUDA device on a machine without one: the checkpoint is fine, building the model fails
    settings = Settings.from_env({}, checkpoint=TI_CHECKPOINT, device="cuda", model_dir=tmp_path)
    runtime = ModelRuntime(settings)
    errors = []
    for _ in range(2):
        with pytest.raises((RuntimeError, AssertionError)) as failure:
            runtime.load()
        errors.append(type(failure.value))
    assert errors[0] is errors[1] and runtime.base is None
    assert reads == [TI_CHECKPOINT]
    assert runtime.base_version.startswith("efficientsam-ti-")
