"""Which parts of the fine-tuning recipe matter: ``bench_finetune.py`` once per variant, each
changing one choice of the default recipe, on the same seeded data, steps and thread count.

    python benchmarks/bench_finetune_ablations.py [--parallel 2] [--steps 200]
        [--only NAME ...] [--reuse] [--bench-args "--objects 1,3 --train 60 --held-out 20"]
        [--json benchmarks/results/finetune-ablations-cpu-1thread.json]

Each variant runs in its own process on one thread (``--parallel`` at a time), writes its
``bench_finetune`` JSON next to the summary, and the table gives held-out 1-click / box /
3-click mIoU and the final training IoU per variant, the default recipe first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "bench_finetune.py"

# name -> (what it changes, --set assignments)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("the recipe as shipped", []),
    "iou_loss_on_chosen_only": (
        "IoU MSE only on the back-propagated candidate",
        ["iou_on_all_candidates=false"],
    ),
    "no_warmup_no_clip": (
        "no warm-up, no gradient clipping",
        ["warmup_steps=0", "grad_clip_norm=none"],
    ),
    "no_corrective_clicks": ("first prompts only (no corrective clicks)", ["corrective_rounds=0"]),
    "focal_weight_1": ("focal:dice 1:1 instead of 20:1", ["focal_weight=1"]),
    "lr_1e-4": ("learning rate 1e-4", ["learning_rate=1e-4"]),
    "lr_3e-3": ("learning rate 3e-3", ["learning_rate=3e-3"]),
}
METRICS = ("one_click_miou", "box_miou", "three_click_miou")


def run_variant(
    name: str,
    assignments: list[str],
    steps: int,
    out_dir: Path,
    reuse: bool = False,
    bench_args: tuple[str, ...] = (),
) -> dict:
    out = out_dir / f"{name}.json"
    if reuse and out.exists():
        return json.loads(out.read_text())
    command = [sys.executable, str(SCRIPT), "--steps", str(steps), "--threads", "1"]
    command += [*bench_args, *(argument for a in assignments for argument in ("--set", a))]
    command += ["--json", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument(
        "--reuse", action="store_true", help="use a variant's JSON from an earlier run if present"
    )
    parser.add_argument(
        "--bench-args",
        default="",
        help='more bench_finetune.py arguments, e.g. "--objects 1,3 --train 60 --held-out 20"',
    )
    parser.add_argument("--json", default="benchmarks/results/finetune-ablations-cpu-1thread.json")
    args = parser.parse_args(argv)
    names = args.only or list(VARIANTS)
    summary_path = Path(args.json)
    out_dir = summary_path.with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {
            name: pool.submit(
                run_variant,
                name,
                VARIANTS[name][1],
                args.steps,
                out_dir,
                args.reuse,
                tuple(args.bench_args.split()),
            )
            for name in names
        }
        results = {name: future.result() for name, future in futures.items()}
    rows = {}
    print("\n| variant | 1-click | box | 3-click | final train IoU | train IoU >= 0.5 at step |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        tuned = result["held_out"]["fine_tuned"]
        history = result["training"]["history"]
        final_train_iou = history[-1]["train_iou"]
        # how long the plateau lasted: the first logged step with training IoU >= 0.5
        escaped = next((entry["step"] for entry in history if entry["train_iou"] >= 0.5), None)
        rows[name] = {
            "changes": VARIANTS[name][0],
            "set": VARIANTS[name][1],
            **{key: tuned[key] for key in METRICS},
            "final_train_iou": round(final_train_iou, 4),
            "train_iou_0.5_at_step": escaped,
            "seconds": result["training"]["seconds"],
        }
        print(
            f"| {name} ({VARIANTS[name][0]}) | {tuned['one_click_miou']:.3f} | "
            f"{tuned['box_miou']:.3f} | {tuned['three_click_miou']:.3f} | {final_train_iou:.3f} | "
            f"{escaped if escaped is not None else 'never'} |"
        )
    summary = {
        "benchmark": "finetune-ablations",
        "steps": args.steps,
        "bench_args": args.bench_args,
        "variants": rows,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
