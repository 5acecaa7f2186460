"""benchmarks/bench_gpu.py runs on a CPU (--quick) and writes every figure, or why it was
skipped, with sane values, plus the README table beside the JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_gpu.py"
FIGURES = ("encoder", "click", "everything", "finetune", "sami", "queue_hop")
VARIANTS = ("ti", "s")


def run_bench(out, *options: str, timeout: float) -> dict:
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), *options]
    finished = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads(out.read_text())


def measured(entry: dict) -> dict:
    assert "error" not in entry and "skipped" not in entry, entry
    return entry


@pytest.mark.slow
def test_quick_cpu_run_measures_every_figure(tmp_path, redis_url, redis_connection):
    out = tmp_path / "gpu.json"
    results = run_bench(
        out,
        *("--quick", "--threads", "1", "--budget", "3000", "--redis-url", redis_url),
        timeout=3600,
    )
    figures = results["figures"]
    assert set(figures) == set(FIGURES)
    assert results["quick"] and results["weights"].startswith("random weights: speed only")
    for name in FIGURES:
        figure = measured(figures[name])
        assert figure["device"].startswith("CPU") and figure["torch"] == results["machine"]["torch"]
        assert name in results["notes"]

    for variant in VARIANTS:
        rows = figures["encoder"][variant]
        for precision in ("float32", "bfloat16"):
            row = measured(rows[precision])
            for batch in (1, 2):
                entry = row[f"batch_{batch}"]
                assert entry["batch"] == batch and entry["repeats"] == 1
                assert entry["images_per_s"] > 0 and entry["median_ms"] > 0
        iou = rows["bfloat16"]["best_mask_iou_vs_float32"]
        assert 0 <= iou["min"] <= iou["mean"] <= 1 and iou["prompts"] == 12
        assert "not a CPU configuration" in rows["float16"]["skipped"]

        for precision in ("float32", "bfloat16"):
            click = measured(figures["click"][variant][precision])
            assert click["repeats"] == 3 and click["dtype"] == precision
            # the decoder runs inside each timed job
            assert 0 < click["decoder_median_ms"] <= click["median_ms"] <= click["p95_ms"]
        assert "skipped" in figures["click"][variant]["float16"]

        everything = measured(figures["everything"][variant])
        assert everything["queries"] == 64 and everything["queries_per_decoder_call"] == 4
        assert everything["seconds_per_image"] > 0 and everything["masks_kept"] >= 0

    finetune = figures["finetune"]["ti"]
    assert finetune["batch"] == 4 and finetune["repeats"] == 2
    assert finetune["steps_per_s"] > 0 and finetune["trainable_parameters"] > 0

    sami = figures["sami"]
    assert sami["decoder"] == {"depth": 2, "width": 256, "heads": 8}  # --quick: a small one
    assert sami["sami"]["batch"] == 2 and sami["align"]["batch"] == 1
    assert sami["sami"]["images_per_s"] > 0 and sami["align"]["images_per_s"] > 0
    assert sami["teacher_images_per_s"] > 0 and sami["minutes_per_1000_images"] > 0

    hop = figures["queue_hop"]["ti"]
    assert hop["clicks_counted"] == 18
    assert hop["through_rq_median_ms"] > hop["hop_overhead_median_ms"] > 0

    table = out.with_suffix(".md").read_text()
    ti_images = figures["encoder"]["ti"]["float32"]["batch_1"]["images_per_s"]
    assert f"| encoder images/s, batch 1, float32 | {ti_images:g} |" in table
    assert f"{hop['hop_overhead_median_ms']:.1f} ms" in table
    assert "segment everything 8x8" in table and "steps/s" in table
    assert (
        f"| SAMI masked pretraining, S teacher -> Ti student | {sami['sami']['images_per_s']:.2f}"
        in (table)
    )


def test_a_spent_budget_skips_every_figure_with_the_reason(tmp_path):
    out = tmp_path / "gpu.json"
    results = run_bench(out, "--quick", "--variants", "ti", "--budget", "0", timeout=300)
    for name in FIGURES:
        reason = results["figures"][name]["skipped"]
        assert reason == f"skipped: time budget of 0 s spent before {name}"
    table = out.with_suffix(".md").read_text()
    assert "| encoder images/s, batch 1, float32 | skipped |" in table
    assert "- queue_hop: skipped: time budget of 0 s spent before queue_hop" in table


def test_no_redis_skips_the_queue_hop_and_the_run_succeeds(tmp_path):
    out = tmp_path / "gpu.json"
    unreachable = "redis://:secret@127.0.0.1:1/0"
    options = ("--quick", "--variants", "ti", "--only", "queue_hop", "--redis-url", unreachable)
    results = run_bench(out, *options, timeout=300)
    assert (
        results["figures"]["queue_hop"]["skipped"] == "skipped: no Redis at redis://127.0.0.1:1/0"
    )
    assert results["figures"]["encoder"] == {"skipped": "skipped: not in --only"}
    assert "| queue hop (click job through RQ minus the job), median | skipped |" in (
        out.with_suffix(".md").read_text()
    )
