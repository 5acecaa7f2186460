"""Fine-tuning benchmark: does EfficientSAM learn a project's masks, and at what cost?

A seeded synthetic domain (``benchmarks/synthetic.py``): each image holds exactly one
object of the project's "class" (a red-magenta blob of random shape, size and position) on
textured clutter, so the target is well posed even for the random-weight fixture's encoder.
N train / M held-out images (different seeds). Reports held-out 1-click, box and 3-click mIoU
of the base model and the fine-tuned one (``efficientsam.training.evaluate``), the box-fill
baseline (each mask predicted as its tight box), training time, steps, s/step, peak memory.
``--objects 1,3``: a harder domain, 1-3 objects of the class per image: the model must segment
the prompted one (the all-objects baseline: answering with every object of the image).

    python benchmarks/bench_finetune.py [--train 40] [--held-out 16] [--steps 200] [--threads 1]
        [--lora] [--objects 1,3] [--set FIELD=VALUE ...]
        [--json benchmarks/results/finetune-cpu-1thread.json]

Default (~5 min on one CPU thread): decoder + prompt embeddings trained on cached embeddings (the
encoder runs once per image, before training). ``--lora``: LoRA (rank ``--lora-rank``) on the
encoder's attention too; the encoder then runs with gradients on every sample of every step
(~9 s per sample on one CPU thread, so fewer, smaller steps by default). ``--set``: change
one recipe choice at a time (the ablations in README), e.g. ``--set iou_on_all_candidates=false``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("EFFICIENTSAM_SHARED_DIR", ROOT.parent / "shared"))
CHECKPOINT = SHARED / "fixtures" / "efficientsam_ti_random.pt"

from benchmarks.efficientsam_bench import peak_rss_bytes  # noqa: E402
from benchmarks.synthetic import make_dataset  # noqa: E402
from efficientsam import load_model  # noqa: E402
from efficientsam.arrays import mask_iou  # noqa: E402
from efficientsam.training import (  # noqa: E402
    FineTuner,
    TrainingConfig,
    TrainingImage,
    box_fill_baseline,
    embed_image,
    evaluate,
)
from efficientsam.utils import keep_freed_memory_for_reuse  # noqa: E402

METRICS = ("one_click_miou", "box_miou", "three_click_miou")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--train", type=int, default=40, help="training images")
    parser.add_argument("--held-out", type=int, default=16, help="held-out images")
    parser.add_argument("--objects", default="1,1", help="min,max objects per image")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--steps", type=int, default=None, help="default 200 (LoRA: 30)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (LoRA: 2)")
    parser.add_argument("--learning-rate", type=float, default=TrainingConfig.learning_rate)
    parser.add_argument("--lora", action="store_true", help="also LoRA on the image encoder")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainingConfig field (ablations), e.g. --set corrective_rounds=0",
    )
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def config_overrides(assignments: list[str], config_type: type = TrainingConfig) -> dict:
    """``["warmup_steps=0", "grad_clip_norm=none"]`` -> ``config_type`` (a dataclass, default
    TrainingConfig) keyword arguments, each value parsed as the field's default type (``none``
    for None, true/false for booleans, comma-separated numbers for tuples)."""
    defaults = asdict(config_type())
    overrides = {}
    for assignment in assignments:
        name, _, text = assignment.partition("=")
        if name not in defaults:
            raise SystemExit(f"--set {assignment}: {config_type.__name__} has no field {name!r}")
        default = defaults[name]
        if text.lower() == "none":
            overrides[name] = None
        elif isinstance(default, bool):
            overrides[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            parts = text.split(",")
            if len(parts) != len(default):
                raise SystemExit(f"--set {assignment}: {name} takes {len(default)} values")
            overrides[name] = tuple(type(v)(p) for v, p in zip(default, parts, strict=True))
        else:
            overrides[name] = type(default if default is not None else 0.0)(text)
    return overrides


def to_images(samples, model, keep_pixels: bool) -> tuple[list[TrainingImage], float]:
    """Embed each synthetic sample once with the (frozen) encoder; returns images, seconds."""
    started = time.perf_counter()
    images = [
        TrainingImage(
            s.image_id, embed_image(model, s.image), s.masks, s.image if keep_pixels else None
        )
        for s in samples
    ]
    return images, time.perf_counter() - started


def scores(result: dict) -> dict:
    return {key: round(result[key], 4) for key in METRICS}


def all_objects_baseline(images: list[TrainingImage]) -> float:
    """mIoU of answering every prompt with all the image's objects (their union): what a model
    scores that segments the class but ignores which object was prompted."""
    ious = []
    for image in images:
        union = np.any(image.masks, axis=0)
        ious += [mask_iou(union, mask) for mask in image.masks if mask.any()]
    return float(np.mean(ious))


def peak_memory_mib(device: torch.device) -> dict:
    memory = {"peak_rss_mib": round(peak_rss_bytes() / 2**20, 1)}
    if device.type == "cuda":
        memory["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return memory


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    started = time.perf_counter()
    model = load_model(args.checkpoint, device=args.device)
    device = model.device
    objects = tuple(int(v) for v in args.objects.split(","))
    steps = args.steps if args.steps is not None else (30 if args.lora else 200)
    batch_size = args.batch_size if args.batch_size is not None else (2 if args.lora else 4)
    fields = {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "lora_rank": args.lora_rank if args.lora else 0,
        "log_every": args.log_every,
    }
    config = TrainingConfig(**{**fields, **config_overrides(args.set)})  # --set wins

    train_samples = make_dataset(
        args.train, seed=2 * args.seed + 1, prefix="train", objects=objects
    )
    held_samples = make_dataset(
        args.held_out, seed=2 * args.seed + 2, prefix="held", objects=objects
    )
    train, train_embed_seconds = to_images(train_samples, model, keep_pixels=args.lora)
    held_out, held_embed_seconds = to_images(held_samples, model, keep_pixels=True)
    masks = sum(len(image.masks) for image in train)
    print(
        f"{len(train)} train images ({masks} masks), {len(held_out)} held-out; encoder "
        f"{train_embed_seconds + held_embed_seconds:.1f} s for {len(train) + len(held_out)} images"
    )

    base = evaluate(model, held_out, seed=args.seed)
    baseline = box_fill_baseline(held_out)
    all_objects = all_objects_baseline(held_out)
    print(
        f"base: {scores(base)}; box-fill baseline {baseline:.4f}; all-objects baseline "
        f"{all_objects:.4f}"
    )

    def progress(entry: dict) -> None:
        print(
            f"step {entry['step']:>4}/{entry['steps']}  loss {entry['loss']:.4f}  "
            f"train IoU {entry['train_iou']:.3f}  lr {entry['lr']:.2e}  {entry['seconds']:.0f} s",
            flush=True,
        )

    tuner = FineTuner(model, config)
    report = tuner.fit(train, progress=progress)
    tuned = evaluate(tuner.model, held_out, seed=args.seed, encode_images=args.lora)
    tuned_train = evaluate(
        tuner.model, train[: args.held_out], seed=args.seed, encode_images=args.lora
    )
    changed = tuner.changed_tensors()
    result = {
        "benchmark": "finetune",
        "mode": "lora" if args.lora else "decoder",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
        "data": {
            "domain": f"synthetic, {args.objects} red-magenta blob(s) per image on clutter",
            "train_images": len(train),
            "train_masks": masks,
            "held_out_images": len(held_out),
            "held_out_masks": base["count"],
            "seed": args.seed,
        },
        "held_out": {
            "base": scores(base),
            "fine_tuned": scores(tuned),
            "box_fill_baseline": round(baseline, 4),
            "all_objects_baseline": round(all_objects, 4),
        },
        "train_subset_fine_tuned": scores(tuned_train),
        "training": {
            "steps": report.steps,
            "batch_size": config.batch_size,
            "seconds": round(report.seconds, 1),
            "seconds_per_step": round(report.seconds_per_step, 3),
            "trainable_parameters": report.trainable_parameters,
            "changed_tensors": len(changed),
            "changed_mib": round(
                sum(t.numel() * t.element_size() for t in changed.values()) / 2**20, 2
            ),
            "history": report.history,
        },
        "encoder_seconds": round(train_embed_seconds + held_embed_seconds, 1),
        "memory": peak_memory_mib(device),
        "total_seconds": round(time.perf_counter() - started, 1),
        "config": asdict(config),
    }
    print()
    print(f"| held-out mIoU ({base['count']} masks) | base | fine-tuned |")
    print("|---|---|---|")
    for key in METRICS:
        print(f"| {key} | {base[key]:.4f} | {tuned[key]:.4f} |")
    print(f"| box-fill baseline | {baseline:.4f} | |")
    if objects[1] > 1:
        print(f"| all-objects baseline (ignores which object) | {all_objects:.4f} | |")
    print(
        f"training: {report.steps} steps x {config.batch_size} in {report.seconds:.1f} s "
        f"({report.seconds_per_step:.3f} s/step), {report.trainable_parameters:,} trainable "
        f"parameters, {len(changed)} tensors changed; peak memory {result['memory']}; "
        f"total {result['total_seconds']:.0f} s"
    )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
