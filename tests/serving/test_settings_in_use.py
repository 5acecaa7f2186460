"""Settings that were module constants reach the transport: RQ's result and failure TTLs, how
long a version's load error is reported. (LOADED_VERSIONS, BOX_CHUNK_PIXELS: test_jobs.py.)"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from rq.job import Job

from serving.registry import ModelRegistry
from serving.requests import OutputSpec, PrewarmRequest, PromptSpec, SegmentRequest
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport, TransportError
from tests.redis_fixtures import IMAGE, wait_until


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
        queued = transport.submit("prewarm", PrewarmRequest(project="1", task=1, image=IMAGE))
        click = SegmentRequest(
            image=IMAGE,
            size=(640, 480),
            prompt=PromptSpec(points=[(5, 5)], labels=[1]),
            output=OutputSpec(tag="BrushLabels", name="tag", to_name="image", labels=["Car"]),
        )
        call = waiting.submit(transport.call, "segment", click, 2)
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
