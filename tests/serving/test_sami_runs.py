"""SAMI runs of a project (``serving.jobs.sami``) against a stand-in Label Studio API: the plan of
images (held-out tasks never taught), the two promotion gates, and whole runs with a random-weight
EfficientSAM-S served as the teacher: a promoted ``-sami1`` Ti version that is then served, a
rejected run with its reason, and a decoder fine-tune that continues from the SAMI student."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.random_weights import random_state_dict
from benchmarks.synthetic import make_dataset
from efficientsam.build import build_efficient_sam, infer_variant
from efficientsam.checkpoint import save_checkpoint
from efficientsam.training import split_by_task
from serving import jobs
from serving.labelstudio.tasks import annotation_events
from serving.runtime import ModelRuntime
from serving.sami_run import plan_images, sami_decision
from serving.settings import Settings
from tests.conftest import TI_CHECKPOINT
from tests.http_fixtures import BRUSH_CONFIG, LEGACY_TOKEN, brush
from tests.worker.ls_api import LabelStudioApiServer

FAST = {
    "SAMI_STEPS": "2",
    "SAMI_ALIGN_STEPS": "1",
    "SAMI_BATCH_SIZE": "1",
    "TRAIN_STEPS": "2",
    "TRAIN_MIN_TASKS": "3",
    "TORCH_THREADS": "2",
}
PASS_ANYTHING = {"SAMI_MIN_AGREEMENT": "0", "SAMI_MIOU_MARGIN": "-1"}


# -- the plan and the gates (no model) ------------------------------------------------------------
def test_the_plan_never_teaches_a_held_out_task_and_keeps_the_fine_tunes_split():
    tasks = list(range(1, 301))
    annotated = list(range(1, 301, 10))
    plan = plan_images(tasks, annotated, 0.2, max_images=100)
    train_a, held_a = split_by_task([str(i) for i in annotated], 0.2, seed=0)
    assert sorted(plan.finetune) == sorted(map(int, train_a))  # the decoder fine-tune's split
    assert sorted(plan.evaluate) == sorted(map(int, held_a))
    assert not set(plan.distil) & set(plan.agreement)
    assert not set(plan.distil) & set(plan.evaluate)
    assert plan.agreement[: len(plan.evaluate)] == sorted(plan.evaluate, reverse=True)
    assert len(plan.distil) == 100 and plan.distil == sorted(plan.distil, reverse=True)
    assert min(plan.distil) > 300 - 140  # the newest tasks (about 20% of them are held out)
    assert len(plan.agreement) == 32
    # a task never changes sides when the project grows
    grown = plan_images(list(range(1, 401)), annotated, 0.2, max_images=400)
    assert set(plan.agreement) - set(grown.agreement) <= set(grown.agreement) | set(
        range(1, 301)
    ) and not set(plan.agreement) & set(grown.distil)


def test_both_gates_must_pass_and_the_reason_says_which_failed():
    settings = Settings.from_env({"SAMI_MIN_AGREEMENT": "0.8", "SAMI_MIOU_MARGIN": "-0.02"})
    served = {"one_click_miou": 0.70, "box_miou": 0.80, "three_click_miou": 0.75}
    close = {"one_click_miou": 0.69, "box_miou": 0.79, "three_click_miou": 0.74}
    worse = {"one_click_miou": 0.60, "box_miou": 0.79, "three_click_miou": 0.74}
    promote, reason = sami_decision(served, close, 0.85, settings)
    assert promote and reason.count("passes") == 2
    promote, reason = sami_decision(served, worse, 0.85, settings)
    assert not promote and "0.710 against 0.750" in reason and "fails: >= 0.730" in reason
    promote, reason = sami_decision(served, close, 0.79, settings)
    assert not promote and "agreement with the teacher 0.790 (fails: >= 0.8" in reason


# -- whole runs ------------------------------------------------------------------------------------
def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def s_checkpoint(tmp_path_factory):
    """A random-weight EfficientSAM-S checkpoint: the served model, i.e. the teacher."""
    model = build_efficient_sam("s")
    model.load_state_dict(random_state_dict(model, seed=4321))
    path = tmp_path_factory.mktemp("s") / "efficientsam_s_random.safetensors"
    save_checkpoint(model, path)
    return path


@pytest.fixture
def label_studio():
    """Project 3: 5 annotated tasks (one object each, brush) and 2 without annotations."""
    server = LabelStudioApiServer()
    server.label_configs[3] = BRUSH_CONFIG
    samples = make_dataset(7, seed=3, prefix="sami")
    for task_id, sample in enumerate(samples, start=1):
        path = f"/data/upload/3/{sample.image_id}.png"
        server.files[path] = png(sample.image)
        annotations = []
        if task_id <= 5:
            items = [brush(mask) for mask in sample.masks]
            annotations = [
                {"id": 1000 + task_id, "result": items, "updated_at": "2026-01-01T00:00:00Z"}
            ]
        server.tasks.append(
            {
                "id": task_id,
                "project": 3,
                "data": {"image": path},
                "annotations": annotations,
                "predictions": [],
            }
        )
    yield server
    server.close()


def make_runtime(label_studio, model_dir, checkpoint, env: dict) -> ModelRuntime:
    settings = Settings.from_env(
        {**FAST, **env},
        checkpoint=checkpoint,
        model_dir=model_dir,
        label_studio_url=label_studio.url,
        label_studio_api_key=LEGACY_TOKEN,
        device="cpu",
    )
    return ModelRuntime(settings, redis=None)


@pytest.mark.slow
def test_a_sami_run_promotes_a_ti_version_that_serves_a_strict_gate_rejects_and_a_fine_tune_goes_on(
    label_studio, s_checkpoint, tmp_path
):
    """Served S (random weights) teaches a Ti student (SAMI_STUDENT: the Ti fixture): the
    promoted version is ``efficientsam-ti-<8 hex>+p3-sami1``, standalone, records teacher,
    student init, steps and both gates' numbers, and is what a click is then served with
    (a Ti encoder: its own embeddings). A second run with an agreement gate nothing passes
    is rejected with the reason; its teacher is still the S, its student the served Ti. A
    decoder fine-tune from the served SAMI version stays a whole Ti model."""
    env = {**PASS_ANYTHING, "SAMI_STUDENT": str(TI_CHECKPOINT)}
    runtime = make_runtime(label_studio, tmp_path, s_checkpoint, env)
    base = runtime.load()
    try:
        result = jobs.sami({"project": "3", "trigger": "test"}, runtime=runtime)
        assert result["status"] == "promoted", result
        version = result["version"]
        assert version.startswith("efficientsam-ti-") and version.endswith("+p3-sami1")
        assert result["teacher"] == base.version and base.version.startswith("efficientsam-s-")
        assert result["student_init"] == f"checkpoint {TI_CHECKPOINT.name}"
        assert result["images"]["distil"] >= 4 and result["images"]["held_out"] >= 1
        assert result["images"]["distil"] + result["images"]["held_out"] == 7
        assert result["tasks"]["train"] + result["tasks"]["held_out"] == 5
        for when in ("before", "after"):
            assert 0 <= result["agreement"][when]["mask_agreement"] <= 1
        info = runtime.registry.version_info(version)
        assert info.metadata["standalone"] is True and info.metadata["method"] == "sami"
        assert info.metadata["teacher"] == base.version
        assert info.metadata["sami"]["steps"] == 2 and info.metadata["sami"]["align_steps"] == 1
        assert info.metadata["trained"][0] == "image_encoder"

        served = runtime.served_model("3")
        assert served.version == version and served.standalone
        assert infer_variant(served.predictor.model.state_dict()).name == "ti"
        assert served.predictor.encoder_fingerprint != base.predictor.encoder_fingerprint
        image = label_studio.tasks[0]["data"]["image"]
        click = {
            "project": "3",
            "task": 1,
            "image": image,
            "size": [100, 100],
            "prompt": {"points": [[50.0, 50.0]], "labels": [1]},
            "output": {
                "tag": "BrushLabels",
                "name": "mask",
                "to_name": "image",
                "labels": ["Object"],
            },
            "model_version": version,
        }
        entry = jobs.segment(click, runtime=runtime)
        assert entry["model_version"] == version, entry
        assert entry["timings"]["encoder"] > 0  # the student's own embedding, not the S's

        # the same worker, an agreement gate nothing passes (teacher embeddings: cached)
        runtime.settings = runtime.settings.with_overrides(
            sami_min_agreement=1.01, sami_steps=1, sami_align_steps=0
        )
        event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 77, "task": 1}}
        runtime.project_state.record("3", *annotation_events(event))
        timed = {"project": "3", "trigger": "again", "takes_annotation_count": False}
        rejected = jobs.sami(timed, runtime=runtime)
        assert runtime.project_state.new_annotations("3") == 1  # left to the next run
        assert rejected["status"] == "rejected"
        assert "fails: >= 1.01 needed" in rejected["reason"]
        assert rejected["teacher"] == base.version and rejected["parent"] == version
        assert rejected["student_init"] == f"version {version}"
        history = runtime.registry.version_history("3")
        assert history["current"] == version
        assert history["history"][-1]["event"] == "rejected"
        assert history["history"][-1]["reason"] == rejected["reason"]

        # TRAIN_FROM=current: the decoder fine-tune continues from the SAMI student, and its
        # version is the whole Ti model again (never the S with the Ti's decoder)
        runtime.settings = runtime.settings.with_overrides(
            train_from="current", train_promotion_margin=-1.0
        )
        tuned = jobs.finetune({"project": "3", "trigger": "test"}, runtime=runtime)
        assert tuned["status"] == "promoted" and tuned["parent"] == version
        assert tuned["version"].startswith("efficientsam-ti-")
        assert tuned["version"].endswith("+p3-ft1")  # numbered per kind
        assert runtime.registry.version_info(tuned["version"]).metadata["standalone"] is True
        served = runtime.served_model("3")
        assert served.version == tuned["version"]
        assert infer_variant(served.predictor.model.state_dict()).name == "ti"
    finally:
        runtime.close()
