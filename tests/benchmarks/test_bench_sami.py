"""benchmarks/bench_sami.py runs every recipe end to end with --quick and writes its JSON."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench_sami

TRAINED = {
    "init": (),
    "sami_only": ("sami",),
    "align_only": ("align",),
    "sami_then_align": ("sami", "align"),
}


@pytest.mark.slow
def test_quick_run_has_every_recipe_and_metric(tmp_path, capsys):
    out, table = tmp_path / "sami.json", tmp_path / "sami.md"
    threads = bench_sami.torch.get_num_threads()
    try:
        result = bench_sami.main(["--quick", "--json", str(out), "--markdown", str(table)])
    finally:
        bench_sami.torch.set_num_threads(threads)  # the script sets its own thread count
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    recipes = result["recipes"]
    assert set(recipes) == {*TRAINED, "teacher_mean"}
    for name, row in recipes.items():
        assert set(row["metrics"]) == {"cosine", "centred_cosine", "nmse", "mask_agreement"}
        assert all(math.isfinite(value) for value in row["metrics"].values()), name
    for name, trained in TRAINED.items():
        row = recipes[name]
        for stage in ("sami", "align"):
            figures = row["stages"][stage]
            if stage in trained:
                assert figures["steps"] >= 1 and figures["seconds_per_step"] > 0, (name, stage)
                assert row["calibration"][stage]["seconds_per_step"] > 0
                assert math.isfinite(figures["final_loss"])
            else:
                assert figures["steps"] == 0 and figures["seconds_per_step"] == 0, (name, stage)
        assert row["peak_rss_mib"] >= row["peak_rss_training_mib"] > 0
        assert row["encoder_seconds"]["student"] > 0 and row["encoder_seconds"]["teacher"] > 0
    assert recipes["init"]["history"] == [] and recipes["init"]["calibration"] == {}
    # a constant embedding has nothing left once each side's mean is removed
    assert abs(recipes["teacher_mean"]["metrics"]["centred_cosine"]) < 1e-3
    assert result["config_overrides"] == {"batch_size": 1}
    assert table.read_text() == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| sami_then_align |" in table.read_text()


def test_set_overrides_sami_config_fields_but_not_the_planned_ones():
    settings = bench_sami.settings_of(
        bench_sami.parse_args(["--set", "learning_rate=2e-3", "--set", "betas=0.9,0.99"])
    )
    assert settings.overrides == {"learning_rate": 2e-3, "betas": (0.9, 0.99)}
    assert settings.budget_seconds == 360 and settings.train == 24
    for assignment in ("steps=3", "align_steps=1"):
        with pytest.raises(SystemExit, match="planned by the benchmark"):
            bench_sami.settings_of(bench_sami.parse_args(["--set", assignment]))
    with pytest.raises(SystemExit, match="SamiConfig has no field 'decoder_dpth'"):
        bench_sami.settings_of(bench_sami.parse_args(["--set", "decoder_dpth=4"]))
    with pytest.raises(SystemExit, match="betas takes 2 values"):
        bench_sami.settings_of(bench_sami.parse_args(["--set", "betas=0.9"]))
