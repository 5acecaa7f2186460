"""SAMI distillation (the EfficientSAM paper's masked-image pretraining, feature targets): a Ti
student encoder learns a teacher encoder's embeddings from 25% of its patches through a
cross-attention decoder, then its full encoder (ViT + neck) is aligned unmasked.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..arrays import image_content_hash, mask_iou
from ..build import build_efficient_sam
from ..modeling import EfficientSam
from ..modeling.image_encoder import ImageEncoderViT, Mlp
from ..utils import image_to_tensor
from .trainer import warmup_cosine_factor

TEACHER_CHANNELS = 256


@dataclass
class SamiConfig:
    """Hyper-parameters of both stages.

    steps: masked-pretraining steps of ``batch_size`` images; ``mask_ratio`` of the 64x64 tokens
    are hidden per image (the same count for every image). The decoder has ``decoder_depth``
    cross-attention blocks of width ``decoder_width`` (the paper: 8 x 512; the default is small
    for CPUs). AdamW (``betas``, ``weight_decay`` on matrices only) at ``learning_rate``, linear
    warm-up over ``warmup_steps``, cosine decay to ``final_lr_fraction``, gradient norm clipped
    at ``grad_clip_norm``. align_steps: unmasked steps training the whole student encoder
    (ViT + neck) on the teacher's embeddings, at ``align_learning_rate`` (default the same).
    """

    steps: int = 200
    batch_size: int = 2
    mask_ratio: float = 0.75
    decoder_depth: int = 2
    decoder_width: int = 256
    decoder_heads: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    final_lr_fraction: float = 0.0
    grad_clip_norm: float | None = 1.0
    seed: int = 0
    align_steps: int = 20
    align_learning_rate: float | None = None
    log_every: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "decoder_depth", "decoder_width", "decoder_heads", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.align_steps < 0 or self.warmup_steps < 0:
            raise ValueError("steps, align_steps and warmup_steps must be >= 0")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_width % self.decoder_heads:
            raise ValueError("decoder_width must be a multiple of decoder_heads")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def teacher_embeddings(
    teacher: EfficientSam,
    images: Sequence[np.ndarray],
    cache: MutableMapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The teacher's (1, 256, 64, 64) float32 CPU embeddings of HxWx3 uint8 RGB ``images``,
    computed once per image: ``cache`` (keyed by :func:`image_content_hash`) is read and filled."""
    cache = {} if cache is None else cache
    out = []
    for image in images:
        key = image_content_hash(image)
        if key not in cache:
            with torch.no_grad():
                tensor = image_to_tensor(image, teacher.device)
                cache[key] = teacher.eval().get_image_embeddings(tensor).float().cpu()
        out.append(cache[key])
    return out


def sincos_position_embedding(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine/cosine position codes, (grid * grid, width): half the channels encode the
    row, half the column, each as sin/cos at geometric frequencies."""
    if width % 4:
        raise ValueError(f"width must be a multiple of 4, got {width}")
    quarter = width // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid, dtype=torch.float64)
    angles = coords[:, None] * frequencies[None]  # (grid, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, width / 2)
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, width).float()


class CrossAttentionBlock(nn.Module):
    """Queries attend to keys/values (pre-norm), then an MLP: (B, Nq, W), (B, Nk, W) -> (B, Nq, W)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(width, eps=1e-6)
        self.norm_context = nn.LayerNorm(width, eps=1e-6)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = self.norm_context(context)
        attended, _ = self.attention(self.norm_query(queries), context, context, need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.norm_mlp(queries))


class SamiDecoder(nn.Module):
    """Reconstructs all tokens from the visible tokens' encoder outputs.

    Masked positions start as a learned mask token plus a fixed position code; each block lets
    them attend to [visible outputs; current masked tokens]. Visible outputs (projected) are kept
    as anchors; all tokens go back to grid order and a linear head maps them to the teacher's
    channels. Returns (B, N, 256).
    """

    def __init__(self, encoder_dim: int, width: int, depth: int, heads: int, grid: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("position", sincos_position_embedding(grid, width), persistent=False)
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, TEACHER_CHANNELS)

    def forward(
        self, visible: torch.Tensor, visible_index: torch.Tensor, masked_index: torch.Tensor
    ) -> torch.Tensor:
        batch = visible.shape[0]
        width = self.mask_token.shape[-1]
        position = self.position.to(visible.dtype)
        anchors = self.input_proj(visible) + position[visible_index]
        queries = self.mask_token.expand(batch, masked_index.shape[1], -1) + position[masked_index]
        for block in self.blocks:
            queries = block(queries, torch.cat([anchors, queries], dim=1))
        num_tokens = visible_index.shape[1] + masked_index.shape[1]
        tokens = anchors.new_zeros(batch, num_tokens, width)
        tokens = tokens.scatter(1, visible_index[..., None].expand(-1, -1, width), anchors)
        tokens = tokens.scatter(1, masked_index[..., None].expand(-1, -1, width), queries)
        return self.head(self.norm(tokens))


def encode_visible(
    encoder: ImageEncoderViT, images: torch.Tensor, visible_index: torch.Tensor
) -> torch.Tensor:
    """The encoder's blocks on the visible tokens only: (B, 3, 1024, 1024) normalised images,
    (B, Nv) token indices (row-major on the 64x64 grid) -> (B, Nv, C). Every block attends
    globally with absolute position embeddings added once, so a subset of tokens is a valid
    input; the neck (a 3x3 conv on the full grid) is not applied."""
    tokens = encoder.patch_embed(images).permute(0, 2, 3, 1)
    tokens = tokens + encoder.resized_pos_embed().to(tokens.dtype)
    batch, height, width, channels = tokens.shape
    tokens = tokens.reshape(batch, height * width, channels)
    tokens = tokens.gather(1, visible_index[..., None].expand(-1, -1, channels))
    for block in encoder.blocks:
        tokens = block(tokens)
    return tokens


def random_token_split(
    batch: int, num_tokens: int, mask_ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, a random (visible, masked) split of the token indices, each sorted:
    (B, Nv) and (B, Nm) int64 with Nm = round(mask_ratio * N), the same for every image."""
    num_masked = min(num_tokens - 1, max(1, round(mask_ratio * num_tokens)))
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    visible = order[:, num_masked:].sort(dim=1).values
    masked = order[:, :num_masked].sort(dim=1).values
    return visible, masked


def _tokens(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, 256, 64, 64) -> (B, 4096, 256)."""
    return embeddings.flatten(2).transpose(1, 2)


def _adamw(
    named: Sequence[tuple[str, nn.Parameter]], config: SamiConfig, lr: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, tokens, position tables)."""
    decay, no_decay = [], []
    for name, parameter in named:
        is_table = "pos_embed" in name or "mask_token" in name
        (decay if parameter.dim() >= 2 and not is_table else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(config.betas))


@dataclass
class SamiReport:
    """History entries (stage "sami" or "align": step, steps, loss, lr, seconds) and the
    seconds each stage took."""

    history: list[dict] = field(default_factory=list)
    sami_seconds: float = 0.0
    align_seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def seconds_per_step(self, stage: str) -> float:
        """Mean seconds of one step of ``stage`` ("sami" or "align"); 0.0 if it did not run."""
        steps = self.config.get("steps" if stage == "sami" else "align_steps", 0)
        seconds = self.sami_seconds if stage == "sami" else self.align_seconds
        return seconds / steps if steps else 0.0


class SamiDistiller:
    """Trains a copy of ``student``'s image encoder (the given model is never modified).

    Masked pretraining trains the ViT (patch embedding, position table, blocks) and the decoder;
    the neck trains only in the alignment stage. Typical use::

        targets = teacher_embeddings(teacher, images, cache)
        distiller = SamiDistiller(student, SamiConfig(steps=200, align_steps=20))
        report = distiller.fit(images, targets, progress=print)
        model = distiller.result_model(teacher)  # student encoder, teacher's decoder
    """

    def __init__(self, student: EfficientSam, config: SamiConfig) -> None:
        self.config = config
        self.student = copy.deepcopy(student).float().eval()
        self.student.requires_grad_(False)
        encoder = self.student.image_encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.decoder = SamiDecoder(
                encoder.patch_embed.proj.out_channels,
                config.decoder_width,
                config.decoder_depth,
                config.decoder_heads,
                encoder.image_embedding_size,
            ).to(self.student.device)
        self._mask_generator = torch.Generator().manual_seed(config.seed)
        self._rng = np.random.default_rng(config.seed)

    @property
    def encoder(self) -> ImageEncoderViT:
        return self.student.image_encoder

    def _batch(self, images: Sequence[np.ndarray], indices: Sequence[int]) -> torch.Tensor:
        """(B, 3, 1024, 1024) normalised input of the chosen images."""
        device = self.student.device
        return torch.cat(
            [self.student.preprocess(image_to_tensor(images[i], device)) for i in indices]
        )

    def masked_loss(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """MSE over all tokens of the decoder's reconstruction against the teacher's tokens:
        normalised (B, 3, 1024, 1024) images, (B, 256, 64, 64) targets."""
        num_tokens = self.encoder.image_embedding_size**2
        visible, masked = random_token_split(
            images.shape[0], num_tokens, self.config.mask_ratio, generator
        )
        visible, masked = visible.to(images.device), masked.to(images.device)
        predicted = self.decoder(encode_visible(self.encoder, images, visible), visible, masked)
        return F.mse_loss(predicted, _tokens(targets.to(predicted)))

    def aligned_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MSE of the full (unmasked) student encoder's embeddings against the teacher's."""
        return F.mse_loss(self.encoder(images), targets.to(images))

    def fit(
        self,
        images: Sequence[np.ndarray],
        targets: Sequence[torch.Tensor],
        progress: Callable[[dict], None] | None = None,
    ) -> SamiReport:
        """Masked pretraining (``config.steps``), then alignment (``config.align_steps``) on
        HxWx3 uint8 ``images`` and their teacher ``targets`` (1, 256, 64, 64) each."""
        if len(images) != len(targets) or not images:
            raise ValueError("need one teacher embedding per image, and at least one image")
        config = self.config
        report = SamiReport(config=asdict(config))
        encoder_params = [
            (name, p) for name, p in self.encoder.named_parameters() if not name.startswith("neck")
        ]
        named = encoder_params + [(f"decoder.{n}", p) for n, p in self.decoder.named_parameters()]
        report.sami_seconds = self._run_stage(
            "sami", named, config.steps, config.learning_rate, images, targets, report, progress
        )
        all_encoder = list(self.encoder.named_parameters())
        align_lr = config.align_learning_rate or config.learning_rate
        report.align_seconds = self._run_stage(
            "align", all_encoder, config.align_steps, align_lr, images, targets, report, progress
        )
        return report

    def _run_stage(
        self,
        stage: str,
        named: list[tuple[str, nn.Parameter]],
        steps: int,
        lr: float,
        images: Sequence[np.ndarray],
        targets: Sequence[torch.Tensor],
        report: SamiReport,
        progress: Callable[[dict], None] | None,
    ) -> float:
        if steps == 0:
            return 0.0
        config = self.config
        parameters = [p for _, p in named]
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = _adamw(named, config, lr)
        warmup = min(config.warmup_steps, steps // 2)
        order: list[int] = []
        started = time.perf_counter()
        self.student.train()
        self.decoder.train()
        try:
            for step in range(steps):
                factor = warmup_cosine_factor(step, steps, warmup, config.final_lr_fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr * factor
                chosen = []
                while len(chosen) < min(config.batch_size, len(images)):
                    if not order:
                        order = self._rng.permutation(len(images)).tolist()
                    chosen.append(order.pop())
                batch = self._batch(images, chosen)
                batch_targets = torch.cat([targets[i] for i in chosen]).to(batch.device)
                optimizer.zero_grad(set_to_none=True)
                if stage == "sami":
                    loss = self.masked_loss(batch, batch_targets, self._mask_generator)
                else:
                    loss = self.aligned_loss(batch, batch_targets)
                loss.backward()
                if config.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip_norm)
                optimizer.step()
                if (step + 1) % config.log_every == 0 or step + 1 == steps:
                    entry = {
                        "stage": stage,
                        "step": step + 1,
                        "steps": steps,
                        "loss": float(loss.detach()),
                        "lr": lr * factor,
                        "seconds": time.perf_counter() - started,
                    }
                    report.history.append(entry)
                    if progress is not None:
                        progress(entry)
        finally:
            for parameter in parameters:
                parameter.requires_grad_(False)
            self.student.eval()
            self.decoder.eval()
        return time.perf_counter() - started

    def result_model(self, teacher: EfficientSam) -> EfficientSam:
        """A Ti-variant EfficientSam (eval, CPU) with the trained student encoder and the
        teacher's prompt encoder and mask decoder."""
        return combine_encoder_and_decoder(self.encoder, teacher)


def combine_encoder_and_decoder(encoder: ImageEncoderViT, teacher: EfficientSam) -> EfficientSam:
    """A Ti EfficientSam holding ``encoder``'s weights and ``teacher``'s prompt encoder and mask
    decoder (copies, on the CPU, eval mode)."""
    model = build_efficient_sam("ti")
    model.image_encoder.load_state_dict(
        {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    )
    model.prompt_encoder.load_state_dict(
        {k: v.detach().cpu() for k, v in teacher.prompt_encoder.state_dict().items()}
    )
    model.mask_decoder.load_state_dict(
        {k: v.detach().cpu() for k, v in teacher.mask_decoder.state_dict().items()}
    )
    return model.eval()


# -- held-out metrics -----------------------------------------------------------------------


def agreement_prompts(
    size: tuple[int, int], seed: int, clicks: int = 3, boxes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic prompts for an (H, W) image: ``clicks`` single clicks (x, y) in pixels,
    (clicks, 2), and ``boxes`` boxes (x0, y0, x1, y1), (boxes, 4), each side 20-60% of the image."""
    height, width = size
    rng = np.random.default_rng([seed, height, width])
    points = rng.uniform([0, 0], [width, height], size=(clicks, 2))
    sides = rng.uniform(0.2, 0.6, size=(boxes, 2)) * [width, height]
    corners = rng.uniform(0, 1, size=(boxes, 2)) * ([width, height] - sides)
    return points, np.concatenate([corners, corners + sides], axis=1)


def _served_low_res_masks(
    model: EfficientSam,
    embedding: torch.Tensor,
    size: tuple[int, int],
    points: np.ndarray,
    boxes: np.ndarray,
) -> list[np.ndarray]:
    """(256, 256) bool masks as served: best of 3 (predicted IoU) per click, single per box."""
    height, width = size
    masks = []
    with torch.no_grad():
        if len(points):
            clicks = torch.from_numpy(points).float()[None, :, None, :]
            labels = torch.ones(1, len(points), 1)
            logits, iou = model.predict_masks(embedding, clicks, labels, True, height, width)
            best = logits[0, torch.arange(len(points)), iou[0].argmax(dim=1)]
            masks += list((best >= model.mask_threshold).cpu().numpy())
        if len(boxes):
            corners = torch.from_numpy(boxes).float().reshape(1, len(boxes), 2, 2)
            labels = torch.tensor([2.0, 3.0]).expand(1, len(boxes), 2)
            logits, _ = model.predict_masks(embedding, corners, labels, False, height, width)
            masks += list((logits[0, :, 0] >= model.mask_threshold).cpu().numpy())
    return masks


def embedding_metrics(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Per-token agreement of (N, 256, 64, 64) student and teacher embeddings: ``cosine`` (mean
    over tokens), ``centred_cosine`` (each side's per-channel mean over the N images removed
    first, so a constant embedding scores 0) and ``nmse`` (MSE / the teacher's per-channel
    variance: 1.0 for the teacher's per-channel mean)."""
    s = _tokens(student.double()).reshape(-1, TEACHER_CHANNELS)  # float64: exact centring
    t = _tokens(teacher.double()).reshape(-1, TEACHER_CHANNELS)
    cosine = F.cosine_similarity(s, t, dim=1, eps=1e-12).mean()
    s_centred, t_centred = s - s.mean(dim=0), t - t.mean(dim=0)
    centred = F.cosine_similarity(s_centred, t_centred, dim=1, eps=1e-12).mean()
    nmse = ((s - t) ** 2).mean() / (t_centred**2).mean().clamp_min(1e-12)
    return {"cosine": float(cosine), "centred_cosine": float(centred), "nmse": float(nmse)}


def held_out_metrics(
    encoder: ImageEncoderViT,
    teacher: EfficientSam,
    images: Sequence[np.ndarray],
    targets: Sequence[torch.Tensor],
    seed: int = 0,
) -> dict[str, float]:
    """:func:`embedding_metrics` of ``encoder``'s embeddings of ``images`` against the teacher's
    ``targets`` (any float dtype, e.g. float16 as a run keeps them), plus ``mask_agreement``: mean IoU of the served masks the teacher's decoder
    gives from teacher vs student embeddings, same prompts (:func:`agreement_prompts`)."""
    teacher = teacher.eval()
    encoder_was_training = encoder.training
    encoder.eval()
    students, ious = [], []
    try:
        for image, target in zip(images, targets, strict=True):
            with torch.no_grad():
                tensor = teacher.preprocess(image_to_tensor(image, teacher.device))
                student = encoder(tensor.to(next(encoder.parameters()).device)).float()
            student = student.to(teacher.device)
            students.append(student.cpu())
            size = image.shape[:2]
            points, boxes = agreement_prompts(size, seed)
            mine = _served_low_res_masks(teacher, student, size, points, boxes)
            reference = _served_low_res_masks(
                teacher, target.to(teacher.device, torch.float32), size, points, boxes
            )
            ious += [mask_iou(a, b) for a, b in zip(mine, reference, strict=True)]
    finally:
        encoder.train(encoder_was_training)
    metrics = embedding_metrics(torch.cat(students), torch.cat([t.cpu().float() for t in targets]))
    metrics["mask_agreement"] = float(np.mean(ious))
    return metrics


@dataclass
class SamiResult:
    """The distilled model (Ti encoder, teacher's decoder), the training report, and the
    held-out metrics of the student before and after."""

    model: EfficientSam
    report: SamiReport
    before: dict[str, float]
    after: dict[str, float]

    def metadata(self, teacher: str, student: str) -> dict[str, object]:
        """What a saved checkpoint records: the teacher and student init (names/paths), steps,
        config, seconds per step, metrics before and after."""
        return {
            "method": "sami",
            "teacher": teacher,
            "student_init": student,
            "steps": self.report.config.get("steps"),
            "align_steps": self.report.config.get("align_steps"),
            "config": self.report.config,
            "seconds_per_step": {
                "sami": self.report.seconds_per_step("sami"),
                "align": self.report.seconds_per_step("align"),
            },
            "metrics_before": self.before,
            "metrics_after": self.after,
        }


def distil(
    teacher: EfficientSam,
    student: EfficientSam,
    images: Sequence[np.ndarray],
    held_out: Sequence[np.ndarray],
    config: SamiConfig,
    cache: MutableMapping[str, torch.Tensor] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> SamiResult:
    """Teacher targets (cached), held-out metrics of the student at init, both SAMI stages,
    held-out metrics of the result. ``progress`` also gets {"stage": "teacher"|"metrics", ...}."""
    cache = {} if cache is None else cache

    def report(entry: Mapping[str, object]) -> None:
        if progress is not None:
            progress(dict(entry))

    report({"stage": "teacher", "images": len(images) + len(held_out)})
    targets = teacher_embeddings(teacher, images, cache)
    held_out_targets = teacher_embeddings(teacher, held_out, cache)
    report({"stage": "metrics", "when": "before"})
    before = held_out_metrics(
        student.image_encoder, teacher, held_out, held_out_targets, config.seed
    )
    distiller = SamiDistiller(student, config)
    training = distiller.fit(images, targets, progress)
    model = distiller.result_model(teacher)
    report({"stage": "metrics", "when": "after"})
    after = held_out_metrics(model.image_encoder, teacher, held_out, held_out_targets, config.seed)
    return SamiResult(model, training, before, after)
