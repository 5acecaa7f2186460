"""Job functions with a model runtime in this process (the embedded path), and model versions
served without a restart."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import numpy as np
import pytest
import torch
from msgspec.structs import replace
from safetensors.torch import save_file

from serving import jobs
from serving.registry import fine_tune_version
from serving.requests import (
    AutolabelRequest,
    BoxSpec,
    InvalidRequest,
    OutputSpec,
    PrewarmRequest,
    PromptSpec,
    SegmentRequest,
    TaskSpec,
)
from serving.runtime import ModelRuntime, derived_model
from serving.serialization import JobSerializer
from serving.settings import Settings
from tests.conftest import TI_CHECKPOINT
from tests.decoder_stubs import install_stub_decoder
from tests.http_fixtures import LEGACY_TOKEN, decode_brush
from tests.redis_fixtures import IMAGE
from tests.worker.autolabel_memory_probe import disc_decoder

OUTPUT = OutputSpec(tag="BrushLabels", name="tag", to_name="image", labels=["Object", "Car"])


@pytest.fixture(scope="module")
def runtime(server, tmp_path_factory):
    settings = Settings.from_env(
        {},
        checkpoint=TI_CHECKPOINT,
        model_dir=tmp_path_factory.mktemp("models"),
        label_studio_url=server.url,
        label_studio_api_key=LEGACY_TOKEN,
        device="cpu",
    )
    runtime = ModelRuntime(settings)
    runtime.load()
    yield runtime
    runtime.close()


def click(x: float, y: float, **extra) -> SegmentRequest:
    return SegmentRequest(
        **{
            "project": "1",
            "task": 1,
            "image": IMAGE,
            "size": (640, 480),
            "prompt": PromptSpec(points=[(x, y)], labels=[1]),
            "output": OUTPUT,
            "label": "Car",
            **extra,
        }
    )


def test_segment_returns_the_best_mask_at_the_browser_size(runtime):
    entry = jobs.segment(click(320, 240, size=(1280, 960)), runtime=runtime)
    (item,) = entry["result"]
    assert item["value"]["brushlabels"] == ["Car"] and item["type"] == "brushlabels"
    assert decode_brush(item).shape == (960, 1280)
    assert entry["model_version"] == runtime.base_version and 0 < entry["score"] < 2
    assert set(entry["timings"]) == {"encoder", "decoder", "job"}
    assert entry["timings"]["job"] > entry["timings"]["decoder"] > 0
    again = jobs.segment(click(320, 240, size=(1280, 960)), runtime=runtime)
    assert again["timings"]["encoder"] == 0.0  # the second click only decodes
    np.testing.assert_array_equal(decode_brush(again["result"][0]), decode_brush(item))


def test_segment_errors_are_returned_with_a_status(runtime):
    missing = jobs.segment(click(5, 5, image="/data/upload/1/missing.png"), runtime=runtime)
    assert missing["status"] == 404 and "404" in missing["error"]
    no_label = jobs.segment(click(5, 5, output=replace(OUTPUT, labels=[]), label=None), runtime)
    assert no_label["status"] == 422 and "Label" in no_label["error"]


def test_a_request_from_redis_is_validated_by_the_job(runtime):
    """The JSON that travels through Redis gives the job the struct it was built from; JSON that
    is not one fails the job with what is wrong, and where."""
    request = click(320, 240)
    wire = JobSerializer.loads(JobSerializer.dumps(msgspec.to_builtins(request)))
    from_json, from_struct = jobs.segment(wire, runtime), jobs.segment(request, runtime)
    assert from_json["model_version"] == from_struct["model_version"]
    np.testing.assert_array_equal(
        decode_brush(from_json["result"][0]), decode_brush(from_struct["result"][0])
    )
    with pytest.raises(InvalidRequest, match=r"SegmentRequest: .* - at `\$\.size\[1\]`"):
        jobs.segment({**wire, "size": [640, "480"]}, runtime)
    with pytest.raises(InvalidRequest, match="AutolabelRequest: .*field `task`"):
        jobs.autolabel({"output": wire["output"]}, runtime)


def test_without_a_runtime_jobs_say_so():
    with pytest.raises(RuntimeError, match="no model runtime"):
        jobs.segment(click(1, 1))


def test_autolabel_boxes_and_automatic(runtime):
    task = TaskSpec(
        id=1,
        image=IMAGE,
        boxes=[
            BoxSpec(box=(64, 48, 320, 240), size=(640, 480), label="Car"),
            BoxSpec(box=(10, 10, 100, 50), size=(1280, 960), label="Unknown"),
        ],
    )
    request = AutolabelRequest(project="1", task=task, mode="auto", output=OUTPUT)
    entry = jobs.autolabel(request, runtime=runtime)
    assert [r["value"]["brushlabels"] for r in entry["result"]] == [["Car"], ["Object"]]
    assert [decode_brush(r).shape for r in entry["result"]] == [(480, 640), (960, 1280)]
    assert entry["score"] == pytest.approx(np.mean([r["score"] for r in entry["result"]]), abs=1e-5)
    no_boxes = replace(task, boxes=[])
    boxes_only = jobs.autolabel(replace(request, task=no_boxes, mode="boxes"), runtime=runtime)
    assert "no rectangles" in boxes_only["skipped"]
    everything = jobs.autolabel(
        replace(request, task=no_boxes, mode="everything", points_per_side=4), runtime=runtime
    )
    assert all(r["value"]["brushlabels"] == ["Object"] for r in everything["result"])
    assert all(decode_brush(r).shape == (480, 640) for r in everything["result"])


def test_autolabel_everything_grid_by_device(runtime, monkeypatch):
    # points_per_side 0 (AUTOLABEL_POINTS_PER_SIDE's default): 16x16 on a CPU. A decoder that
    # gives one confident disc per point (random weights pass no threshold) counts the points.
    install_stub_decoder(runtime.base.predictor.model, disc_decoder, monkeypatch)
    request = AutolabelRequest(
        project="1", task=TaskSpec(id=1, image=IMAGE), mode="everything", output=OUTPUT
    )
    steps = []  # the embedded backend's checkpoints (serving/compute.py) between the steps
    monkeypatch.setattr(runtime, "between_steps", lambda: steps.append(1))
    entry = jobs.autolabel(request, runtime=runtime)
    assert "error" not in entry and len(entry["result"]) == 16 * 16
    assert len(steps) >= 16 * 16  # at least once per kept mask's clean-up
    assert len(jobs.autolabel(replace(request, points_per_side=3), runtime)["result"]) == 9


@pytest.mark.slow
def test_autolabel_everything_on_a_12_mp_image_has_a_bounded_peak_memory():
    """The embedded job path on a 4000x3000 image, ~35 masks kept (a stand-in decoder gives one
    disc per grid point: see the probe): masks stay COCO RLE until each is turned into its LS
    result, so the job's peak RSS growth stays below 16 bytes per image pixel (as (H, W)
    arrays the masks alone would need 12 MB each)."""
    height, width = 3000, 4000
    command = [sys.executable, "-m", "tests.worker.autolabel_memory_probe", "3000", "4000", "6"]
    output = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert output.returncode == 0, output.stderr[-2000:]
    measured = json.loads(output.stdout.strip().splitlines()[-1])
    assert measured["error"] is None and measured["sizes"] == [[width, height]]
    if measured["peak_growth_bytes"] is None:
        pytest.skip("the peak RSS cannot be reset here (no /proc/self/clear_refs)")
    bound = 16 * height * width
    assert measured["regions"] * height * width > bound
    assert measured["peak_growth_bytes"] < bound, measured


def test_autolabel_failures(runtime):
    task = TaskSpec(id=9, image="/data/upload/1/missing.png")
    request = AutolabelRequest(project="1", task=task, mode="everything", output=OUTPUT)
    assert jobs.autolabel(request, runtime=runtime)["status"] == 404


def test_prewarm_fills_the_cache(runtime, server):
    from tests.http_fixtures import png_bytes

    image = np.asarray(np.random.default_rng(3).integers(0, 255, (120, 160, 3)), np.uint8)
    server.files["/data/upload/1/noise.png"] = png_bytes(image)
    request = PrewarmRequest(project="1", task=5, image="/data/upload/1/noise.png")
    first = jobs.prewarm(request, runtime=runtime)
    assert first["cached"] is False and first["encoder_seconds"] > 0
    assert jobs.prewarm(request, runtime=runtime)["cached"] is True


def test_derived_model_shares_unchanged_parts(runtime):
    base = runtime.base.predictor.model
    weight = base.mask_decoder.iou_token.weight
    model = derived_model(base, {"mask_decoder.iou_token.weight": torch.ones_like(weight)})
    assert model.image_encoder is base.image_encoder  # shared: same embeddings
    assert model.mask_decoder is not base.mask_decoder
    assert torch.equal(model.mask_decoder.iou_token.weight, torch.ones_like(weight))
    assert not torch.equal(base.mask_decoder.iou_token.weight, torch.ones_like(weight))


def test_a_promoted_version_is_served_without_a_restart(runtime):
    registry = runtime.registry
    version = fine_tune_version(runtime.base_version, "7", 1)
    registry.versions_dir.mkdir(parents=True, exist_ok=True)
    decoder = runtime.base.predictor.model.mask_decoder
    changed = {
        f"mask_decoder.{name}": tensor.detach() * 0.5
        for name, tensor in decoder.output_hypernetworks_mlps.state_dict().items()
    }
    changed = {
        k.replace("mask_decoder.", "mask_decoder.output_hypernetworks_mlps."): v
        for k, v in changed.items()
    }
    metadata = {"base": runtime.base_version, "project": "7", "metrics": json.dumps({})}
    save_file(changed, registry.version_path(version), metadata)
    before = jobs.segment(click(300, 200, project="7"), runtime=runtime)
    assert before["model_version"] == runtime.base_version
    registry.promote("7", version)
    after = jobs.segment(click(300, 200, project="7"), runtime=runtime)
    assert after["model_version"] == version
    assert after["timings"]["encoder"] == 0.0  # same encoder: the cached embedding is reused
    other = jobs.segment(click(300, 200, project="8"), runtime=runtime)
    assert other["model_version"] == runtime.base_version
    registry.rollback("7", "base")
    assert (
        jobs.segment(click(300, 200, project="7"), runtime=runtime)["model_version"]
        == runtime.base_version
    )


def decoder_tensors(runtime, scale: float) -> dict:
    """A decoder-only "fine-tune": the output hypernetworks scaled."""
    decoder = runtime.base.predictor.model.mask_decoder
    return {
        f"mask_decoder.output_hypernetworks_mlps.{name}": tensor.detach() * scale
        for name, tensor in decoder.output_hypernetworks_mlps.state_dict().items()
    }


def test_a_job_serves_exactly_the_version_it_asks_for(runtime):
    """LS asked for (and filters on) the version /setup returned: a promotion between enqueue
    and run, or a Redis copy behind the disk, must not change what the job serves."""
    registry, base = runtime.registry, runtime.base_version
    first = registry.store_version("11", base, decoder_tensors(runtime, 0.5), {})
    registry.promote("11", first)
    second = registry.store_version("11", base, decoder_tensors(runtime, 0.25), {})
    registry.promote("11", second)
    assert jobs.segment(click(300, 200, project="11"), runtime=runtime)["model_version"] == second
    for version in (base, first):
        answer = jobs.segment(click(300, 200, project="11", model_version=version), runtime=runtime)
        assert answer["model_version"] == version
    task = TaskSpec(id=3, image=IMAGE, boxes=[BoxSpec(box=(64, 48, 320, 240), size=(640, 480))])
    request = AutolabelRequest(project="11", task=task, mode="boxes", output=OUTPUT)
    entry = jobs.autolabel(replace(request, model_version=first), runtime=runtime)
    assert entry["model_version"] == first and entry["result"]
    assert jobs.autolabel(request, runtime=runtime)["model_version"] == second


def test_a_version_that_cannot_be_served_is_an_error_never_another_version(runtime):
    registry, base = runtime.registry, runtime.base_version
    other = registry.store_version("12", base, decoder_tensors(runtime, 0.5), {})
    wrong_project = jobs.segment(click(5, 5, project="13", model_version=other), runtime=runtime)
    assert wrong_project["status"] == 409 and "project 12" in wrong_project["error"]
    missing = jobs.segment(
        click(5, 5, project="12", model_version=f"{base}+p12-ft99"), runtime=runtime
    )
    assert missing["status"] == 503 and "ft99" in missing["error"]

    # a promoted version file that does not load: an error, not a silent fall-back to the base
    broken = registry.store_version("12", base, {"mask_decoder.no_such.weight": torch.ones(2)}, {})
    registry.promote("12", broken)
    answer = jobs.segment(click(5, 5, project="12"), runtime=runtime)
    assert answer["status"] == 503 and "no_such" in answer["error"]
    assert "no_such" in registry.version_errors(3600)[broken]["error"]
    task = TaskSpec(id=4, image=IMAGE, boxes=[BoxSpec(box=(64, 48, 320, 240), size=(640, 480))])
    request = AutolabelRequest(project="12", task=task, mode="boxes", output=OUTPUT)
    assert jobs.autolabel(request, runtime=runtime)["status"] == 503
    with pytest.raises(jobs.TaskFailed, match="cannot be loaded"):  # RQ retries, then reports
        jobs.autolabel(replace(request, model_version=broken, write_back=True), runtime=runtime)
    registry.promote("12", other)
    assert jobs.segment(click(5, 5, project="12"), runtime=runtime)["model_version"] == other


def test_loaded_versions_bounds_the_versions_kept_in_memory(runtime, monkeypatch):
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(loaded_versions=1))
    registry, base = runtime.registry, runtime.base_version
    first = registry.store_version("31", base, decoder_tensors(runtime, 0.5), {})
    second = registry.store_version("31", base, decoder_tensors(runtime, 0.25), {})
    served = runtime.served_model("31", first)
    assert runtime.served_model("31", first) is served  # kept
    runtime.served_model("31", second)  # the one version kept now
    again = runtime.served_model("31", first)
    assert again is not served and again.version == first  # loaded again


def test_rectangles_are_decoded_in_chunks_of_box_chunk_pixels(runtime, monkeypatch):
    """Two 640x480 masks at once: three rectangles take two decoder calls."""
    settings = runtime.settings.with_overrides(box_chunk_pixels=2 * 640 * 480)
    segment, prompts_per_call = runtime.segment, []

    def counting(served, image, prompts, multimask):
        prompts_per_call.append(len(prompts))
        return segment(served, image, prompts, multimask)

    monkeypatch.setattr(runtime, "settings", settings)
    monkeypatch.setattr(runtime, "segment", counting)
    boxes = [BoxSpec(box=(64 + i, 48, 320, 240), size=(640, 480)) for i in range(3)]
    task = TaskSpec(id=5, image=IMAGE, boxes=boxes)
    entry = jobs.autolabel(AutolabelRequest(task=task, mode="boxes", output=OUTPUT), runtime)
    assert len(entry["result"]) >= 3 and prompts_per_call == [2, 1]
