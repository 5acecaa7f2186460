"""Nothing that comes out of Redis is unpickled: RQ jobs, their meta and results are JSON
(serving/serialization.py), embedding cache entries are raw arrays behind a fixed header. Each
test plants what an attacker who can write to Redis would plant: a pickle whose loading creates
a file, and checks that the file never appears."""

from __future__ import annotations

import pickle
import threading
import zlib

import numpy as np
import orjson
import pytest
import torch
from rq import Queue
from rq.cron import get_cron_job_ids
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import DefaultSerializer

from efficientsam.cache import EmbeddingKey
from serving.cache_redis import RedisEmbeddingCache, encode_embedding
from serving.requests import FinetuneRequest, OutputSpec, PromptSpec, SegmentRequest
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport, TransportError
from tests.redis_fixtures import wait_until

CLICK = SegmentRequest(
    task=1,
    image="/data/upload/1/image.png",
    size=(640, 480),
    prompt=PromptSpec(points=[(5.0, 5.0)], labels=[1]),
    output=OutputSpec(tag="BrushLabels", name="tag", to_name="image", labels=["Object"]),
)


class Planted:
    """Unpickling it creates the file ``path`` (stands for any code an attacker would run)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_serializer_writes_json_with_arrays_and_refuses_anything_else(tmp_path):
    rle = np.arange(6, dtype=np.uint8)
    value = {"rle": rle, "mask": np.eye(3, dtype=bool)[:, ::2], "score": np.float32(0.5), "n": 3}
    data = JobSerializer.dumps(["serving.jobs.segment", None, [value], {}])
    assert orjson.loads(data)[2][0]["rle"] == {"__ndarray__": ["uint8", [6], "AAECAwQF"]}
    back = JobSerializer.loads(data)[2][0]
    assert back["rle"].dtype == np.uint8 and back["rle"].tolist() == rle.tolist()
    assert back["mask"].tolist() == np.eye(3, dtype=bool)[:, ::2].tolist()
    assert back["score"] == 0.5 and back["n"] == 3
    for not_json in ({1, 2}, np.array([object()]), np.array([1j])):
        with pytest.raises(TypeError, match="not JSON"):
            JobSerializer.dumps({"value": not_json})
    for planted in (
        ["object", [1], "AA=="],  # a dtype numpy would unpickle
        ["uint8", [9], "AAECAwQF"],  # more elements than bytes
        ["uint8", [6], "not base64!"],
        "AAECAwQF",
    ):
        with pytest.raises(ValueError):
            JobSerializer.loads(orjson.dumps({"rle": {"__ndarray__": planted}}))
    marker = tmp_path / "unpickled"
    with pytest.raises(ValueError):
        JobSerializer.loads(pickle.dumps(Planted(marker)))
    assert not marker.exists()


@pytest.mark.slow
def test_a_worker_never_unpickles_a_planted_job_and_serves_on(workers, redis_connection, tmp_path):
    """A pickled job (data and meta) put on ``batch`` with RQ's default serializer fails cleanly
    in a real ``python -m worker`` process without being loaded; the worker stays up and runs
    the next job, which ``python -m worker cron`` enqueued as JSON."""
    marker = tmp_path / "unpickled"
    planted = Queue("batch", connection=redis_connection, serializer=DefaultSerializer).enqueue(
        "serving.jobs.housekeeping", Planted(marker), meta={"x": Planted(marker)}
    )
    worker = workers.start("--queues", "batch")
    workers.start("cron", name="cron")

    def status(job_id: str) -> str:
        return Job.fetch(job_id, redis_connection, JobSerializer).get_status()

    ended = (JobStatus.FAILED, JobStatus.FINISHED)
    wait_until(lambda: status(planted.id) in ended, 120, "the planted job taken")
    assert not marker.exists(), "a worker unpickled a job from Redis"
    assert status(planted.id) == JobStatus.FAILED
    failure = Job.fetch(planted.id, redis_connection, JobSerializer).latest_result()
    assert "DeserializationError" in failure.exc_string
    cron_jobs = wait_until(lambda: get_cron_job_ids("housekeeping", redis_connection), 60, "cron")
    housekeeping = cron_jobs[0]
    wait_until(lambda: status(housekeeping) == JobStatus.FINISHED, 60, "housekeeping ran")
    assert worker.poll() is None, workers.log(worker)
    raw = zlib.decompress(redis_connection.hget(f"rq:job:{housekeeping}", "data"))
    assert orjson.loads(raw) == ["serving.jobs.housekeeping", None, [{}], {}]
    result = Job.fetch(housekeeping, redis_connection, JobSerializer).return_value()
    assert set(result) == {"pruned_cache_entries", "republished_registry"}


def test_the_backend_never_unpickles_a_planted_meta_or_result(
    redis_connection, redis_url, tmp_path
):
    """The backend reads jobs (a submit checks an existing job id) and results (every click):
    a pickle planted in either is refused, never loaded."""
    marker = tmp_path / "unpickled"
    transport = QueueTransport(Settings.from_env({}, redis_url=redis_url))
    Queue("train", connection=redis_connection, serializer=DefaultSerializer).enqueue(
        "serving.jobs.finetune", {"project": "1"}, job_id="planted", meta={"x": Planted(marker)}
    )
    assert transport.submit("finetune", FinetuneRequest(project="1"), "planted") == "planted"
    assert not marker.exists(), "the backend unpickled a job's meta"

    def fake_worker() -> None:  # answers the click with a pickled result
        _, job_id = redis_connection.blpop("rq:queue:interactive", timeout=10)
        Result(
            job_id.decode(),
            Result.Type.SUCCESSFUL,
            redis_connection,
            return_value=Planted(marker),
            serializer=DefaultSerializer,
        ).save(ttl=60)

    answering = threading.Thread(target=fake_worker)
    answering.start()
    with pytest.raises(TransportError, match="unreadable") as refused:
        transport.call("segment", CLICK, 10)
    answering.join()
    assert refused.value.status == 500
    assert not marker.exists(), "the backend unpickled a result"


@pytest.mark.parametrize(
    "planted",
    ["pickle", b"ESE1", b"ESE1\x09\x00\x00\x00" + bytes(12), "truncated"],
    ids=["pickle", "short", "unknown-dtype", "truncated"],
)
def test_a_planted_cache_entry_is_a_miss_and_is_dropped(redis_connection, tmp_path, planted):
    marker = tmp_path / "unpickled"
    cache = RedisEmbeddingCache(redis_connection, "t")
    key = EmbeddingKey("fingerprint", "stretch1024-float32", "image")
    cache.put(key, torch.zeros(1, 256, 64, 64))
    good = encode_embedding(torch.zeros(1, 256, 64, 64))
    value = {"pickle": pickle.dumps(Planted(marker)), "truncated": good[:-10]}.get(planted, planted)
    redis_connection.set(f"t:embedding:{key}", value)
    assert cache.get(key) is None
    assert not redis_connection.exists(f"t:embedding:{key}")
    assert cache.stats().entries == 0 and cache.stats().bytes == 0
    assert not marker.exists()
    cache.put(key, torch.zeros(1, 256, 64, 64))  # written again by the next encoder run
    assert cache.get(key) is not None
