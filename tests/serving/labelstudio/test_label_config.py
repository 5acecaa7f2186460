"""Which controls a label config offers."""

from __future__ import annotations

import pytest

from serving.labelstudio.label_config import LabelConfigError, parse_label_config
from tests.http_fixtures import BRUSH_CONFIG


def test_brush_config():
    config = parse_label_config(BRUSH_CONFIG)
    assert config.image_name == "image" and config.image_data_key == "image"
    assert config.output.tag == "BrushLabels" and config.output.name == "tag"
    assert config.output.labels == ("Object", "Car")
    assert set(config.prompt_controls) == {"tag", "tag2", "tag3"}
    assert config.output.label_for("Car") == "Car"
    assert config.output.label_for("Truck") == "Object"  # not in the output control
    assert config.output.label_for(None) == "Object"


def test_polygon_and_bitmask_configs():
    polygon = parse_label_config(
        '<View><Image name="img" value="$photo"/><PolygonLabels name="p" toName="img">'
        '<Label value="Cell"/></PolygonLabels><KeyPointLabels name="k" toName="img" smart="true">'
        '<Label value="Cell"/></KeyPointLabels></View>'
    )
    assert polygon.output.tag == "PolygonLabels" and polygon.image_data_key == "photo"
    bitmask = parse_label_config(
        '<View><Image name="img" value="$image"/><BitmaskLabels name="b" toName="img">'
        '<Label value="A"/></BitmaskLabels></View>'
    )
    assert bitmask.output.result_type == "bitmasklabels"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("", "empty"),
        ("<View><Image", "cannot parse"),
        (
            '<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="A"/>'
            "</Labels></View>",
            "no <Image>",
        ),
        (
            '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
            '<Label value="A"/></RectangleLabels></View>',
            "nothing to write masks to",
        ),
    ],
)
def test_unusable_configs(config, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(config)
