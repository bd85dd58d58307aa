"""Work whose every client has gone: dropped before it runs, stopped at the next step.

A job reaches the pipeline through Serve's batcher and the coalescer, split in parts of at
most a batch each, and each part travels as a ``Work``: the job plus whether anyone still
waits for it. The replica's stream marks its parts abandoned as it ends, however it ends
(the router cancelled it: a client went away, a deadline passed, another part failed).
Then

- a part still queued in the coalescer is dropped before it runs
  (``BatchCoalescer(is_abandoned=...)``), and a pipeline call whose parts were all abandoned
  before it started is not started (``run_call_unless_abandoned``);
- a pipeline call that is running stops at the next denoising step once every part in it is
  abandoned: ``StopWhenAbandoned`` is the call's ``callback_on_step_end``, and sets the
  pipeline's interrupt flag, which diffusers' SDXL, FLUX and Qwen-Image pipelines (all three
  modes) check at the top of each step (``if self.interrupt: continue``). The steps left are
  skipped; the pipeline still decodes the latents it has (one VAE pass) and returns, and the
  images are thrown away.

A call that batches an abandoned part with a live one runs to the end: the live part's images
must be exactly what they would be alone. Kept free of torch and Serve, so it is tested with a
fake pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.grouping import PipelineCall
from serve_app.work import GenerationJob

logger = logging.getLogger("ray.serve")

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


@dataclass(eq=False)
class Work:
    """One part of a job inside the replica, and whether anyone still waits for it.

    ``abandoned`` is set on the event loop and read on the pipeline thread: a plain bool, which
    the pipeline reads once per step.
    """

    job: GenerationJob
    abandoned: bool = False

    @property
    def num_images(self) -> int:  # what ``count_images`` (Serve's batch_size_fn) counts
        return self.job.num_images


class Abandoned(Exception):
    """A pipeline call that was stopped, or never started, because nobody waits for it."""


class StopWhenAbandoned:
    """``callback_on_step_end`` of one pipeline call: once every part in the call is abandoned,
    sets the pipeline's interrupt flag (the remaining steps are skipped); until then it hands
    each step to ``then`` (the streamed previews), if any."""

    def __init__(self, works: Sequence[Work], then: StepCallback | None = None) -> None:
        self._works = list(works)
        self._then = then
        self.interrupted_after: int | None = None  # the 0-based step after which it stopped

    @property
    def interrupted(self) -> bool:
        return self.interrupted_after is not None

    def all_abandoned(self) -> bool:
        return all(work.abandoned for work in self._works)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.interrupted or self.all_abandoned():
            if self.interrupted_after is None:
                self.interrupted_after = step
            pipe._interrupt = True  # diffusers' pipelines check `self.interrupt` before each step
            return {}
        if self._then is None:
            return {}
        return self._then(pipe, step, timestep, callback_kwargs)


def run_call_unless_abandoned(
    works: Sequence[Work],
    call: PipelineCall,
    run_call: Callable[[PipelineCall, StepCallback], Sequence[Any]],
    previews: StepCallback | None = None,
) -> Sequence[Any]:
    """Run one pipeline call of a batch of ``works`` (``call.owners`` index into it) with a
    ``StopWhenAbandoned`` step callback; raise ``Abandoned`` instead of starting it when every
    part in it is already abandoned, and instead of returning images when it was stopped."""
    owners = [works[index] for index in sorted({job_index for job_index, _ in call.owners})]
    guard = StopWhenAbandoned(owners, previews)
    if guard.all_abandoned():
        raise Abandoned(f"a call of {len(call.prompts)} images was dropped: nobody waits for it")
    images = run_call(call, guard)
    if guard.interrupted:
        logger.info(
            "stopped a call of %d images after its denoising step %d: nobody waits for it",
            len(call.prompts),
            guard.interrupted_after + 1,
        )
        raise Abandoned(f"a call of {len(call.prompts)} images was stopped: nobody waits for it")
    return images
