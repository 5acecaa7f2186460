"""SAMI recipes at equal time: which use of a fixed time budget on the CPU distils best?

Teacher: EfficientSAM-S with seeded random weights of the right shapes (no real weights are
reachable here; a random teacher's embeddings are mostly a per-channel constant, hence the
``teacher_mean`` reference row). Student: a seeded random Ti (another seed) or ``--student``, a
Ti checkpoint. Data: seeded synthetic images (``benchmarks/synthetic.py``), N train / M held-out;
the teacher embeds them once, in this process, and every recipe reads images and embeddings from
one temporary .safetensors file.

Recipes, each in its own process (so its peak RSS is its own) with the same budget:

* ``init``: the student as initialised (no training);
* ``sami_only``: masked pretraining only (``steps=N, align_steps=0``); it trains the ViT, not the
  neck, so its embeddings still pass through the student's initial neck;
* ``align_only``: unmasked alignment only (``steps=0, align_steps=M``);
* ``sami_then_align``: half the budget masked, half aligned;
* ``teacher_mean`` (reference, computed here): a constant embedding, the teacher's per-channel
  mean over the training images.

The budget is WALL time (``--budget-seconds`` per recipe) on a fixed torch thread count
(``--threads``), so the machine must be otherwise idle; each stage's process CPU time is recorded
beside it (CPU / wall well below the thread count means the run shared its cores). Step counts come
from the budget: a few calibration steps per stage on a throwaway copy (not counted; the first is
a warm-up and is dropped) give seconds per step, then steps = max(1, floor(stage budget / s per
step)), so the warm-up / cosine schedule runs to its end (a budget under one step's time still
gets one step, and so overruns). Recorded per recipe: planned steps, wall and CPU seconds spent
and s/step per stage, ``held_out_metrics`` against the teacher (cosine, centred cosine, nmse,
mask agreement), the median time of the result's encoder and the teacher's at 1024 x 1024 (same
process, same threads) and the peak RSS (VmHWM) after training and at the end.

    python benchmarks/bench_sami.py [--budget-seconds 360] [--threads 2] [--train 24]
        [--held-out 8] [--student PATH] [--set FIELD=VALUE ...] [--only RECIPE ...] [--quick]
        [--json benchmarks/results/sami-recipes-cpu-2core.json]
        [--markdown benchmarks/results/sami-recipes-cpu-2core.md]

``--set`` overrides a SamiConfig field in every recipe (e.g. ``learning_rate=2e-3``,
``decoder_depth=4``); ``steps``, ``align_steps`` and ``log_every`` are the benchmark's own.
``--quick`` (the smoke test): 2 / 1 images, a 2 s budget, batch size 1, one calibration step, one
timed encoder pass, and no result files unless ``--json`` / ``--markdown`` are given. Progress
lines go to stderr, the table to stdout. Defaults take ~30 min on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_finetune import config_overrides  # noqa: E402
from benchmarks.efficientsam_bench import cpu_model, peak_rss_bytes  # noqa: E402
from benchmarks.random_weights import random_model  # noqa: E402
from benchmarks.synthetic import make_dataset  # noqa: E402
from efficientsam import load_model  # noqa: E402
from efficientsam.modeling import EfficientSam  # noqa: E402
from efficientsam.training.sami import (  # noqa: E402
    TEACHER_CHANNELS,
    SamiConfig,
    SamiDistiller,
    held_out_metrics,
    teacher_embeddings,
)
from efficientsam.utils import keep_freed_memory_for_reuse  # noqa: E402

SCRIPT = Path(__file__).resolve()
RESULTS = ROOT / "benchmarks" / "results"
TEACHER_SEED = 5678
STUDENT_SEED = 1234
METRICS = ("cosine", "centred_cosine", "nmse", "mask_agreement")
STAGES = ("sami", "align")
# name -> (what it does, share of the budget per stage)
RECIPES: dict[str, tuple[str, dict[str, float]]] = {
    "init": ("the student as initialised, no training", {"sami": 0.0, "align": 0.0}),
    "sami_only": ("masked pretraining only", {"sami": 1.0, "align": 0.0}),
    "align_only": ("unmasked alignment only", {"sami": 0.0, "align": 1.0}),
    "sami_then_align": ("half the budget masked, then half aligned", {"sami": 0.5, "align": 0.5}),
}
REFERENCE = "teacher_mean"
OWN_FIELDS = ("steps", "align_steps", "log_every")  # planned or set by the benchmark


@dataclass(frozen=True)
class Settings:
    """The run's sizes after ``--quick`` filled in what was not given."""

    train: int
    held_out: int
    budget_seconds: float
    calibration_steps: int
    speed_repeats: int
    speed_warmup: int
    overrides: dict


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-seconds", type=float, help="wall seconds per recipe (360)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--train", type=int, help="training images (24)")
    parser.add_argument("--held-out", type=int, help="held-out images (8)")
    parser.add_argument("--seed", type=int, default=0, help="data and SamiConfig seed")
    parser.add_argument("--teacher-seed", type=int, default=TEACHER_SEED)
    parser.add_argument("--student", type=Path, help="Ti checkpoint (default: a random Ti)")
    parser.add_argument("--student-seed", type=int, default=STUDENT_SEED)
    parser.add_argument(
        "--calibration-steps", type=int, help="steps per stage to time (3; the first dropped)"
    )
    parser.add_argument("--speed-repeats", type=int, help="timed encoder passes (3)")
    parser.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a SamiConfig field in every recipe, e.g. --set learning_rate=2e-3",
    )
    parser.add_argument("--only", nargs="+", choices=[*RECIPES, REFERENCE], help="rows to run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/sami-recipes-...")
    parser.add_argument("--markdown", type=Path, help="default: the JSON's path with .md")
    # internal: one recipe, in a child process
    parser.add_argument("--recipe", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    """Sizes from the flags, ``--quick``'s or the full run's defaults where a flag is absent."""

    def pick(value, quick, full):
        return value if value is not None else (quick if args.quick else full)

    overrides = config_overrides(args.set, SamiConfig)
    own = sorted(set(overrides) & set(OWN_FIELDS))
    if own:
        raise SystemExit(f"--set {', '.join(own)}: planned by the benchmark, not settable")
    if args.quick:
        overrides = {"batch_size": 1, **overrides}
    return Settings(
        train=pick(args.train, 2, 24),
        held_out=pick(args.held_out, 1, 8),
        budget_seconds=pick(args.budget_seconds, 2.0, 360.0),
        calibration_steps=pick(args.calibration_steps, 1, 3),
        speed_repeats=pick(args.speed_repeats, 1, 3),
        speed_warmup=0 if args.quick else 1,
        overrides=overrides,
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data shared by the recipes ---------------------------------------------------------------


def datasets(args: argparse.Namespace, settings: Settings) -> tuple[list, list]:
    """(train, held-out) lists of HxWx3 uint8 RGB images, seeded (different seeds)."""
    train = make_dataset(settings.train, seed=2 * args.seed + 1, prefix="train")
    held = make_dataset(settings.held_out, seed=2 * args.seed + 2, prefix="held")
    return [s.image for s in train], [s.image for s in held]


def parameter_checksum(model: nn.Module) -> float:
    """Sum of |w| over all parameters: the same teacher in parent and child, or not."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def save_shared(
    path: Path,
    images: dict[str, list[np.ndarray]],
    targets: dict[str, list[torch.Tensor]],
    teacher_checksum: float,
) -> None:
    """One .safetensors file: ``{split}.image.{i}`` (H, W, 3) uint8, ``{split}.target.{i}``
    (1, 256, 64, 64) float32, split in train / held_out."""
    tensors = {}
    for split in images:
        for index, (image, target) in enumerate(zip(images[split], targets[split], strict=True)):
            tensors[f"{split}.image.{index}"] = torch.from_numpy(np.ascontiguousarray(image))
            tensors[f"{split}.target.{index}"] = target.contiguous()
    save_file(tensors, str(path), metadata={"teacher_checksum": repr(teacher_checksum)})


def load_shared(path: Path) -> tuple[dict, dict, float]:
    """What :func:`save_shared` wrote: (images, targets, teacher checksum)."""
    tensors = load_file(str(path))
    with open(path, "rb") as file:  # safetensors: 8-byte little-endian header size, JSON header
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    images: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[torch.Tensor]] = {}
    for split in ("train", "held_out"):
        count = sum(1 for key in tensors if key.startswith(f"{split}.image."))
        images[split] = [tensors[f"{split}.image.{i}"].numpy() for i in range(count)]
        targets[split] = [tensors[f"{split}.target.{i}"] for i in range(count)]
    return images, targets, float(header["__metadata__"]["teacher_checksum"])


# -- one recipe (child process) ---------------------------------------------------------------


class ConstantEncoder(nn.Module):
    """An "encoder" whose embedding of any image is one fixed (1, 256, 64, 64) tensor: the
    per-channel constant ``channel_values`` (256,)."""

    def __init__(self, channel_values: torch.Tensor, grid: int = 64) -> None:
        super().__init__()
        self.channel_values = nn.Parameter(channel_values.float().clone(), requires_grad=False)
        self.grid = grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.channel_values.view(1, -1, 1, 1).expand(
            images.shape[0], -1, self.grid, self.grid
        )


def student_model(args: argparse.Namespace) -> EfficientSam:
    if args.student is not None:
        return load_model(args.student)
    return random_model("ti", args.student_seed)


def calibrate(
    student: EfficientSam,
    config: SamiConfig,
    stage: str,
    steps: int,
    images: Sequence[np.ndarray],
    targets: Sequence[torch.Tensor],
) -> dict:
    """Seconds per step of ``stage`` from ``steps`` steps on a throwaway copy of the student
    (the first step dropped as a warm-up when there are more). Returns steps, seconds/step."""
    counts = (
        {"steps": steps, "align_steps": 0}
        if stage == "sami"
        else {"steps": 0, "align_steps": steps}
    )
    throwaway = SamiDistiller(student, SamiConfig(**{**asdict(config), **counts, "log_every": 1}))
    started = time.perf_counter()
    history = throwaway.fit(images, targets).history
    seconds = [entry["seconds"] for entry in history]
    per_step = (seconds[-1] - seconds[0]) / (steps - 1) if steps > 1 else seconds[0]
    log(f"calibrated {stage}: {steps} steps in {time.perf_counter() - started:.1f} s")
    return {"steps": steps, "seconds_per_step": per_step, "dropped_first": steps > 1}


def encoder_seconds(encoders: dict[str, nn.Module], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall seconds of one forward pass of each encoder on a (1, 3, 1024, 1024) input,
    the encoders interleaved, after ``warmup`` untimed rounds."""
    image = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    samples: dict[str, list[float]] = {name: [] for name in encoders}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, encoder in encoders.items():
                started = time.perf_counter()
                encoder.eval()(image)
                if round_index >= warmup:
                    samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_recipe(args: argparse.Namespace, settings: Settings) -> dict:
    """One recipe in this process: calibrate, plan, train, measure. Returns its JSON row."""
    name = args.recipe
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    images, targets, checksum = load_shared(args.data)
    teacher = random_model("s", args.teacher_seed)
    if not math.isclose(parameter_checksum(teacher), checksum, rel_tol=1e-12):
        raise SystemExit("the teacher rebuilt here differs from the one that made the targets")
    student = student_model(args)
    base = SamiConfig(**{"seed": args.seed, **settings.overrides})
    shares = RECIPES[name][1]
    calibration, planned = {}, {}
    for stage in STAGES:
        planned[stage] = 0
        if shares[stage] > 0:
            log(f"[{name}] calibrating {stage}")
            calibration[stage] = calibrate(
                student, base, stage, settings.calibration_steps, images["train"], targets["train"]
            )
            stage_budget = shares[stage] * settings.budget_seconds
            planned[stage] = max(
                1, math.floor(stage_budget / calibration[stage]["seconds_per_step"])
            )
    log(f"[{name}] planned steps: sami {planned['sami']}, align {planned['align']}")

    config = SamiConfig(
        **{
            **asdict(base),
            "steps": planned["sami"],
            "align_steps": planned["align"],
            "log_every": 1,
        }
    )
    stage_cpu = {stage: 0.0 for stage in STAGES}
    last_cpu = [0.0]  # process CPU time at the previous step's end (or the start of fit)

    def progress(entry: dict) -> None:  # called after every step (log_every=1)
        now = time.process_time()
        stage_cpu[entry["stage"]] += now - last_cpu[0]
        last_cpu[0] = now
        if entry["step"] % args.log_every == 0 or entry["step"] in (1, entry["steps"]):
            log(
                f"[{name}] {entry['stage']} step {entry['step']}/{entry['steps']} "
                f"loss {entry['loss']:.4f} lr {entry['lr']:.2e} {entry['seconds']:.0f} s"
            )

    distiller = SamiDistiller(student, config)
    last_cpu[0] = time.process_time()
    report = distiller.fit(images["train"], targets["train"], progress=progress)
    peak_training = peak_rss_bytes()
    encoder = distiller.result_model(teacher).image_encoder
    log(f"[{name}] held-out metrics")
    metrics = held_out_metrics(
        encoder, teacher, images["held_out"], targets["held_out"], config.seed
    )
    log(f"[{name}] encoder speed")
    speed = encoder_seconds(
        {"student": encoder, "teacher": teacher.image_encoder},
        settings.speed_repeats,
        settings.speed_warmup,
    )
    wall = {"sami": report.sami_seconds, "align": report.align_seconds}
    stages = {
        stage: {
            "steps": planned[stage],
            "wall_seconds": round(wall[stage], 2),
            "cpu_seconds": round(stage_cpu[stage], 2),
            "seconds_per_step": round(report.seconds_per_step(stage), 4),
            "final_loss": next(
                (e["loss"] for e in reversed(report.history) if e["stage"] == stage), None
            ),
        }
        for stage in STAGES
    }
    return {
        "description": RECIPES[name][0],
        "budget_share": shares,
        "calibration": calibration,
        "stages": stages,
        "training_wall_seconds": round(sum(wall.values()), 2),
        "training_cpu_seconds": round(sum(stage_cpu.values()), 2),
        "metrics": {key: round(metrics[key], 4) for key in METRICS},
        "encoder_seconds": {
            "student": round(speed["student"], 3),
            "teacher": round(speed["teacher"], 3),
            "teacher_over_student": round(speed["teacher"] / speed["student"], 2),
        },
        "peak_rss_training_mib": round(peak_training / 2**20, 1),
        "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        "process_wall_seconds": round(time.perf_counter() - started_wall, 1),
        "process_cpu_seconds": round(time.process_time() - started_cpu, 1),
        "config": asdict(config),
        "history": [
            {k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()}
            for entry in report.history
        ],
    }


# -- the parent: data, reference row, one child per recipe, table ----------------------------


def child_command(args: argparse.Namespace, name: str, data: Path, result: Path) -> list[str]:
    """This script again, for one recipe, with the flags that shape a recipe's run."""
    command = [sys.executable, str(SCRIPT), "--recipe", name, "--data", str(data)]
    command += ["--result", str(result), "--threads", str(args.threads), "--seed", str(args.seed)]
    command += ["--teacher-seed", str(args.teacher_seed), "--log-every", str(args.log_every)]
    command += ["--student-seed", str(args.student_seed)]
    for flag in ("budget_seconds", "train", "held_out", "calibration_steps", "speed_repeats"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    if args.student is not None:
        command += ["--student", str(args.student)]
    if args.quick:
        command.append("--quick")
    for assignment in args.set:
        command += ["--set", assignment]
    return command


def run_child(args: argparse.Namespace, name: str, data: Path, folder: Path) -> dict:
    result = folder / f"{name}.json"
    started = time.perf_counter()
    done = subprocess.run(child_command(args, name, data, result))
    if done.returncode != 0:
        raise RuntimeError(f"recipe {name} failed (exit {done.returncode}); see stderr above")
    log(f"[{name}] done in {time.perf_counter() - started:.0f} s")
    return json.loads(result.read_text())


def teacher_mean_row(
    teacher: EfficientSam,
    targets: dict[str, list[torch.Tensor]],
    images: dict[str, list[np.ndarray]],
    seed: int,
) -> dict:
    """Held-out metrics of the constant embedding equal to the teacher's per-channel mean over
    the training images' embeddings (all images and positions)."""
    channel_mean = torch.cat(targets["train"]).double().mean(dim=(0, 2, 3))
    assert channel_mean.shape == (TEACHER_CHANNELS,)
    encoder = ConstantEncoder(channel_mean)
    metrics = held_out_metrics(encoder, teacher, images["held_out"], targets["held_out"], seed)
    return {
        "description": "constant embedding: the teacher's per-channel mean over the train images",
        "metrics": {key: round(metrics[key], 4) for key in METRICS},
    }


def _cell(value: float | None, digits: str) -> str:
    return "-" if value is None else format(value, digits)


def to_markdown(result: dict) -> str:
    """The table (one row per recipe, the reference last) and the run's conditions."""
    machine, data, budget = result["machine"], result["data"], result["budget"]
    lines = [
        f"# SAMI recipes at equal wall time ({result['date']})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{machine['threads']} torch threads. Budget: {budget['seconds_per_recipe']:g} s "
        f"{budget['measure']} per recipe. Teacher: {result['teacher']}; student: "
        f"{result['student']}. Data: {data['train_images']} train / {data['held_out_images']} "
        f"held-out synthetic images (seed {data['seed']}). SamiConfig overrides: "
        f"{result['config_overrides'] or 'none'}.",
        "",
        "| recipe | steps (sami/align) | s/step (sami/align) | wall s (CPU s) | cosine | "
        "centred cosine | nmse | mask agreement | encoder s (student/teacher) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["recipes"].items():
        m = row["metrics"]
        metrics = (
            f"{m['cosine']:.4f} | {m['centred_cosine']:.4f} | {m['nmse']:.4f} | "
            f"{m['mask_agreement']:.4f}"
        )
        if "stages" not in row:  # the reference row
            lines.append(f"| {name} (reference) | - | - | - | {metrics} | - | - |")
            continue
        sami, align = row["stages"]["sami"], row["stages"]["align"]
        per_step = "/".join(_cell(s["seconds_per_step"] or None, ".2f") for s in (sami, align))
        speed = row["encoder_seconds"]
        lines.append(
            f"| {name} | {sami['steps']}/{align['steps']} | {per_step} | "
            f"{row['training_wall_seconds']:.0f} ({row['training_cpu_seconds']:.0f}) | {metrics} | "
            f"{speed['student']:.2f}/{speed['teacher']:.2f} | {row['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run_benchmark(args: argparse.Namespace, settings: Settings) -> dict:
    names = args.only or [*RECIPES, REFERENCE]
    train, held = datasets(args, settings)
    images = {"train": train, "held_out": held}
    teacher = random_model("s", args.teacher_seed)
    log(f"teacher embeddings of {len(train)} + {len(held)} images")
    started = time.perf_counter()
    targets = {split: teacher_embeddings(teacher, images[split]) for split in images}
    teacher_seconds = time.perf_counter() - started
    reference = teacher_mean_row(teacher, targets, images, args.seed)
    checksum = parameter_checksum(teacher)
    del teacher  # the recipes run in their own processes
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-sami-") as folder:
        data = Path(folder) / "shared.safetensors"
        save_shared(data, images, targets, checksum)
        for name in names:
            if name in RECIPES:
                rows[name] = run_child(args, name, data, Path(folder))
    if REFERENCE in names:
        rows[REFERENCE] = reference
    student = str(args.student) if args.student else f"random Ti (seed {args.student_seed})"
    return {
        "benchmark": "sami-recipes",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "budget": {
            "seconds_per_recipe": settings.budget_seconds,
            "measure": "wall",
            "note": (
                "wall time on a fixed torch thread count, machine otherwise idle; each stage's "
                "process CPU time is recorded beside it; calibration steps are not counted"
            ),
            "calibration_steps": settings.calibration_steps,
        },
        "teacher": f"random EfficientSAM-S (seed {args.teacher_seed})",
        "student": student,
        "data": {
            "domain": "synthetic (benchmarks/synthetic.py)",
            "train_images": len(train),
            "held_out_images": len(held),
            "seed": args.seed,
            "teacher_embedding_seconds": round(teacher_seconds, 1),
        },
        "quick": args.quick,
        "config_overrides": settings.overrides,
        "encoder_speed": {"repeats": settings.speed_repeats, "warmup": settings.speed_warmup},
        "recipes": rows,
    }


def write(path: Path | None, text: str) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = settings_of(args)
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    if args.recipe is not None:
        write(args.result, json.dumps(run_recipe(args, settings), indent=2) + "\n")
        return {}
    result = run_benchmark(args, settings)
    json_path = args.json
    if json_path is None and not args.quick:
        json_path = RESULTS / f"sami-recipes-cpu-{args.threads}core.json"
    markdown_path = args.markdown
    if markdown_path is None and json_path is not None:
        markdown_path = json_path.with_suffix(".md")
    table = to_markdown(result)
    write(json_path, json.dumps(result, indent=2) + "\n")
    write(markdown_path, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
