"""The real Label Studio 1.23.2 editor in headless Chromium, connected to the backend in both
deployments: what a user clicks, what LS sends, what the backend counts, what the editor shows.

Chromium is Debian's ``chromium`` (``tests/run.sh`` installs it), driven by the ``playwright``
package through its executable path (``playwright install`` is never used). Per deployment: one
fresh project, one page load, "Auto-Annotation" on, then

1. a smart keypoint click -> one suggestion -> accept -> a brush region in the Regions panel;
2. a click and an Alt-click: the second request carries the negative point;
3. a smart rectangle drag -> a "Car" mask -> accept;
4. a smart-brush stroke -> a brush region and no request: LS 1.23.2's drawing tools (brush) create
   non-dynamic regions, which the editor never sends to the backend.

"Reset" empties the annotation between stages, so a random-weight mask covering the whole image
never swallows the next click. On failure a screenshot and the page's HTML are kept under
``test-artifacts/browser/`` (the paths are printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import (
    LS_PASSWORD,
    LS_USER,
    embedded_deployment,
    make_project,
    redis_deployment,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.browser]

REDIS_URL = os.environ.get("EFFICIENTSAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")
ENV = {"AUTOLABEL_POINTS_PER_SIDE": "4", "TORCH_THREADS": "2"}
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
INTERACTIVE = "interactive-annotating"


def chromium_path() -> str:
    path = os.environ.get("EFFICIENTSAM_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is missing: run the tests with tests/run.sh (installs it)")
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module", params=["embedded", "redis"])
def deployment(request, label_studio, tmp_path_factory) -> Iterator[str]:
    """The backend's URL, once its model is ready, in the deployment named by the parameter."""
    log_dir = tmp_path_factory.mktemp(f"browser-{request.param}")
    if request.param == "redis":
        with redis_deployment(label_studio, log_dir, REDIS_URL, ENV, ["interactive,batch"]) as up:
            yield up["url"]
        return
    with embedded_deployment(label_studio, log_dir, ENV, ready_seconds=120) as url:
        yield url


def interactive_ok(backend_url: str) -> float:
    """The backend's count of answered interactive requests (its /metrics)."""
    text = httpx.get(f"{backend_url}/metrics", timeout=10).text
    found = re.search(
        r'^backend_predictions_total\{kind="interactive",outcome="ok"\} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


class Editor:
    """The LS labeling page of one task, driven with the mouse as a user does."""

    def __init__(self, page, backend_url: str):
        self.page = page
        self.backend_url = backend_url
        self.sent: list[list[dict]] = []  # the prompt items of every interactive request
        page.on("request", self._record)

    def _record(self, request) -> None:
        if INTERACTIVE in request.url:
            self.sent.append(json.loads(request.post_data)["context"]["result"])

    def at(self, fx: float, fy: float) -> tuple[float, float]:
        """Page coordinates of a point given in fractions of the displayed image."""
        box = self.page.locator(".konvajs-content").bounding_box()
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    def label(self, control: int, name: str) -> None:
        """Selects label ``name`` of the ``control``-th labels control of the config."""
        self.page.locator(".lsf-labels").nth(control).get_by_text(name, exact=True).click()

    def smart_tool(self, name: str) -> None:
        self.page.locator(".lsf-toolbar__group > .lsf-tool_smart").hover()
        self.page.locator(f".lsf-toolbar__smart [aria-label={name}]").click()

    def drag(self, *points: tuple[float, float]) -> None:
        self.page.mouse.move(*self.at(*points[0]))
        self.page.mouse.down()
        for point in points[1:]:
            self.page.mouse.move(*self.at(*point), steps=5)
        self.page.mouse.up()

    def ask(self, action: Callable[[], None], label: str) -> tuple[list[dict], dict]:
        """Does ``action``; returns the items LS sent and the one mask the backend answered."""
        with self.page.expect_response(lambda r: INTERACTIVE in r.url, timeout=120_000) as got:
            action()
        assert got.value.status == 200, got.value.text()
        (mask,) = got.value.json()["data"]["result"]
        assert mask["type"] == "brushlabels" and mask["value"]["brushlabels"] == [label]
        assert (mask["original_width"], mask["original_height"]) == (640, 480)
        return self.sent[-1], mask

    def accept(self, label: str) -> None:
        """Accepts the suggestion: it becomes the one brush region of the Regions panel."""
        self.page.get_by_test_id("bottombar-accept-suggestions-button").click()
        brush = self.page.locator(".lsf-tree__node_type_brushregion")
        expect(brush).to_have_count(1)
        expect(brush).to_contain_text(label)

    def reset(self) -> None:
        self.page.get_by_test_id("bottombar-reset-button").click()
        expect(self.page.locator(".lsf-tree__node")).to_have_count(0)


@contextmanager
def artefacts_on_failure(page, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{name}.png")
        (ARTIFACTS / f"{name}.html").write_text(page.content())
        print(f"browser artefacts: {ARTIFACTS / name}.png and .html")
        raise


def test_smart_tools_in_the_editor(label_studio, browser, deployment, request):
    name = request.node.callspec.id
    project = make_project(label_studio, deployment, f"browser-{name}")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(60_000)
    page = context.new_page()
    base = str(label_studio.base_url).rstrip("/")
    with artefacts_on_failure(page, name):
        page.goto(f"{base}/user/login/")
        page.fill("input[name=email]", LS_USER)
        page.fill("input[name=password]", LS_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/login" not in url)
        page.goto(f"{base}/projects/{project['id']}/data?task={project['tasks'][0]}")
        toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
        toggle.wait_for(state="attached")
        page.get_by_text("Auto-Annotation", exact=True).click()
        expect(toggle).to_be_checked()
        editor = Editor(page, deployment)
        counted = interactive_ok(deployment)

        # 1. smart keypoint click on the red disc -> suggestion -> accept
        editor.label(1, "Object")
        editor.smart_tool("key-point-tool")
        sent, _ = editor.ask(lambda: page.mouse.click(*editor.at(0.32, 0.38)), "Object")
        assert [(i["type"], i["is_positive"]) for i in sent] == [("keypointlabels", True)]
        assert abs(sent[0]["value"]["x"] - 32) < 2 and abs(sent[0]["value"]["y"] - 38) < 2
        editor.accept("Object")
        assert interactive_ok(deployment) == counted + 1
        editor.reset()

        # 2. a click, then an Alt-click (negative) on the green square
        editor.label(1, "Object")
        editor.smart_tool("key-point-tool")
        editor.ask(lambda: page.mouse.click(*editor.at(0.32, 0.38)), "Object")

        def alt_click() -> None:
            editor.label(1, "Object")  # the editor drops the label once the first point is in
            page.keyboard.down("Alt")
            page.mouse.click(*editor.at(0.73, 0.65))
            page.keyboard.up("Alt")

        sent, _ = editor.ask(alt_click, "Object")
        assert [i["is_positive"] for i in sent] == [True, False]
        editor.accept("Object")
        assert interactive_ok(deployment) == counted + 3
        editor.reset()

        # 3. smart rectangle drag -> a Car mask
        editor.label(2, "Car")
        editor.smart_tool("rectangle-tool")
        sent, _ = editor.ask(lambda: editor.drag((0.2, 0.2), (0.5, 0.55)), "Car")
        assert [i["type"] for i in sent] == ["rectanglelabels"]
        value = sent[0]["value"]  # (LS starts the box at the first move past a few pixels)
        assert 20 <= value["x"] < 24 and 20 <= value["y"] < 24
        assert abs(value["x"] + value["width"] - 50) < 1
        assert abs(value["y"] + value["height"] - 55) < 1
        editor.accept("Car")
        assert interactive_ok(deployment) == counted + 4
        editor.reset()

        # 4. smart-brush stroke: a plain brush region, never sent (LS waits 1.2 s for strokes)
        requests = len(editor.sent)
        editor.label(0, "Object")
        editor.smart_tool("brush-tool")
        editor.drag((0.25, 0.3), (0.35, 0.35), (0.45, 0.32))
        expect(page.locator(".lsf-tree__node_type_brushregion")).to_have_count(1)
        page.wait_for_timeout(3000)
        assert len(editor.sent) == requests
        assert interactive_ok(deployment) == counted + 4
    context.close()
