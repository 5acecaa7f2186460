"""The periodic training check of ``python -m worker cron``, against the real Redis."""

from __future__ import annotations

from rq import Queue

from serving.labelstudio.tasks import annotation_events
from serving.projects import RedisProjectState
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport
from tests.redis_fixtures import wait_until
from worker.schedule import JsonCronScheduler, queue_due_training, register_periodic_jobs


def record(state: RedisProjectState, counts: dict[str, int]) -> None:
    """``count`` annotations saved in each project, as LS's webhooks report them."""
    for project, count in counts.items():
        for annotation_id in range(count):
            event = {
                "action": "ANNOTATION_CREATED",
                "annotation": {"id": int(project) * 100 + annotation_id, "task": 1},
            }
            state.record(project, *annotation_events(event))


def test_the_check_queues_one_finetune_per_project_over_the_threshold(redis_connection, redis_url):
    """A project with enough new annotations gets one fine-tune on ``train``, one below the
    threshold none, and a second check while the first is queued adds nothing."""
    transport = QueueTransport(Settings.from_env({}, redis_url=redis_url))
    record(transport.project_state, {"3": 3, "4": 2})
    assert queue_due_training(transport, 3) == {"3": "finetune-p3"}
    assert queue_due_training(transport, 3) == {"3": "finetune-p3"}
    queue = Queue("train", connection=redis_connection, serializer=JobSerializer)
    assert queue.job_ids == ["finetune-p3"]
    job = queue.fetch_job("finetune-p3")
    assert job.func_name == "serving.jobs.finetune"
    assert job.args[0] == {"project": "3", "trigger": "3 new annotations"}
    transport.close()


def test_a_sami_project_gets_sami_runs_on_annotations_and_every_n_hours(
    redis_connection, redis_url
):
    """``train_mode: sami`` turns the annotation trigger into a SAMI run; ``sami_every_hours``
    queues one when the last SAMI run started longer ago (or never), not before."""
    transport = QueueTransport(Settings.from_env({}, redis_url=redis_url))
    transport.set_project_params("3", {"train_mode": "sami"})
    transport.set_project_params("4", {"train_mode": "sami", "sami_every_hours": 24})
    transport.set_project_params("5", {"sami_every_hours": "24"})  # not a number: no timer
    transport.set_project_params(None, {"sami_every_hours": 1})  # a /setup without a project
    record(transport.project_state, {"3": 3})
    state = transport.project_state
    state.mark_started("4", "sami", when=1_000_000.0)
    now = 1_000_000.0 + 23 * 3600
    assert queue_due_training(transport, 3, now=now) == {"3": "sami-p3"}
    queue = Queue("train", connection=redis_connection, serializer=JobSerializer)
    job = queue.fetch_job("sami-p3")
    assert job.func_name == "serving.jobs.sami"
    assert job.args[0] == {
        "project": "3",
        "trigger": "3 new annotations",
        "takes_annotation_count": True,
    }
    assert queue_due_training(transport, 3, now=now + 3600) == {
        "3": "sami-p3",
        "4": "sami-p4",
    }
    timed = queue.fetch_job("sami-p4").args[0]
    assert timed["trigger"] == "every 24 h"
    assert timed["takes_annotation_count"] is False  # the fine-tune's count stays
    state.mark_started("4", "sami", when=now + 3600)
    queue.empty()
    assert queue_due_training(transport, 3, now=now + 7200) == {"3": "sami-p3"}
    transport.close()


def test_the_cron_process_runs_the_check_itself(workers, redis_connection, redis_url):
    """``python -m worker cron`` (no model, no worker) queues the fine-tune at its start, and
    housekeeping as a job on ``batch``; nothing else is queued for the check."""
    record(RedisProjectState(redis_connection), {"5": 2})
    cron = workers.start("cron", env={"TRAIN_MIN_NEW_ANNOTATIONS": "2"}, name="cron")
    train = Queue("train", connection=redis_connection, serializer=JobSerializer)
    batch = Queue("batch", connection=redis_connection, serializer=JobSerializer)
    wait_until(lambda: train.job_ids and batch.job_ids, 60, "the cron's first round")
    assert train.job_ids == ["finetune-p5"]
    assert train.fetch_job("finetune-p5").args[0]["trigger"] == "2 new annotations"
    assert [job.func_name for job in batch.jobs] == ["serving.jobs.housekeeping"]
    assert cron.poll() is None, workers.log(cron)


def test_periodic_jobs_run_every_housekeeping_and_train_check_seconds(redis_connection, redis_url):
    scheduler = JsonCronScheduler(redis_connection)
    env = {"HOUSEKEEPING_SECONDS": "42", "TRAIN_CHECK_SECONDS": "77"}
    register_periodic_jobs(scheduler, Settings.from_env(env, redis_url=redis_url))
    intervals = {job.name: job.interval for job in scheduler.get_jobs()}
    assert intervals == {"housekeeping": 42, "schedule-training": 77}
