"""The compute thread: clicks first, background work cut at checkpoints, deadlines, and other
threads (training) standing back while clicks run."""

from __future__ import annotations

import threading
import time

import pytest

from serving.compute import BACKGROUND, URGENT, ComputeThread, DeadlineExceeded, work_class


@pytest.fixture
def compute():
    thread = ComputeThread()
    yield thread
    thread.close()


def test_a_click_runs_at_the_next_checkpoint_of_background_work(compute):
    order = []
    started = threading.Event()
    release = threading.Event()

    def background():
        started.set()
        release.wait(10)
        for step in range(3):
            order.append(f"background {step}")
            compute.checkpoint()
        return "done"

    batch = compute.submit(background, BACKGROUND)
    assert started.wait(10)
    click = compute.submit(lambda: order.append("click") or "clicked", URGENT)
    release.set()
    assert click.result(10) == "clicked" and batch.result(10) == "done"
    # the click ran inside the background work, at its first checkpoint, not after it
    assert order == ["background 0", "click", "background 1", "background 2"]


def test_priority_then_submission_order(compute):
    gate = threading.Event()
    order = []
    compute.submit(lambda: gate.wait(10), URGENT)
    futures = [
        compute.submit(lambda: order.append("b1"), BACKGROUND),
        compute.submit(lambda: order.append("u1"), URGENT),
        compute.submit(lambda: order.append("b2"), BACKGROUND),
        compute.submit(lambda: order.append("u2"), URGENT),
    ]
    gate.set()
    for future in futures:
        future.result(10)
    assert order == ["u1", "u2", "b1", "b2"]


def test_background_work_stops_at_a_checkpoint_after_its_deadline(compute):
    def long_work():
        for _ in range(1000):
            time.sleep(0.01)
            compute.checkpoint()
        return "finished"

    future = compute.submit(long_work, BACKGROUND, deadline=time.monotonic() + 0.2)
    with pytest.raises(DeadlineExceeded):
        future.result(10)
    assert compute.submit(lambda: "next", BACKGROUND).result(10) == "next"  # still serving


def test_run_uses_the_callers_work_class(compute):
    token = work_class.set((BACKGROUND, time.monotonic() - 1))
    try:
        with pytest.raises(DeadlineExceeded):
            compute.run(compute.checkpoint)
    finally:
        work_class.reset(token)
    assert compute.run(compute.checkpoint) is None  # default: background, no deadline


@pytest.mark.parametrize("priority", [URGENT, BACKGROUND])
def test_another_thread_waits_at_its_checkpoints_while_work_runs(compute, priority):
    click_running = threading.Event()
    finish_click = threading.Event()
    events = []

    def click():
        click_running.set()
        finish_click.wait(10)
        events.append("click done")

    future = compute.submit(click, priority)
    assert click_running.wait(10)

    def training_step():
        compute.checkpoint()  # stands back until the click is done
        events.append("training step")

    trainer = threading.Thread(target=training_step)
    trainer.start()
    time.sleep(0.2)
    assert events == []  # still waiting
    finish_click.set()
    future.result(10)
    trainer.join(10)
    assert events == ["click done", "training step"]


def test_checkpoints_as_forward_pre_hooks(compute):
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(2, 2)
    compute.attach([layer])
    token = work_class.set((BACKGROUND, time.monotonic() - 1))
    try:
        with pytest.raises(DeadlineExceeded):
            compute.run(lambda: layer(torch.zeros(1, 2)))
    finally:
        work_class.reset(token)
    import copy

    copied = copy.deepcopy(layer)  # a fine-tune's copy keeps the hook
    assert len(copied._forward_pre_hooks) == 1


def test_a_click_run_inline_does_not_inherit_the_background_works_torch_modes():
    """Background work under autocast and inference mode is interrupted at a checkpoint: the
    click run there sees neither (the embedded transport's isolation)."""
    torch = pytest.importorskip("torch")
    from serving.transports import _fresh_torch_state

    compute = ComputeThread(isolation=_fresh_torch_state)
    seen = {}
    started = threading.Event()
    release = threading.Event()

    def click():
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["inference"] = torch.is_inference_mode_enabled()

    def background():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            started.set()
            release.wait(10)
            compute.checkpoint()
            return torch.is_autocast_enabled("cpu") and torch.is_inference_mode_enabled()

    try:
        batch = compute.submit(background, BACKGROUND)
        assert started.wait(10)
        future = compute.submit(click, URGENT)
        release.set()
        assert batch.result(10) is True  # the background work's own modes are back
        future.result(10)
        assert seen == {"autocast": False, "inference": False}
    finally:
        compute.close()
