"""Workers run the jobs of ``serving.jobs.JOBS`` and nothing else: RQ would import and call any
function (or callback) a job in Redis names. A real ModelWorker on the real Redis."""

from __future__ import annotations

import sys

from rq import Callback, Queue
from rq.job import Job, JobStatus

from serving.requests import HousekeepingRequest
from serving.runtime import ModelRuntime
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport
from tests.conftest import TI_CHECKPOINT
from worker.model_worker import ModelWorker


def test_a_job_outside_the_table_is_refused_unimported_and_table_jobs_run(
    redis_connection, redis_url, tmp_path, monkeypatch
):
    imported, ran, made = tmp_path / "imported", tmp_path / "ran", tmp_path / "made"
    (tmp_path / "planted_jobs.py").write_text(  # importing it, or calling run, leaves a file
        f"open({str(imported)!r}, 'w').close()\n\n\n"
        f"def run(*args, **kwargs):\n    open({str(ran)!r}, 'w').close()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    queue = Queue("batch", connection=redis_connection, serializer=JobSerializer)
    refused = {
        "not a job of this service": queue.enqueue_call("os.mkdir", args=(str(made),)),
        "'os.getcwd' is not a job": queue.enqueue_call("os.getcwd"),
        "'planted_jobs.run' is not a job": queue.enqueue_call("planted_jobs.run"),
        "names callbacks": queue.enqueue_call(
            "serving.jobs.housekeeping", args=({},), on_failure=Callback("planted_jobs.run")
        ),
        "keyword arguments": queue.enqueue_call(
            "serving.jobs.housekeeping", args=({},), kwargs={"runtime": "planted"}
        ),
    }
    malformed = queue.enqueue_call("serving.jobs.prewarm", args=({"task": 1},))
    settings = Settings.from_env(
        {}, redis_url=redis_url, checkpoint=TI_CHECKPOINT, model_dir=tmp_path / "models"
    )
    transport = QueueTransport(settings)
    table_job = transport.submit("housekeeping", HousekeepingRequest())

    runtime = ModelRuntime(settings, redis=redis_connection)  # housekeeping needs no model
    ModelWorker(["batch"], runtime=runtime, connection=redis_connection).work(burst=True)

    def fetched(job_id: str) -> Job:
        return Job.fetch(job_id, connection=redis_connection, serializer=JobSerializer)

    for reason, job in refused.items():
        job = fetched(job.id)
        assert job.get_status() == JobStatus.FAILED, reason
        failure = job.latest_result().exc_string
        assert failure.startswith("JobRefused: ") and reason in failure, failure
    assert not imported.exists() and not ran.exists() and not made.exists()
    assert "planted_jobs" not in sys.modules
    failure = fetched(malformed.id).latest_result().exc_string.strip().splitlines()[-1]
    assert failure.endswith(
        "InvalidRequest: invalid PrewarmRequest: Object missing required field `image`"
    )
    done = fetched(table_job)
    assert done.get_status() == JobStatus.FINISHED
    assert set(done.return_value()) == {"pruned_cache_entries", "republished_registry"}
    transport.close()
    runtime.close()
