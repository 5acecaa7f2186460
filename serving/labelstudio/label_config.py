"""What a project's label config offers: the image, the output control and the prompt tools."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

OUTPUT_TAGS = ("BrushLabels", "BitmaskLabels", "PolygonLabels")  # in order of preference
PROMPT_TAGS = ("KeyPointLabels", "RectangleLabels", "BrushLabels")
# A config with 10,000 labels is ~0.6 MB; the cache below keeps up to 64 configs.
MAX_LABEL_CONFIG_CHARS = 1024**2
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class LabelConfigError(ValueError):
    """The label config cannot be used by this backend (message is shown to the user)."""


@dataclass(frozen=True)
class OutputControl:
    """The control whose results the backend writes: tag, name, image it points to, labels."""

    tag: str
    name: str
    to_name: str
    labels: tuple[str, ...]

    @property
    def result_type(self) -> str:
        return self.tag.lower()  # brushlabels / bitmasklabels / polygonlabels

    def label_for(self, requested: str | None) -> str:
        """The prompt's label when this control has it, else the control's first label."""
        if requested is not None and requested in self.labels:
            return requested
        if not self.labels:
            raise LabelConfigError(f"<{self.tag} name={self.name!r}> has no <Label> values")
        return self.labels[0]


@dataclass(frozen=True)
class ProjectConfig:
    """Parsed label config: the image object, its data key, and the output control."""

    image_name: str
    image_data_key: str  # task["data"][image_data_key] holds the image URL
    output: OutputControl
    prompt_controls: tuple[str, ...]  # control names usable as smart prompts


def parse_label_config(label_config: object) -> ProjectConfig:
    """Parse (cached per config text) with the SDK's LabelInterface (lxml). Refused before
    parsing: configs over ``MAX_LABEL_CONFIG_CHARS`` and any with a DTD (``<!DOCTYPE``,
    ``<!ENTITY``: entity expansion; LS configs have none)."""
    if not isinstance(label_config, str):
        raise LabelConfigError("label_config must be a string (the project's XML)")
    if not label_config.strip():
        raise LabelConfigError("empty label config")
    if len(label_config) > MAX_LABEL_CONFIG_CHARS:
        raise LabelConfigError(
            f"label config of {len(label_config)} characters is longer than "
            f"{MAX_LABEL_CONFIG_CHARS}"
        )
    if _DTD.search(label_config):
        raise LabelConfigError("label config must not contain a DTD (<!DOCTYPE or <!ENTITY)")
    return _parse(label_config)


@functools.lru_cache(maxsize=64)
def _parse(label_config: str) -> ProjectConfig:
    try:
        interface = LabelInterface(label_config)
    except Exception as error:  # the SDK raises several XML/validation errors
        raise LabelConfigError(f"cannot parse label config: {error}") from error
    images = {obj.name: obj for obj in interface.objects if obj.tag == "Image"}
    if not images:
        raise LabelConfigError("label config has no <Image> tag")
    candidates = [c for c in interface.controls if c.tag in OUTPUT_TAGS]
    candidates = [c for c in candidates if any(name in images for name in c.to_name)]
    if not candidates:
        raise LabelConfigError(
            "label config has no BrushLabels, BitmaskLabels or PolygonLabels control on an "
            "<Image>: nothing to write masks to"
        )
    candidates.sort(key=lambda c: OUTPUT_TAGS.index(c.tag))
    chosen = candidates[0]
    image_name = next(name for name in chosen.to_name if name in images)
    image = images[image_name]
    data_key = (image.value or "").lstrip("$")
    if not data_key:
        raise LabelConfigError(f'<Image name={image_name!r}> has no value="$..."')
    prompts = tuple(
        c.name for c in interface.controls if c.tag in PROMPT_TAGS and image_name in c.to_name
    )
    output = OutputControl(chosen.tag, chosen.name, image_name, tuple(chosen.labels or ()))
    return ProjectConfig(image_name, data_key, output, prompts)
