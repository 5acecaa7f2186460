"""The benchmark runs end to end (short settings) and measures what it claims to."""

from __future__ import annotations

import json

import pytest

from efficientsam.cli import main


@pytest.mark.slow
def test_short_benchmark_run(tmp_path, ti_checkpoint, capsys):
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    code = main(
        [
            "bench",
            "--variants",
            "ti",
            "--repeats",
            "1",
            "--click-repeats",
            "3",
            "--checkpoint",
            str(ti_checkpoint),
            "--json",
            str(out),
            "--markdown",
            str(table),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    ti = results["per_variant"]["ti"]
    # Same maths in both attention forms and in both decoders.
    assert ti["encoder_max_abs_diff_vs_explicit"] < 1e-4
    assert ti["click_mask_iou_vs_reference_style"] >= 0.999
    # The explicit baseline materialises the attention matrices: it must use more memory.
    assert ti["peak_rss_gib"] < ti["peak_rss_reference_style_gib"]
    assert ti["encoder_ms"] > 0 and ti["click_ms"] > 0
    fast = ti["fast_mode_bfloat16"]
    assert 0.99 <= fast["best_mask_iou_vs_float32_mean"] <= 1.0 and fast["iou_prompts"] == 40
    assert fast["first_click_ms"] > fast["encoder_ms"] > 0
    assert "passes PRECISION=auto's check" in table.read_text()
    assert "| encoder speed-up |" in table.read_text()
    assert "EfficientSAM-TI" in capsys.readouterr().out
