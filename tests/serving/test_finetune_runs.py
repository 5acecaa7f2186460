"""Fine-tuning runs against a stand-in Label Studio API and the real Redis: bad data skipped with
reasons, the new-annotation count kept by a crashed run, retries only before training, one
fine-tune per project however often it is asked for, and a sync that keeps only what training
needs."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from serving import jobs
from serving.labelstudio.tasks import annotation_events
from serving.runtime import ModelRuntime
from serving.serialization import JobSerializer
from serving.settings import Settings
from tests.conftest import REFERENCE_DIR, TI_CHECKPOINT
from tests.http_fixtures import BRUSH_CONFIG, LEGACY_TOKEN, brush
from tests.worker.ls_api import LabelStudioApiServer

IMAGE = "/data/upload/3/image.png"
FAST_TRAINING = {"TRAIN_STEPS": "2", "TRAIN_MIN_TASKS": "3", "TORCH_THREADS": "1"}


def blob_mask(index: int, height: int = 480, width: int = 640) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    top, left = 40 + 30 * (index % 8), 60 + 50 * (index % 9)
    mask[top : top + 120, left : left + 160] = True
    return mask


def annotated(task_id: int, items: list, image: str = IMAGE, predictions: int = 0) -> dict:
    prediction = {"model_version": "old", "score": 0.5, "result": items}
    return {
        "id": task_id,
        "project": 3,
        "data": {"image": image},
        "annotations": [
            {"id": 1000 + task_id, "result": items, "updated_at": "2026-01-01T00:00:00Z"}
        ],
        "predictions": [{**prediction, "id": 5000 * task_id + n} for n in range(predictions)],
    }


@pytest.fixture
def label_studio():
    server = LabelStudioApiServer()
    server.label_configs[3] = BRUSH_CONFIG
    server.files[IMAGE] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    yield server
    server.close()


def make_runtime(label_studio, model_dir, env: dict, redis=None) -> ModelRuntime:
    settings = Settings.from_env(
        {**FAST_TRAINING, **env},
        checkpoint=TI_CHECKPOINT,
        model_dir=model_dir,
        label_studio_url=label_studio.url,
        label_studio_api_key=LEGACY_TOKEN,
        device="cpu",
    )
    return ModelRuntime(settings, redis=redis)


def saved(runtime: ModelRuntime, *annotation_ids: int) -> None:
    for annotation_id in annotation_ids:
        event = {"action": "ANNOTATION_CREATED", "annotation": {"id": annotation_id, "task": 1}}
        runtime.project_state.record("3", *annotation_events(event))


@pytest.mark.slow
def test_bad_annotations_and_images_skip_their_task_with_the_reason(label_studio, tmp_path):
    """An undecodable brush RLE, a polygon of two points and an image that cannot be downloaded
    skip those three tasks (listed with their reasons in the report and the history); the run
    trains on the others and, having finished, forgets the new-annotation count."""
    bad_rle = {**brush(blob_mask(0)), "value": {"format": "rle", "rle": [1, 2, 3]}}
    bad_polygon = {
        "type": "polygonlabels",
        "to_name": "image",
        "original_width": 640,
        "original_height": 480,
        "value": {"points": [[1, 1], [5, 5]], "polygonlabels": ["Object"]},
    }
    label_studio.tasks = [annotated(i, [brush(blob_mask(i))]) for i in range(1, 6)] + [
        annotated(6, [brush(blob_mask(6)), bad_rle]),
        annotated(7, [bad_polygon]),
        annotated(8, [brush(blob_mask(8))], image="/data/upload/3/gone.png"),
    ]
    runtime = make_runtime(label_studio, tmp_path, {})
    runtime.load()
    saved(runtime, 1001, 1002)
    try:
        result = jobs.finetune({"project": "3", "trigger": "test"}, runtime=runtime)
    finally:
        runtime.close()
    assert result["status"] in ("promoted", "rejected")
    assert result["tasks"]["train"] + result["tasks"]["held_out"] == 5
    skipped = {entry["task"]: entry["reason"] for entry in result["skipped_tasks"]["tasks"]}
    assert result["skipped_tasks"]["count"] == 3 and sorted(skipped) == [6, 7, 8]
    assert "brushlabels" in skipped[6] and "polygonlabels" in skipped[7]
    assert skipped[8].startswith("image:") and "404" in skipped[8]
    history = runtime.registry.version_history("3")["history"]
    assert history[-1]["skipped_tasks"]["count"] == 3
    assert runtime.project_state.new_annotations("3") == 0


def run_train_worker(runtime: ModelRuntime, connection) -> None:
    """The project's RQ worker class on the train queue, in this process, until it is empty."""
    from worker.model_worker import ModelWorker

    ModelWorker(["train"], runtime=runtime, connection=connection).work(burst=True)


@pytest.mark.slow
def test_a_crashed_run_keeps_the_count_and_is_retried_only_before_training(
    label_studio, tmp_path, redis_connection, redis_url
):
    """The LS API fails the first attempt's sync (retried: nothing was trained); the second
    attempt trains and then fails storing the promoted version (a file where the versions
    folder should be): the job fails for good, never trains again, and the project's
    new-annotation count is still there for the next trigger."""
    from rq.job import Job, JobStatus

    from serving.requests import submit_finetune
    from serving.transports import QueueTransport

    label_studio.tasks = [annotated(i, [brush(blob_mask(i))]) for i in range(1, 7)]
    label_studio.failures["/api/projects/3"] = 1
    env = {
        "REDIS_URL": redis_url,
        "BATCH_RETRIES": "3",
        "BATCH_RETRY_DELAY_SECONDS": "0",
        "TRAIN_PROMOTION_MARGIN": "-1",  # every candidate is promoted
    }
    runtime = make_runtime(label_studio, tmp_path, env, redis=redis_connection)
    runtime.load()
    (tmp_path / "versions").write_text("not a folder")
    saved(runtime, 1001, 1002, 1003)
    job_id = submit_finetune(QueueTransport(runtime.settings), "3", "test")
    try:
        run_train_worker(runtime, redis_connection)
    finally:
        runtime.close()
    job = Job.fetch(job_id, connection=redis_connection, serializer=JobSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert "versions" in job.latest_result().exc_string
    attempts = label_studio.answered("/api/projects/3")
    assert len(attempts) == 2  # the failed sync, then the run that trained; no third
    assert runtime.project_state.new_annotations("3") == 3
    assert runtime.registry.version_history("3")["history"] == []  # nothing promoted


def test_two_submits_at_once_queue_one_finetune(redis_connection, redis_url):
    """Start-training clicks and the cron at the same moment, many times over (a finished job
    in between): the train queue never holds the project's fine-tune twice."""
    from rq import Queue

    from serving.requests import submit_finetune
    from serving.transports import QueueTransport

    settings = Settings.from_env({"REDIS_URL": redis_url}, checkpoint=TI_CHECKPOINT)
    transports = [QueueTransport(settings) for _ in range(6)]
    queue = Queue("train", connection=redis_connection, serializer=JobSerializer)
    for _ in range(15):
        start = threading.Barrier(len(transports))

        def submit(transport: QueueTransport, start: threading.Barrier) -> None:
            start.wait()
            submit_finetune(transport, "3", "test")

        threads = [threading.Thread(target=submit, args=(t, start)) for t in transports]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert queue.job_ids == ["finetune-p3"]
        job = queue.fetch_job("finetune-p3")
        queue.remove(job)
        job.set_status("finished")  # as if a worker ran it: the next round may queue it again
    for transport in transports:
        transport.close()


def test_the_sync_downloads_no_predictions_and_keeps_packed_masks(label_studio, tmp_path):
    """Tasks with many large predictions each: the sync asks LS for the task list without
    annotations and predictions plus each annotated task's annotations, so what it downloads
    does not grow with the predictions, and it keeps per task only the masks, 8 pixels a byte."""
    from serving.labelstudio.annotations import PackedMask, sync_annotations
    from serving.labelstudio.label_config import parse_label_config

    label_studio.tasks = [
        annotated(i, [brush(blob_mask(i)), brush(blob_mask(i + 3))], predictions=20)
        for i in range(1, 13)
    ] + [{"id": 40, "project": 3, "data": {"image": IMAGE}, "annotations": []}]
    runtime = make_runtime(label_studio, tmp_path, {})
    config = parse_label_config(BRUSH_CONFIG)
    try:
        api = runtime.labelstudio
        tasks, skipped = sync_annotations(api.annotated_tasks(3, page_size=5), config)
    finally:
        runtime.close()
    assert [t.task_id for t in tasks] == list(range(1, 13)) and skipped == []
    downloaded = sum(size for _, size in label_studio.requests)
    predictions = sum(len(json.dumps(t.get("predictions", []))) for t in label_studio.tasks)
    assert downloaded < predictions / 10
    assert not label_studio.answered("/api/tasks/40/")  # no annotations: not asked
    for task in tasks:
        assert all(isinstance(mask, PackedMask) for mask in task.masks)
        assert sum(mask.nbytes for mask in task.masks) == 2 * 640 * 480 // 8
        masks = task.masks_at((320, 240))  # the size of the downloaded image
        assert masks[0].shape == (240, 320) and masks[0].sum() == 80 * 60
