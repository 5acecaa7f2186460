"""``python -m worker finetune | sami --project N``: the run of that mode is queued on ``train``
(the same job as "Start training"), against the real Redis."""

from __future__ import annotations

import pytest
from rq import Queue

from serving.serialization import JobSerializer
from worker.__main__ import main


@pytest.mark.parametrize(
    ("command", "job_id", "function", "what"),
    [
        ("sami", "sami-p7", "serving.jobs.sami", "SAMI run"),
        ("finetune", "finetune-p7", "serving.jobs.finetune", "fine-tune"),
    ],
)
def test_the_command_queues_the_projects_run(
    command, job_id, function, what, redis_connection, redis_url, capsys
):
    assert main([command, "--project", "7", "--no-wait", "--redis-url", redis_url]) == 0
    assert capsys.readouterr().out.strip() == f"{what} of project 7: job {job_id}"
    queue = Queue("train", connection=redis_connection, serializer=JobSerializer)
    assert queue.job_ids == [job_id]
    job = queue.fetch_job(job_id)
    assert job.func_name == function
    assert {k: job.args[0][k] for k in ("project", "trigger")} == {
        "project": "7",
        "trigger": "command line",
    }
    assert job.args[0].get("takes_annotation_count", True) is True
    # asked again while it is queued: the same job, not a second one
    assert main([command, "--project", "7", "--no-wait", "--redis-url", redis_url]) == 0
    assert queue.job_ids == [job_id]


def test_sami_needs_a_project(redis_url):
    with pytest.raises(SystemExit, match="sami needs --project"):
        main(["sami", "--redis-url", redis_url])
