"""benchmarks/bench_finetune.py runs end to end with tiny settings and writes its JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_finetune


@pytest.mark.slow
def test_tiny_benchmark_run(tmp_path, ti_checkpoint, capsys):
    out = tmp_path / "finetune.json"
    argv = ["--checkpoint", str(ti_checkpoint), "--train", "2", "--held-out", "1"]
    argv += ["--steps", "2", "--objects", "1,2", "--log-every", "1", "--json", str(out)]
    argv += [
        "--set",
        "warmup_steps=0",
        "--set",
        "grad_clip_norm=none",
        "--set",
        "learning_rate=2e-4",
    ]
    threads = bench_finetune.torch.get_num_threads()
    try:
        result = bench_finetune.main(argv)
    finally:
        bench_finetune.torch.set_num_threads(threads)  # the script sets its own thread count
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["training"]["steps"] == 2 and len(result["training"]["history"]) == 2
    for side in ("base", "fine_tuned"):
        assert set(result["held_out"][side]) == {"one_click_miou", "box_miou", "three_click_miou"}
    assert 0 < result["held_out"]["box_fill_baseline"] <= 1
    assert result["memory"]["peak_rss_mib"] > 0
    assert result["config"]["warmup_steps"] == 0 and result["config"]["grad_clip_norm"] is None
    assert result["config"]["learning_rate"] == 2e-4  # --set wins over the script's own flags
    assert "| box-fill baseline |" in capsys.readouterr().out


def test_set_rejects_an_unknown_field():
    overrides = bench_finetune.config_overrides(
        ["iou_on_all_candidates=false", "learning_rate=1e-4"]
    )
    assert overrides == {"iou_on_all_candidates": False, "learning_rate": 1e-4}
    with pytest.raises(SystemExit, match="no field 'learnig_rate'"):
        bench_finetune.config_overrides(["learnig_rate=1"])
