"""The promotion gate of a fine-tuning run."""

from __future__ import annotations

import pytest

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
