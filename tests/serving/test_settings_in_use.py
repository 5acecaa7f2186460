"""Settings that were module constants reach their users: RQ's result and failure TTLs, how long
a version's load error is reported, how many versions stay loaded, the rectangles' chunk size."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from rq.job import Job

from serving import jobs
from serving.registry import ModelRegistry
from serving.runtime import ModelRuntime
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport, TransportError
from tests.conftest import TI_CHECKPOINT
from tests.http_fixtures import LEGACY_TOKEN
from tests.redis_fixtures import IMAGE, wait_until
from tests.serving.test_jobs import OUTPUT, decoder_tensors


def test_queued_and_waited_jobs_keep_results_and_failures_as_set(redis_connection, redis_url):
    env = {
        "REDIS_URL": redis_url,
        "RESULT_TTL_SECONDS": "123",
        "FAILURE_TTL_SECONDS": "456",
        "WAITED_RESULT_TTL_SECONDS": "7",
        "WAITED_FAILURE_TTL_SECONDS": "89",
    }
    transport = QueueTransport(Settings.from_env(env))
    waiting = ThreadPoolExecutor(max_workers=1)
    try:
        queued = transport.submit("prewarm", {"project": "1", "task": 1, "image": IMAGE}, "batch")
        call = waiting.submit(transport.call, "segment", {"project": "1"}, "interactive", 2)
        (waited,) = wait_until(transport.queues["interactive"].get_job_ids, 2, "the click job")
        ttls = {
            job_id: (job.result_ttl, job.failure_ttl)
            for job_id in (queued, waited)
            for job in [Job.fetch(job_id, connection=redis_connection, serializer=JobSerializer)]
        }
        assert ttls == {queued: (123, 456), waited: (7, 89)}
        with pytest.raises(TransportError, match="no worker answered"):  # none runs here
            call.result(timeout=10)
    finally:
        waiting.shutdown()
        transport.close()


def test_a_load_error_is_reported_for_version_error_seconds(redis_connection, redis_url, tmp_path):
    ModelRegistry(tmp_path, redis_connection).report_version_error("v-broken", "boom")
    short = QueueTransport(Settings.from_env({"VERSION_ERROR_SECONDS": "0.5"}, redis_url=redis_url))
    default = QueueTransport(Settings.from_env({}, redis_url=redis_url))
    try:
        assert short.version_errors()["v-broken"]["error"] == "boom"
        time.sleep(0.6)
        assert short.version_errors() == {}
        assert default.version_errors()["v-broken"]["error"] == "boom"
    finally:
        short.close()
        default.close()


@pytest.fixture(scope="module")
def runtime(server, tmp_path_factory):
    """A runtime that keeps one fine-tuned version loaded and decodes two 640x480 masks at once."""
    settings = Settings.from_env(
        {"LOADED_VERSIONS": "1", "BOX_CHUNK_PIXELS": str(2 * 640 * 480)},
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


def test_loaded_versions_bounds_the_versions_kept_in_memory(runtime):
    registry, base = runtime.registry, runtime.base_version
    first = registry.store_version("31", base, decoder_tensors(runtime, 0.5), {})
    second = registry.store_version("31", base, decoder_tensors(runtime, 0.25), {})
    served = runtime.served_model("31", first)
    assert runtime.served_model("31", first) is served  # kept
    runtime.served_model("31", second)  # the one version kept now
    again = runtime.served_model("31", first)
    assert again is not served and again.version == first  # loaded again


def test_rectangles_are_decoded_in_chunks_of_box_chunk_pixels(runtime, monkeypatch):
    segment, prompts_per_call = runtime.segment, []

    def counting(served, image, prompts, multimask):
        prompts_per_call.append(len(prompts))
        return segment(served, image, prompts, multimask)

    monkeypatch.setattr(runtime, "segment", counting)
    boxes = [{"box": [64 + i, 48, 320, 240], "size": [640, 480]} for i in range(3)]
    task = {"id": 5, "image": IMAGE, "boxes": boxes}
    entry = jobs.autolabel({"task": task, "mode": "boxes", "output": OUTPUT}, runtime=runtime)
    assert len(entry["result"]) >= 3 and prompts_per_call == [2, 1]
