"""TrainingImage validation, low-res targets and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efficientsam.training.data import TrainingImage, low_res_target, split_by_task

IDS = [f"task-{i}" for i in range(200)]


def test_split_is_deterministic_and_independent_of_order():
    train, held = split_by_task(IDS, 0.2, seed=3)
    again = split_by_task(list(reversed(IDS)), 0.2, seed=3)
    assert set(train) == set(again[0]) and set(held) == set(again[1])
    assert train == [i for i in IDS if i in set(train)]  # input order kept


def test_split_is_disjoint_complete_and_near_the_fraction():
    train, held = split_by_task(IDS, 0.2)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(IDS)
    assert 20 <= len(held) <= 60


def test_split_depends_on_the_seed():
    assert split_by_task(IDS, 0.2, seed=0)[1] != split_by_task(IDS, 0.2, seed=1)[1]


def test_held_out_ids_stay_held_out_when_the_project_grows():
    _, held_small = split_by_task(IDS[:50])
    _, held_large = split_by_task(IDS)
    assert set(held_small) <= set(held_large)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_small_projects_hold_out_at_least_one_and_train_on_at_least_one(count):
    for seed in range(20):
        train, held = split_by_task(IDS[:count], 0.2, seed)
        assert len(held) >= 1 and len(train) >= 1
    assert split_by_task(["only"]) == (["only"], [])
    assert split_by_task(IDS[:4], 1.0)[0]  # even "all held out" keeps one to train on


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError):
        split_by_task(IDS, 1.5)


def test_training_image_validation():
    embedding = torch.zeros(1, 256, 64, 64)
    mask = np.zeros((30, 40), bool)
    image = TrainingImage("a", embedding, [mask, mask.astype(np.uint8)])
    assert image.size == (30, 40) and image.masks[1].dtype == bool
    with pytest.raises(ValueError):
        TrainingImage("b", torch.zeros(1, 256, 32, 32), [mask])
    with pytest.raises(ValueError):
        TrainingImage("c", embedding, [mask, np.zeros((31, 40), bool)])
    with pytest.raises(ValueError):
        TrainingImage("d", embedding, [mask], image=np.zeros((20, 40, 3), np.uint8))


def test_low_res_target_stretches_to_256():
    mask = np.zeros((100, 400), bool)
    mask[:, :200] = True  # left half
    target = low_res_target(mask)
    assert target.shape == (256, 256)
    assert target[:, :128].all() and not target[:, 128:].any()
    small = np.zeros((64, 32), bool)
    small[:32] = True  # top half, enlarged
    assert low_res_target(small)[:127].all() and not low_res_target(small)[129:].any()
