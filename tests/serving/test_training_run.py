"""The promotion gate of a fine-tuning run."""

from __future__ import annotations

import pytest

from serving.serialization import JobSerializer
from serving.training_run import held_out_score, promotion_decision


def metrics(one: float, box: float, three: float) -> dict:
    return {"one_click_miou": one, "box_miou": box, "three_click_miou": three, "count": 10}


def test_held_out_score_is_the_mean_of_the_three_prompt_kinds():
    assert held_out_score(metrics(0.3, 0.6, 0.9)) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("current", "candidate", "promoted"),
    [
        (metrics(0.30, 0.50, 0.40), metrics(0.20, 0.45, 0.35), False),  # worse: rejected
        (metrics(0.30, 0.50, 0.40), metrics(0.30, 0.50, 0.40), False),  # equal: not enough
        (metrics(0.30, 0.50, 0.40), metrics(0.305, 0.505, 0.405), False),  # below the margin
        (metrics(0.30, 0.50, 0.40), metrics(0.32, 0.52, 0.41), True),  # beats it by > 0.01
        (metrics(0.30, 0.50, 0.40), metrics(0.10, 0.95, 0.40), True),  # the mean decides
    ],
)
def test_the_gate_promotes_only_a_candidate_that_beats_the_served_version(
    current, candidate, promoted
):
    decision, reason = promotion_decision(current, candidate, margin=0.01)
    assert decision is promoted
    assert (
        f"{held_out_score(candidate):.3f}" in reason and f"{held_out_score(current):.3f}" in reason
    )


def test_the_gate_with_real_evaluations_rejects_an_unchanged_model(ti_model):
    from benchmarks.synthetic import make_dataset
    from efficientsam.predictor import Predictor
    from efficientsam.training import TrainingImage, evaluate

    predictor = Predictor(ti_model)
    images = [
        TrainingImage(s.image_id, predictor.embed(s.image).embeddings, s.masks)
        for s in make_dataset(3, seed=5)
    ]
    scores = evaluate(ti_model, images)
    assert evaluate(ti_model, images) == scores  # same prompts, same numbers
    assert promotion_decision(scores, scores, margin=0.01)[0] is False


def test_periodic_trigger_queues_one_finetune_per_project_over_the_threshold(
    redis_connection, redis_url, tmp_path
):
    """``schedule_training`` (the cron job) against the real Redis: a project with enough new
    annotations gets one fine-tune on ``train``, one below the threshold none, and a second
    check while the first is queued adds nothing."""
    from rq import Queue

    from serving import jobs
    from serving.labelstudio.tasks import annotation_events
    from serving.runtime import ModelRuntime
    from serving.settings import Settings
    from tests.conftest import TI_CHECKPOINT

    settings = Settings.from_env(
        {"REDIS_URL": redis_url, "TRAIN_MIN_NEW_ANNOTATIONS": "3"},
        checkpoint=TI_CHECKPOINT,
        model_dir=tmp_path,
    )
    runtime = ModelRuntime(settings, redis=redis_connection)  # the model is not needed
    for project, count in (("3", 3), ("4", 2)):
        for annotation_id in range(count):
            event = {
                "action": "ANNOTATION_CREATED",
                "annotation": {"id": int(project) * 100 + annotation_id, "task": 1},
            }
            runtime.project_state.record(project, *annotation_events(event))

    first = jobs.schedule_training({}, runtime=runtime)
    assert first == {"queued": {"3": "finetune-p3"}, "threshold": 3}
    again = jobs.schedule_training({}, runtime=runtime)
    assert again["queued"] == {"3": "finetune-p3"}
    queue = Queue("train", connection=redis_connection, serializer=JobSerializer)
    assert queue.job_ids == ["finetune-p3"]
    job = queue.fetch_job("finetune-p3")
    assert job.func_name == "serving.jobs.finetune"
    assert job.args[0] == {"project": "3", "trigger": "3 new annotations"}
