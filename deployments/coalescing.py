"""Merge batches that queued while the pipeline was busy.

``@serve.batch`` closes a batch when it is full or its wait timeout passes, whether or not
the pipeline is free: in Ray Serve's ``_BatchQueue`` the next batch is formed before the
concurrency semaphore is taken. Under load the pipeline then meets a queue of small batches
(at 16 clients, max 8 images and a 0.05 s wait they came out at 2 to 8 images) and runs
each one separately, and a small batch costs nearly as much as a full one.

``BatchCoalescer`` sits between the two: the jobs of every gathered batch go into one FIFO,
and whenever the pipeline thread becomes free it takes the oldest job plus every following
one that still fits in ``max_images``. An idle pipeline starts at once; a busy one gets one
full batch next instead of several small ones. A job whose caller has gone (its future is
cancelled, or ``is_abandoned`` says so) is dropped from the queue before it runs. Kept free of
torch and Serve so it is tested with a fake pipeline.

Two lanes (``is_batch``): interactive jobs are taken first, oldest first, as above; batch jobs
(Batch API lines) only top the batch up, and only when they share the call shape of an
interactive job taken (``shape_of``), so they ride in a pipeline call that runs anyway and add
no call of their own. With no interactive job waiting, batch jobs make a batch of their own,
but not straight after a call that carried interactive work: for ``batch_grace_s`` the
pipeline waits for the next interactive job first. Under steady interactive load the next
requests are on their way back through the proxy and ingress at that moment, and a batch-only
call started then would make every one of them wait for it (measured on the tiny SDXL with 4
closed-loop clients: interactive p99 1.9x with a batch running). An interactive job thus never
waits for batch work longer than the one batch running when it arrived, and that batch is
rarely a batch-only one while interactive traffic flows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger("ray.serve")

JobT = TypeVar("JobT")
OutcomeT = TypeVar("OutcomeT")


@dataclass
class _Pending(Generic[JobT, OutcomeT]):
    job: JobT
    images: int
    future: asyncio.Future[OutcomeT]
    batch: bool = False


class BatchCoalescer(Generic[JobT, OutcomeT]):
    """Runs batches one at a time on ``executor``, merging the jobs that wait.

    ``run_batch`` is called on the executor with a list of jobs and returns one outcome per
    job, in order. ``size_of`` counts a job's images; ``max_images`` is read at every merge,
    so a runtime change of the batch limit applies to the next batch. ``on_batch`` hears the
    image count of every batch the pipeline runs (a metric). ``is_abandoned`` tells a job that
    nobody waits for any more (``deployments/abandonment.py``): it is dropped, unrun, and its
    future cancelled.
    """

    def __init__(
        self,
        run_batch: Callable[[list[JobT]], Sequence[OutcomeT]],
        executor: Executor,
        size_of: Callable[[JobT], int],
        max_images: Callable[[], int],
        on_batch: Callable[[int], None] | None = None,
        is_abandoned: Callable[[JobT], bool] | None = None,
        is_batch: Callable[[JobT], bool] | None = None,
        shape_of: Callable[[JobT], Hashable] | None = None,
        batch_grace_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._size_of = size_of
        self._max_images = max_images
        self._queue: deque[_Pending[JobT, OutcomeT]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._on_batch = on_batch
        self._is_abandoned = is_abandoned
        self._is_batch = is_batch
        self._shape_of = shape_of
        self._batch_grace_s = batch_grace_s
        self._interactive_arrived = asyncio.Event()
        self._interactive_ran_until = float("-inf")  # loop time the last interactive call ended

    def submit(self, job: JobT) -> asyncio.Future[OutcomeT]:
        """Queue a job; the future gets its outcome. Call on the event loop.

        Jobs submitted in one go (one ``@serve.batch`` batch) are all queued before the
        pipeline takes any, so they stay together.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[OutcomeT] = loop.create_future()
        batch = self._is_batch is not None and self._is_batch(job)
        self._queue.append(_Pending(job, self._size_of(job), future, batch))
        if not batch:
            self._interactive_arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return future

    def _take_merged(self) -> list[_Pending[JobT, OutcomeT]]:
        """The oldest live interactive job plus the following interactive ones while they
        fit, in order, topped up with batch jobs of their shapes; with no interactive job,
        the same of the batch jobs."""
        live: deque[_Pending[JobT, OutcomeT]] = deque()
        for pending in self._queue:
            if pending.future.cancelled() or self._abandoned(pending.job):
                pending.future.cancel()  # its caller is gone: no pipeline time for it
            else:
                live.append(pending)
        self._queue = live
        limit = self._max_images()
        interactive = [pending for pending in live if not pending.batch]
        batch = [pending for pending in live if pending.batch]
        taken = self._fitting(interactive or batch, limit)
        if interactive and batch and self._shape_of is not None:
            shapes = {self._shape_of(pending.job) for pending in taken}
            room = limit - sum(pending.images for pending in taken)
            riders = [pending for pending in batch if self._shape_of(pending.job) in shapes]
            taken += self._fitting(riders, room, first_always=False)
        chosen = {id(pending) for pending in taken}
        self._queue = deque(pending for pending in live if id(pending) not in chosen)
        return taken

    @staticmethod
    def _fitting(
        candidates: list[_Pending[JobT, OutcomeT]], limit: int, first_always: bool = True
    ) -> list[_Pending[JobT, OutcomeT]]:
        """The first candidates, in order, while they fit in ``limit`` images (the first one
        always, with ``first_always``: a job over the limit still runs, alone)."""
        taken: list[_Pending[JobT, OutcomeT]] = []
        images = 0
        for pending in candidates:
            if (taken or not first_always) and images + pending.images > limit:
                break
            taken.append(pending)
            images += pending.images
        return taken

    def _abandoned(self, job: JobT) -> bool:
        return self._is_abandoned is not None and self._is_abandoned(job)

    def _report(self, images: int) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(images)
        except Exception:  # a metric must never stop the pipeline
            logger.exception("could not report a batch of %d images", images)

    async def _await_interactive(self) -> None:
        """Only batch jobs wait, and interactive work ran a moment ago: give its next job
        ``batch_grace_s`` (from the end of that call) to arrive before batch work alone runs."""
        loop = asyncio.get_running_loop()
        if any(not pending.batch for pending in self._queue):
            return
        remaining = self._interactive_ran_until + self._batch_grace_s() - loop.time()
        if remaining <= 0:
            return
        self._interactive_arrived.clear()
        try:
            await asyncio.wait_for(self._interactive_arrived.wait(), remaining)
        except asyncio.TimeoutError:
            pass

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            await self._await_interactive()
            taken = self._take_merged()
            if not taken:
                return
            self._report(sum(pending.images for pending in taken))
            try:
                outcomes = list(await loop.run_in_executor(
                    self._executor, self._run_batch, [pending.job for pending in taken]
                ))
                if len(outcomes) != len(taken):
                    raise RuntimeError(f"batch runner returned {len(outcomes)} outcomes for {len(taken)} jobs")
            except Exception as exc:  # noqa: BLE001 - delivered to every caller of this batch
                for pending in taken:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, outcome in zip(taken, outcomes):
                if not pending.future.done():
                    pending.future.set_result(outcome)
            if any(not pending.batch for pending in taken):
                self._interactive_ran_until = loop.time()
