"""The job contract between the shells and the serving core: one struct per job request and the
fixed-shape results. A request is built once on the calling side, travels as
``msgspec.to_builtins(request)`` (JSON through Redis, :mod:`serving.serialization`) and is
validated once at the job boundary (:func:`parse_request`)."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Protocol, TypeVar

import msgspec

from efficientsam.prompts import Prompt
from serving.labelstudio.context import MAX_IMAGE_PIXELS, InteractivePrompt
from serving.labelstudio.label_config import OutputControl, ProjectConfig
from serving.labelstudio.tasks import image_url, task_rectangles

Pixels = Annotated[int, msgspec.Meta(gt=0)]
TaskId = int | str | None  # the LS task id, as LS sent it
AutolabelMode = Literal["auto", "boxes", "everything"]
R = TypeVar("R", bound=msgspec.Struct)


class Contract(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of the request structs (each also ``kw_only``: fields by name, in any order). A field
    this service does not know is refused: a typo fails the job instead of being ignored."""


class InvalidRequest(Exception):
    """A job request that does not match its struct: the job fails with this message."""


def parse_request(payload: object, kind: type[R]) -> R:
    """``payload`` (the JSON of a ``kind``, or a ``kind``) as a ``kind``; InvalidRequest with
    what is wrong and where (``$.size[0]``) otherwise."""
    try:
        return msgspec.convert(payload, kind)
    except msgspec.ValidationError as error:
        raise InvalidRequest(f"invalid {kind.__name__}: {error}") from None


# -- parts -----------------------------------------------------------------------------------------
class PromptSpec(Contract, kw_only=True):
    """Clicks and an optional box in pixels of an image of some (width, height)."""

    points: list[tuple[float, float]] = []  # (x, y)
    labels: list[int] = []  # 1 positive / 0 negative, one per point, oldest first
    box: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1)

    @classmethod
    def from_prompt(cls, prompt: Prompt) -> PromptSpec:
        return cls(
            points=[(x, y) for x, y in prompt.points.tolist()],
            labels=prompt.labels.tolist(),
            box=None if prompt.box is None else tuple(float(v) for v in prompt.box),
        )

    def in_image(self, size: tuple[int, int], image_size: tuple[int, int]) -> Prompt:
        """The prompt, given in pixels of a ``size`` = (width, height) image (the browser's), in
        pixels of an ``image_size`` one (the downloaded file). ValueError if it is no prompt."""
        sx, sy = image_size[0] / size[0], image_size[1] / size[1]
        points = [(x * sx, y * sy) for x, y in self.points]
        box = None
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        return Prompt.create(points or None, self.labels or None, box)


class OutputSpec(Contract, kw_only=True):
    """The control the masks are written to (:class:`OutputControl`)."""

    tag: str  # BrushLabels / BitmaskLabels / PolygonLabels
    name: str
    to_name: str
    labels: list[str] = []

    @classmethod
    def from_control(cls, control: OutputControl) -> OutputSpec:
        return cls(
            tag=control.tag, name=control.name, to_name=control.to_name, labels=list(control.labels)
        )

    def control(self) -> OutputControl:
        return OutputControl(self.tag, self.name, self.to_name, tuple(self.labels))


class BoxSpec(Contract, kw_only=True):
    """One rectangle of a task, in pixels of ``size`` = (width, height), and its label."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1)
    size: tuple[Pixels, Pixels]
    label: str | None = None

    def in_image(self, image_size: tuple[int, int]) -> Prompt:
        """The box as a prompt in pixels of an ``image_size`` image."""
        return PromptSpec(box=self.box).in_image(self.size, image_size)


class TaskSpec(Contract, kw_only=True):
    id: TaskId = None
    image: str  # the task's image URL
    boxes: list[BoxSpec] = []  # its rectangles (latest annotation with some, else prediction)


# -- requests --------------------------------------------------------------------------------------
class SegmentRequest(Contract, kw_only=True):
    """One interactive prompt -> one LS prediction with the best mask at ``size``."""

    project: str | None = None
    task: TaskId = None
    image: str
    size: tuple[Pixels, Pixels]  # (width, height) the prompt's pixels refer to
    prompt: PromptSpec
    output: OutputSpec
    label: str | None = None  # the prompt's label (else the output control's first)
    dropped_items: Annotated[int, msgspec.Meta(ge=0)] = 0  # older rectangles left out
    model_version: str | None = None  # served exactly; None: the project's current version


class AutolabelRequest(Contract, kw_only=True):
    """A task's prediction without prompts: its rectangles as masks, or "segment everything".
    ``write_back``: written to LS through the API (a queued batch job) instead of returned."""

    project: str | None = None
    task: TaskSpec
    mode: AutolabelMode = "auto"
    points_per_side: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: the device's default grid
    output: OutputSpec
    model_version: str | None = None
    write_back: bool = False


class PrewarmRequest(Contract, kw_only=True):
    """A task's image embedding computed and cached, so that the first click is fast."""

    project: str | None = None
    task: TaskId = None
    image: str


class FinetuneRequest(Contract, kw_only=True):
    project: str
    trigger: str = "manual"  # why (recorded in the run's history)


class SamiRequest(Contract, kw_only=True):
    """A project's SAMI run: the served model teaches a Ti student, then the fine-tune."""

    project: str
    trigger: str = "manual"  # why (recorded in the run's history)
    # a run for the project's annotations (its train_mode is sami): it takes their count, as a
    # fine-tune does; the timed trigger (sami_every_hours) leaves the count to the fine-tune
    takes_annotation_count: bool = True


class HousekeepingRequest(Contract, kw_only=True):
    """Periodic upkeep: expired shared-cache entries pruned, the registry re-published."""


# -- results ---------------------------------------------------------------------------------------
# Job functions return builtins (msgspec.to_builtins of these). Predictions (LS result items whose
# brush RLE is a numpy array, which JobSerializer carries as one) and autolabel's write-back
# summaries stay dicts: their shapes are LS's, and a struct would add a conversion, no check.
class ErrorResult(msgspec.Struct, kw_only=True):
    """An expected failure (image, prompt, label config, version): ``status`` for LS."""

    error: str
    status: int


class PrewarmResult(msgspec.Struct, kw_only=True):
    task: TaskId
    cached: bool
    encoder_seconds: float


class HousekeepingResult(msgspec.Struct, kw_only=True):
    pruned_cache_entries: int
    republished_registry: bool


# -- building requests (the calling side) ----------------------------------------------------------
def segment_request(
    project: str | None,
    task: dict,
    config: ProjectConfig,
    prompt: InteractivePrompt,
    version: str,
) -> SegmentRequest:
    """The ``segment`` request for a prompt on one LS task (TaskError: no image URL)."""
    return SegmentRequest(
        project=project,
        task=task.get("id"),
        image=image_url(task, config),
        size=prompt.size,
        prompt=PromptSpec.from_prompt(prompt.prompt),
        output=OutputSpec.from_control(config.output),
        label=prompt.label,
        dropped_items=prompt.dropped_items,
        model_version=version,
    )


def autolabel_request(
    project: str | None,
    task: dict,
    config: ProjectConfig,
    mode: AutolabelMode,
    points_per_side: int,
    version: str,
    write_back: bool,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> AutolabelRequest:
    """The ``autolabel`` request for one LS task (TaskError: no image URL; PromptError: a
    rectangle over ``max_pixels``)."""
    boxes = task_rectangles(task, config.image_name, max_pixels)
    return AutolabelRequest(
        project=project,
        task=TaskSpec(
            id=task.get("id"),
            image=image_url(task, config),
            boxes=[BoxSpec(box=b.box, size=b.size, label=b.label) for b in boxes],
        ),
        mode=mode,
        points_per_side=points_per_side,
        output=OutputSpec.from_control(config.output),
        model_version=version,
        write_back=write_back,
    )


class Submitter(Protocol):
    """What queues a job without waiting for it (every ``serving.transports.Transport``)."""

    def submit(
        self,
        job: str,
        request: msgspec.Struct,
        job_id: str | None = None,
        at_front: bool = False,
        description: str | None = None,
    ) -> str | None:
        """Start job ``job`` (a name in ``serving.jobs.JOBS``) on ``request`` without waiting;
        the job id if it was queued (or found queued or running under ``job_id``)."""


def finetune_job_id(project: str) -> str:
    """At most one fine-tune per project queued or running ("Start training" twice: one job)."""
    return f"finetune-p{project}"


def submit_finetune(submitter: Submitter, project: str, trigger: str) -> str | None:
    """Queue the project's fine-tune on ``train`` (or find it already queued or running);
    returns the job id. ``trigger`` says why (recorded in the run's history)."""
    return submitter.submit(
        "finetune",
        FinetuneRequest(project=project, trigger=trigger),
        finetune_job_id(project),
        False,
        f"fine-tune project {project}",
    )


TRAIN_MODES = ("finetune", "sami")  # a project's "train_mode" (extra_params); the first: default


def sami_job_id(project: str) -> str:
    """At most one SAMI run per project queued or running."""
    return f"sami-p{project}"


def submit_sami(
    submitter: Submitter, project: str, trigger: str, takes_annotation_count: bool = True
) -> str | None:
    """Queue the project's SAMI run on ``train`` (or find it already queued or running)."""
    return submitter.submit(
        "sami",
        SamiRequest(
            project=project, trigger=trigger, takes_annotation_count=takes_annotation_count
        ),
        sami_job_id(project),
        False,
        f"SAMI run of project {project}",
    )


def train_mode(params: dict) -> str:
    """The project's training mode from its ``extra_params`` (``{"train_mode": "sami"}``);
    anything else is the decoder fine-tune."""
    mode = params.get("train_mode") if isinstance(params, dict) else None
    return mode if mode in TRAIN_MODES else TRAIN_MODES[0]


def submit_training(submitter: Submitter, project: str, mode: str, trigger: str) -> str | None:
    """Queue the project's training run of ``mode`` (:data:`TRAIN_MODES`); the job id."""
    submit = submit_sami if mode == "sami" else submit_finetune
    return submit(submitter, project, trigger)


def autolabel_job_id(project: str | None, task_id: object, version: str) -> str:
    """One batch job per (project, task, version): a second "Retrieve predictions" or CLI run
    finds it queued or running and does not add another. (RQ ids allow letters, digits, _ and
    -: the ``+`` of fine-tuned versions becomes ``_``.)"""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"autolabel-p{project}-t{task_id}-{version}")
