"""Fine-tuning loop: decoder (+ prompt embeddings) on cached embeddings, optional encoder LoRA.

Each step draws ``batch_size`` (image, mask) pairs (shuffled epochs), simulates a first prompt
per mask (noisy box or 1-3 positive clicks), adds 0..``corrective_rounds`` corrective clicks
from the model's own current predictions (no gradient), then trains on the final prompts with
SAM's loss (:mod:`.losses`), each prompt decoded the way it is served: one click alone ->
3 candidates (the lowest-loss one trained), box or several clicks -> the single mask.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..modeling import EfficientSam
from ..prompts import Prompt
from ..utils import image_to_tensor
from .data import LOW_RES_SIZE, TrainingImage, low_res_target
from .losses import segmentation_loss
from .simulation import (
    add_click,
    corrective_click,
    initial_prompt,
    is_multimask,
    prompt_tokens,
    room_for_clicks,
)

PROMPT_EMBEDDINGS = (
    "prompt_encoder.point_embeddings.weight",
    "prompt_encoder.bbox_top_left_embeddings.weight",
    "prompt_encoder.bbox_bottom_right_embeddings.weight",
    "prompt_encoder.invalid_points.weight",
)
LORA_TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"  # the encoder's attention linears


@dataclass
class TrainingConfig:
    """Hyper-parameters; the defaults come from the benchmark experiments (README, "Fine-tuning").

    steps/batch_size: optimiser steps and (image, mask) samples per step. learning_rate: AdamW
    peak, reached after ``warmup_steps`` (linear), then cosine decay to ``final_lr_fraction`` of
    it. weight_decay applies to matrices only (not norms, biases, embeddings).
    corrective_rounds: at most this many corrective clicks are added to a sample (uniformly
    0..max, never beyond 6 tokens). box_probability: share of first prompts that are a noisy
    box (noise std ``box_noise_fraction`` of the side, at most ``box_max_noise`` px); the other
    first prompts are one click (``single_click_probability``) or 2..``max_initial_clicks``.
    Loss: focal_weight x focal + dice_weight x dice + iou_weight x IoU MSE (on all candidates
    when ``iou_on_all_candidates``). lora_rank > 0 adds LoRA (rank, ``lora_alpha``, default
    2 x rank) on the encoder's attention qkv/proj linears and runs the encoder each step on
    ``TrainingImage.image``; its learning rate is ``lora_learning_rate`` (default the same).
    masks_per_image > 1: a batch is drawn as images, each giving up to that many of its masks
    (1: masks drawn independently).
    """

    steps: int = 300
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1
    grad_clip_norm: float | None = 1.0
    seed: int = 0
    corrective_rounds: int = 2
    box_probability: float = 0.4
    single_click_probability: float = 0.6
    max_initial_clicks: int = 3
    box_noise_fraction: float = 0.1
    box_max_noise: float = 20.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_on_all_candidates: bool = True
    train_prompt_embeddings: bool = True
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_learning_rate: float | None = None
    masks_per_image: int = 1
    log_every: int = 10

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "log_every": self.log_every,
            "masks_per_image": self.masks_per_image,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.corrective_rounds < 0 or self.lora_rank < 0:
            raise ValueError("warmup_steps, corrective_rounds and lora_rank must be >= 0")
        for name in ("box_probability", "single_click_probability", "final_lr_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.max_initial_clicks <= 4:
            raise ValueError(f"max_initial_clicks must be 1..4, got {self.max_initial_clicks}")


@dataclass
class TrainingReport:
    """steps run, wall seconds (training loop only), history: one dict per ``log_every`` steps
    (means over the interval: loss, focal, dice, iou_mse, train_iou = IoU of the mask that would
    be served at 256x256, lr, seconds since start), trainable parameter count, the config."""

    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    config: dict = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


@dataclass
class _Sample:
    """One (image, mask) pair, ready for prompt simulation and the loss."""

    image_index: int
    mask: np.ndarray  # (H, W) bool
    target: np.ndarray  # (256, 256) bool
    size: tuple[int, int]


class _Sampler:
    """Draws batches in shuffled epochs: of samples (masks_per_image = 1), or of images, each
    giving up to ``masks_per_image`` of its masks (several prompts on one embedding)."""

    def __init__(
        self, samples: list[_Sample], masks_per_image: int, rng: np.random.Generator
    ) -> None:
        self.samples = samples
        self.masks_per_image = masks_per_image
        self.rng = rng
        self.by_image: dict[int, list[_Sample]] = {}
        for sample in samples:
            self.by_image.setdefault(sample.image_index, []).append(sample)
        self.order: list[int] = []

    def draw(self, batch_size: int) -> list[_Sample]:
        batch: list[_Sample] = []
        while len(batch) < batch_size:
            if not self.order:
                count = len(self.samples) if self.masks_per_image == 1 else len(self.by_image)
                self.order = self.rng.permutation(count).tolist()
            if self.masks_per_image == 1:
                batch.append(self.samples[self.order.pop()])
                continue
            masks = self.by_image[list(self.by_image)[self.order.pop()]]
            take = min(self.masks_per_image, len(masks), batch_size - len(batch))
            batch += [masks[i] for i in self.rng.choice(len(masks), size=take, replace=False)]
        return batch


def warmup_cosine_factor(step: int, steps: int, warmup_steps: int, final_fraction: float) -> float:
    """Learning-rate factor of 0-based ``step``: linear warm-up to 1 over ``warmup_steps``, then
    cosine decay to ``final_fraction`` at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return final_fraction + (1 - final_fraction) * cosine


def _digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().cpu().contiguous()
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


class FineTuner:
    """Fine-tunes a deep copy of ``model`` (the given model is never modified).

    Decoder-only (default): the mask decoder and the prompt embeddings train on the images'
    cached embeddings; the encoder never runs. With ``config.lora_rank`` > 0 the encoder's
    attention gets LoRA adapters, runs on ``TrainingImage.image`` each step, and the adapters
    are merged into its weights at the end of :meth:`fit`. Typical use::

        images = [TrainingImage(task_id, predictor.embed(image).embeddings, masks) for ...]
        train_ids, held_out_ids = split_by_task([image.image_id for image in images])
        # train_images, held_out_images: the images with those ids
        tuner = FineTuner(model, TrainingConfig())
        report = tuner.fit(train_images, progress=print)
        scores = evaluate(tuner.model, held_out_images)  # vs evaluate(model, held_out_images)
        changed = tuner.changed_tensors()  # the tensors a fine-tuned version has to store
    """

    def __init__(self, model: EfficientSam, config: TrainingConfig) -> None:
        self.config = config
        self._original = {key: _digest(value) for key, value in model.state_dict().items()}
        self._model = copy.deepcopy(model)
        self._model.requires_grad_(False)
        self._model.eval()
        self.steps_done = 0

    @property
    def model(self) -> EfficientSam:
        """The trained copy, in eval mode (no gradients required)."""
        return self._model

    def changed_tensors(self) -> dict[str, torch.Tensor]:
        """State-dict entries of the trained copy whose values differ from the original model's
        (LoRA already merged into the encoder weights), as CPU tensors."""
        return {
            key: value.detach().cpu().clone()
            for key, value in self._model.state_dict().items()
            if key not in self._original or _digest(value) != self._original[key]
        }

    # -- set-up ----------------------------------------------------------------------------
    def _trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        names = [name for name, _ in self._model.mask_decoder.named_parameters()]
        chosen = [f"mask_decoder.{name}" for name in names]
        if self.config.train_prompt_embeddings:
            chosen += list(PROMPT_EMBEDDINGS)
        if self.config.lora_rank > 0:
            chosen += [
                n
                for n, _ in self._model.image_encoder.named_parameters(prefix="image_encoder")
                if "lora_" in n
            ]
        parameters = dict(self._model.named_parameters())
        return [(name, parameters[name]) for name in chosen]

    def _optimizer(self, named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        config = self.config
        lora_lr = config.lora_learning_rate or config.learning_rate
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, parameter in named:
            is_embedding = "embeddings" in name or "invalid_points" in name or "_token" in name
            decay = config.weight_decay if parameter.dim() >= 2 and not is_embedding else 0.0
            lr = lora_lr if "lora_" in name else config.learning_rate
            groups.setdefault((lr, decay), []).append(parameter)
        return torch.optim.AdamW(
            [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()],
            lr=config.learning_rate,
        )

    def _lr_factor(self, step: int) -> float:
        config = self.config
        return warmup_cosine_factor(
            step, config.steps, config.warmup_steps, config.final_lr_fraction
        )

    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        rank = self.config.lora_rank
        alpha = self.config.lora_alpha if self.config.lora_alpha is not None else 2.0 * rank
        lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
        inject_adapter_in_model(lora, self._model.image_encoder)

    def _merge_lora(self) -> None:
        """Fold the adapters into the base weights and put the plain linears back."""
        from peft.tuners.lora import LoraLayer

        encoder = self._model.image_encoder
        wrapped = [(n, m) for n, m in encoder.named_modules() if isinstance(m, LoraLayer)]
        for name, module in wrapped:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            setattr(parent, child, module.get_base_layer())

    def _samples(self, images: list[TrainingImage]) -> list[_Sample]:
        samples = []
        for index, image in enumerate(images):
            if self.config.lora_rank > 0 and image.image is None:
                raise ValueError(f"{image.image_id}: LoRA training needs TrainingImage.image")
            for mask in image.masks:
                if mask.any():
                    samples.append(_Sample(index, mask, low_res_target(mask), mask.shape))
        return samples

    # -- training --------------------------------------------------------------------------
    def fit(
        self,
        images: list[TrainingImage],
        progress: Callable[[dict], None] | None = None,
    ) -> TrainingReport:
        """Train for ``config.steps`` steps on all non-empty masks of ``images``; ``progress``
        gets each history entry (a dict with step, steps, epoch (samples seen / samples, a float),
        loss, train_iou, lr, seconds, ...);
        an exception it raises stops training (the copy keeps the weights reached so far, LoRA
        merged). Calling fit again continues from the trained weights with a fresh optimiser
        and schedule."""
        config = self.config
        samples = self._samples(images)
        if not samples:
            raise ValueError("no non-empty masks to train on")
        model = self._model
        rng = np.random.default_rng([config.seed, self.steps_done])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.lora_rank > 0:
                self._inject_lora()
            named = self._trainable_parameters()
            for _, parameter in named:
                parameter.requires_grad_(True)
            optimizer = self._optimizer(named)
            parameters = [parameter for _, parameter in named]
            base_lrs = [group["lr"] for group in optimizer.param_groups]
            report = TrainingReport(
                steps=0,
                seconds=0.0,
                trainable_parameters=sum(p.numel() for p in parameters),
                config=asdict(config),
            )
            sampler = _Sampler(samples, config.masks_per_image, rng)
            interval: list[dict] = []
            started = time.perf_counter()
            model.train()
            try:
                for step in range(config.steps):
                    factor = self._lr_factor(step)
                    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                        group["lr"] = base * factor
                    batch = sampler.draw(config.batch_size)
                    optimizer.zero_grad(set_to_none=True)
                    stats = self._step(batch, images, rng)
                    if config.grad_clip_norm:
                        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip_norm)
                    optimizer.step()
                    interval.append(stats)
                    self.steps_done += 1
                    report.steps += 1
                    if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                        entry = {
                            "step": step + 1,
                            "steps": config.steps,
                            "epoch": (step + 1) * config.batch_size / len(samples),
                            **{k: float(np.mean([s[k] for s in interval])) for k in interval[0]},
                            "lr": config.learning_rate * factor,
                            "seconds": time.perf_counter() - started,
                        }
                        interval = []
                        report.history.append(entry)
                        if progress is not None:
                            progress(entry)
            finally:
                report.seconds = time.perf_counter() - started
                if config.lora_rank > 0:
                    self._merge_lora()
                model.requires_grad_(False)
                model.eval()
        return report

    def _step(
        self, batch: list[_Sample], images: list[TrainingImage], rng: np.random.Generator
    ) -> dict:
        """Forward and backward of one batch (per-image micro-batches with LoRA); returns the
        batch means of the loss terms and the served IoU."""
        config = self.config
        device = self._model.device
        lora = config.lora_rank > 0
        if lora:  # one micro-batch per image: the encoder runs with gradients
            chunks: dict[int, list[_Sample]] = {}
            for sample in batch:
                chunks.setdefault(sample.image_index, []).append(sample)
            parts = list(chunks.values())
        else:
            parts = [batch]
        totals: dict[str, float] = {}
        for part in parts:
            if lora:
                tensor = image_to_tensor(images[part[0].image_index].image, device)
                part_embeddings = self._model.get_image_embeddings(tensor).expand(
                    len(part), -1, -1, -1
                )
            else:  # stacked per step (a normal tensor, even from inference-mode embeddings)
                stored = [images[sample.image_index].embedding for sample in part]
                part_embeddings = torch.cat(stored).to(device=device, dtype=torch.float32)
            prompts = self._simulate_prompts(part, part_embeddings.detach(), rng)
            loss, stats = self._loss(part, prompts, part_embeddings)
            (loss * len(part) / config.batch_size).backward()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value * len(part) / len(batch)
        return totals

    def _simulate_prompts(
        self, batch: list[_Sample], embeddings: torch.Tensor, rng: np.random.Generator
    ) -> list[Prompt]:
        """First prompts, then corrective clicks from the model's current served masks."""
        config = self.config
        prompts = []
        rounds = []
        for sample in batch:
            prompt = initial_prompt(
                sample.mask,
                rng,
                config.box_probability,
                config.max_initial_clicks,
                config.single_click_probability,
                config.box_noise_fraction,
                config.box_max_noise,
            )
            prompts.append(prompt)
            rounds.append(
                int(rng.integers(0, min(config.corrective_rounds, room_for_clicks(prompt)) + 1))
            )
        for round_index in range(1, max(rounds, default=0) + 1):
            active = [i for i, count in enumerate(rounds) if count >= round_index]
            with torch.no_grad():
                masks = self._served_masks(
                    embeddings[active],
                    [prompts[i] for i in active],
                    [batch[i].size for i in active],
                )
            for i, predicted in zip(active, masks, strict=True):
                click = corrective_click(batch[i].target, predicted, rng)
                if click is None:
                    rounds[i] = round_index - 1
                    continue
                (x, y), label = click
                height, width = batch[i].size
                point = (x * width / LOW_RES_SIZE, y * height / LOW_RES_SIZE)
                prompts[i] = add_click(prompts[i], point, label)
        return prompts

    def _decode(
        self,
        embeddings: torch.Tensor,
        prompts: list[Prompt],
        sizes: list[tuple[int, int]],
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (n, K, 256, 256) and predicted IoU (n, K) for one prompt per row."""
        points, labels = prompt_tokens(prompts, sizes)
        device = self._model.device
        logits, iou = self._model.predict_masks(
            embeddings,
            torch.from_numpy(points).to(device),
            torch.from_numpy(labels).to(device),
            multimask,
            1024,
            1024,
        )
        return logits[:, 0], iou[:, 0]

    def _groups(self, prompts: list[Prompt]) -> list[tuple[bool, list[int]]]:
        multi = [i for i, prompt in enumerate(prompts) if is_multimask(prompt)]
        single = [i for i, prompt in enumerate(prompts) if not is_multimask(prompt)]
        return [(flag, rows) for flag, rows in ((True, multi), (False, single)) if rows]

    def _served_masks(
        self, embeddings: torch.Tensor, prompts: list[Prompt], sizes: list[tuple[int, int]]
    ) -> list[np.ndarray]:
        """(256, 256) bool masks as served: best predicted IoU of 3 for one click, else single."""
        masks: list[np.ndarray | None] = [None] * len(prompts)
        for multimask, rows in self._groups(prompts):
            logits, iou = self._decode(
                embeddings[rows], [prompts[i] for i in rows], [sizes[i] for i in rows], multimask
            )
            best = logits[torch.arange(len(rows)), iou.argmax(dim=1)]
            for row, mask in zip(
                rows, (best >= self._model.mask_threshold).cpu().numpy(), strict=True
            ):
                masks[row] = mask
        return masks

    def _loss(
        self, batch: list[_Sample], prompts: list[Prompt], embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        config = self.config
        device = self._model.device
        total = torch.zeros((), device=device)
        sums = {"loss": 0.0, "focal": 0.0, "dice": 0.0, "iou_mse": 0.0, "train_iou": 0.0}
        for multimask, rows in self._groups(prompts):
            logits, iou = self._decode(
                embeddings[rows],
                [prompts[i] for i in rows],
                [batch[i].size for i in rows],
                multimask,
            )
            targets = torch.from_numpy(np.stack([batch[i].target for i in rows])).to(device)
            out = segmentation_loss(
                logits,
                iou,
                targets,
                config.focal_weight,
                config.dice_weight,
                config.iou_weight,
                config.iou_on_all_candidates,
            )
            share = len(rows) / len(batch)
            total = total + out.total * share
            sums["loss"] += float(out.total.detach()) * share
            sums["focal"] += float(out.focal.mean()) * share
            sums["dice"] += float(out.dice.mean()) * share
            sums["iou_mse"] += float(out.iou_mse.mean()) * share
            sums["train_iou"] += float(out.served_iou.mean()) * share
        return total, sums
