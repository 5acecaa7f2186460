"""The efficientsam command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from efficientsam import cli
from efficientsam.cli import main
from tests.conftest import REFERENCE_DIR

IMAGE = REFERENCE_DIR / "image_640x480.png"


@pytest.mark.slow
def test_predict_writes_mask_and_overlay(tmp_path, ti_checkpoint):
    out = tmp_path / "masks" / "mask.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "efficientsam",
            "predict",
            str(IMAGE),
            "--checkpoint",
            str(ti_checkpoint),
            "--point",
            "210,180",
            "--point",
            "470,310,neg",
            "--box",
            "150,100,300,260",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "score (predicted IoU):" in result.stdout and "decoder" in result.stdout
    with Image.open(out) as mask:
        assert mask.size == (640, 480) and mask.mode == "L"
        values = set(np.unique(np.asarray(mask)).tolist())
    assert values <= {0, 255} and values != {0}
    with Image.open(out.with_name("mask_overlay.png")) as overlay:
        assert overlay.size == (640, 480) and overlay.mode == "RGB"


def test_exif_rotated_image_gives_a_mask_of_the_displayed_size(tmp_path, ti_checkpoint):
    stored = Image.open(IMAGE).convert("RGB").resize((64, 48))  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    out = tmp_path / "mask.png"
    code = main(
        [
            "predict",
            str(path),
            "--checkpoint",
            str(ti_checkpoint),
            "--point",
            "10,40",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    with Image.open(out) as mask:
        assert mask.size == (48, 64)  # displayed portrait: width 48, height 64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", str(IMAGE), "--checkpoint", "x.pt", "--out", "m.png"], "--point or a --box"),
        (["predict", str(IMAGE), "--point", "1,2", "--out", "m.png"], "--checkpoint"),
        (["predict", str(IMAGE), "--checkpoint", "x", "--point", "1", "--out", "m.png"], "x,y"),
        (
            ["predict", str(IMAGE), "--checkpoint", "x", "--point", "1,2,maybe", "--out", "m"],
            "pos or neg",
        ),
        (
            ["predict", str(IMAGE), "--checkpoint", "x", "--box", "1,2,3", "--out", "m"],
            "x0,y0,x1,y1",
        ),
        (
            ["predict", "missing.png", "--checkpoint", "x", "--point", "1,2", "--out", "m"],
            "image not found",
        ),
        (
            ["predict", str(IMAGE), "--checkpoint", "absent.pt", "--point", "1,2", "--out", "m"],
            "not found",
        ),
        (["bench", "--variants", "b"], "--variants"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("efficientsam: error:")
    assert message in lines[0]


def test_unreadable_image_and_checkpoint(tmp_path, capsys, ti_checkpoint):
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not an image")
    assert (
        main(
            [
                "predict",
                str(bad_image),
                "--checkpoint",
                str(ti_checkpoint),
                "--point",
                "1,2",
                "--out",
                str(tmp_path / "m.png"),
            ]
        )
        == 2
    )
    assert "cannot read image" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(IMAGE),
                "--checkpoint",
                str(IMAGE),
                "--point",
                "1,2",
                "--out",
                str(tmp_path / "m.png"),
            ]
        )
        == 2
    )
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_how_to_run_the_benchmark(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "BENCHMARK_FILE", tmp_path / "benchmarks" / "efficientsam_bench.py")
    assert main(["bench", "--variants", "ti"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("efficientsam: error:")
    assert "python benchmarks/bench_efficientsam.py" in lines[0]


def test_bench_runs_the_checkouts_benchmark():
    assert cli.BENCHMARK_FILE.is_file()
    assert callable(cli.load_benchmark().run_benchmark)
