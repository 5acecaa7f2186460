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


def test_default_precision_is_resolved_at_load_and_published(tmp_path):
    """PRECISION's default "auto" becomes a real precision: the hardware's fast mode when its
    start-up check passes, else float32; every predictor and the published base description
    use it, with the reason."""
    from efficientsam.precision import native_fast_precision

    settings = Settings.from_env({}, checkpoint=TI_CHECKPOINT, model_dir=tmp_path)
    assert settings.precision == "auto"
    runtime = ModelRuntime(settings)
    served = runtime.load()
    assert runtime.precision in ("float32", "bfloat16", "float16")
    assert served.predictor.precision == runtime.precision
    described = runtime.registry._base_description
    assert described["precision"] == runtime.precision and described["precision_reason"]
    if native_fast_precision(served.predictor.model.device) is None:
        assert runtime.precision == "float32" and described["precision_check"] is None
    else:
        check = described["precision_check"]
        assert runtime.precision == (check["precision"] if check["passed"] else "float32")
