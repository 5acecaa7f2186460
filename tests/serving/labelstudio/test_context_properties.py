"""parse_context on arbitrary JSON-like input: a prompt, None, or PromptError; nothing else.

Items are drawn field by field (the fields LS sends, each with any JSON value, right types
often enough to get past the first checks), plus fully arbitrary JSON values."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from efficientsam.prompts import Prompt
from serving.labelstudio.context import InteractivePrompt, PromptError, parse_context

DEEP: list = []
for _ in range(1020):  # orjson accepts 1024 levels; repr() of this one raises RecursionError
    DEEP = [DEEP]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**400), 10**400)
    | st.just(DEEP)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
SIZE = st.integers(-2, 40) | st.sampled_from([0, 10**9, 2**63]) | JSON
PERCENT = st.floats(-5, 105) | st.sampled_from([math.nan, math.inf, -math.inf, 1e308]) | JSON
VALUE = st.fixed_dictionaries(
    {},
    optional={
        "x": PERCENT,
        "y": PERCENT,
        "width": PERCENT,
        "height": PERCENT,
        "rotation": PERCENT,
        "positive": JSON,
        "labels": st.lists(st.text(max_size=4), max_size=2) | JSON,
        "keypointlabels": JSON,
        "rle": st.lists(st.integers(0, 255), max_size=40) | JSON,
    },
)
ITEM = st.fixed_dictionaries(
    {"type": st.sampled_from(["keypointlabels", "rectanglelabels", "brushlabels", "choices"])},
    optional={
        "original_width": SIZE,
        "original_height": SIZE,
        "value": VALUE | JSON,
        "is_positive": JSON,
        "from_name": JSON,
        "to_name": JSON,
    },
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.lists(ITEM | JSON, max_size=5) | JSON)
def test_any_json_gives_a_prompt_none_or_prompt_error(result):
    try:
        prompt = parse_context(result, max_pixels=40 * 40)
    except PromptError:
        return
    assert prompt is None or isinstance(prompt, InteractivePrompt)
    if prompt is not None:
        assert isinstance(prompt.prompt, Prompt)
        assert all(math.isfinite(v) for v in prompt.prompt.points.ravel().tolist())
