"""One thread for all of a process's model work, where clicks never wait for batch work.

Torch called from several threads makes their OpenMP teams spin against each other for the same
cores (measured: a 29 ms click became 37 ms), so the embedded backend runs every torch call on
one :class:`ComputeThread`. Torch-free.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
URGENT = 0  # a click: someone is waiting in the editor
BACKGROUND = 1  # batch tasks, prewarming, a fine-tune's embeddings

# What the calling thread's compute work is: (priority, deadline as time.monotonic() or None).
# Set by the embedded transport around a job function; read when the job submits torch work.
work_class: ContextVar[tuple[int, float | None]] = ContextVar(
    "efficientsam_work_class", default=(BACKGROUND, None)
)


class DeadlineExceeded(TimeoutError):
    """Background work that ran past its deadline (stopped at a checkpoint)."""


class ComputeThread:
    """A single worker thread running submitted functions by priority, with checkpoints.
    ``submit`` returns a Future; ``run`` waits for the result.

    Work has a priority (:data:`URGENT` for clicks, :data:`BACKGROUND` for batch tasks,
    prewarming and a fine-tune's embeddings). A queue alone would let a click wait for the whole
    background call in front of it (an encoder run, ~1 s on 2 CPU cores; "segment everything",
    ~8 s), so background work is cut into pieces at :meth:`checkpoint` calls: before every
    image-encoder block and every mask-decoder call (:meth:`attach`) and between the steps of
    long work that no hook covers."""

    def __init__(
        self,
        name: str = "model-compute",
        isolation: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        """``isolation``: a context manager factory entered around work run inline at a
        checkpoint, so that the interrupted work's thread-local modes (e.g. torch's autocast and
        inference mode) do not apply to it."""
        self._isolation = isolation or nullcontext
        self._heap: list[tuple[int, int, Callable[[], Any], Future, float | None]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._running = 0  # items being executed (nested: a click inside batch work)
        self._closed = False
        self._local = threading.local()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- submitting ----------------------------------------------------------------------------
    def submit(
        self, function: Callable[[], T], priority: int = BACKGROUND, deadline: float | None = None
    ) -> Future:
        """Queue ``function``; lower ``priority`` runs first (FIFO within one priority).
        ``deadline`` (time.monotonic()): background work past it stops at a checkpoint."""
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("the compute thread is closed")
            heapq.heappush(self._heap, (priority, next(self._order), function, future, deadline))
            self._changed.notify_all()
        return future

    def run(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the compute thread with the caller's :data:`work_class` and wait
        for its result (inline when called from the compute thread itself)."""
        if threading.current_thread() is self._thread:
            return function()
        priority, deadline = work_class.get()
        return self.submit(function, priority, deadline).result()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Let waiting clicks go first.

        On the compute thread, inside background work: waiting clicks run inline at once (same
        thread, same OpenMP team), then the background work goes on; past its deadline it stops
        with :class:`DeadlineExceeded`. Inside a click (or model loading): nothing. On another
        thread (a fine-tune's training): waits while the compute thread has work, queued or
        running, so training takes only the time that clicks and batch tasks leave."""
        if threading.current_thread() is self._thread:
            state = self._local
            if getattr(state, "priority", URGENT) == URGENT:
                return  # a click (or model loading): never interrupted
            self._run_waiting_urgent()
            deadline = getattr(state, "deadline", None)
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the time budget of this work is used up")
            return
        with self._changed:  # another thread (training): stand back while there is work
            while not self._closed and (self._running or self._heap):
                self._changed.wait(0.05)

    def attach(self, modules) -> list:
        """Call :meth:`checkpoint` before each of ``modules``' forward passes (torch modules);
        returns the hook handles. The hook is a plain function: a deep copy of a hooked module
        (a fine-tuned version's part, ``serving.runtime.derived_model``) keeps it."""
        compute = self

        def hook(module, args):  # a plain function: deep copies of the module share it
            compute.checkpoint()

        return [module.register_forward_pre_hook(hook) for module in modules]

    # -- the thread ----------------------------------------------------------------------------
    def _urgent_waiting(self) -> bool:
        return bool(self._heap) and self._heap[0][0] == URGENT

    def _run_waiting_urgent(self) -> None:
        while True:
            with self._changed:
                if not self._urgent_waiting():
                    return
                item = heapq.heappop(self._heap)
            with self._isolation():
                self._execute(item)

    def _execute(self, item) -> None:
        priority, _, function, future, deadline = item
        if not future.set_running_or_notify_cancel():
            return
        state = self._local
        outer = (getattr(state, "priority", URGENT), getattr(state, "deadline", None))
        state.priority, state.deadline = priority, deadline
        with self._changed:
            self._running += 1
        try:
            future.set_result(function())
        except BaseException as error:  # handed to the caller
            future.set_exception(error)
        finally:
            state.priority, state.deadline = outer
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._heap and not self._closed:
                    self._changed.wait()
                if self._closed and not self._heap:
                    return
                item = heapq.heappop(self._heap)
            self._execute(item)

    def close(self, cancel: bool = True) -> None:
        """Stop taking work; queued work is cancelled (``cancel``) or finished first."""
        with self._changed:
            self._closed = True
            if cancel:
                for item in self._heap:
                    item[3].cancel()
                self._heap.clear()
            self._changed.notify_all()
