"""Work whose every client has gone stops (deployments/abandonment.py): queued parts never run,
a running pipeline call stops at its next denoising step, a call shared with a live job runs to
the end. First against a fake pipeline that denoises as diffusers' do, then on the installed
diffusers' pipelines of every family and mode, then through the replica's one generation
method, ``ImageModelDeployment.generate_stream``, on the tiny SDXL (without Ray: Serve's batcher
needs a replica context, so the test hands each part straight to the coalescer behind it)."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest

from deployments.abandonment import Abandoned, Work, run_call_unless_abandoned
from deployments.grouping import group_jobs, run_grouped
from serve_app.work import CallShape, GenerationJob, Mode, PreviewImage, StreamedImage
from tests.test_pipelines import FAMILIES, GUIDANCE, _input, _left_half_mask, _scene


def job(seeds=(1,), steps: int = 8, width: int = 64, partial_images: int = 0, mode: Mode = Mode.TEXT_TO_IMAGE,
        guidance: float = 5.0, image=None, mask=None) -> GenerationJob:
    shape = CallShape(
        width=width, height=64, steps=steps, guidance=guidance, with_negative_prompt=False, mode=mode,
        strength=None if mode is Mode.TEXT_TO_IMAGE else 0.75,
    )
    return GenerationJob("r", "a cat", None, shape, tuple(seeds), image=image, mask=mask, partial_images=partial_images)


# --- a fake pipeline --------------------------------------------------------------------------


class FakePipe:
    """The denoising loop of diffusers' pipelines: ``if self.interrupt: continue`` before each
    step, ``callback_on_step_end(self, i, t, kwargs)`` after it; ``during`` runs inside step i."""

    def __init__(self, during=None) -> None:
        self._interrupt = False
        self.steps_run = 0
        self.during = during or (lambda step: None)

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def run(self, call, on_step_end):
        self._interrupt = False
        for i in range(call.shape.steps):
            if self.interrupt:
                continue
            self.during(i)
            self.steps_run += 1
            on_step_end(self, i, 1000 - i, {"latents": None})
        return [f"image of seed {seed}" for seed in call.seeds]


def test_a_call_whose_jobs_are_all_abandoned_never_starts():
    works = [Work(job((1,))), Work(job((2,)))]
    for work in works:
        work.abandoned = True
    started = []
    (call,) = group_jobs([work.job for work in works])
    with pytest.raises(Abandoned):
        run_call_unless_abandoned(works, call, lambda call, callback: started.append(call))
    assert not started


def test_a_running_call_stops_after_the_step_during_which_its_last_job_went():
    works = [Work(job((1, 2)))]

    def during(step):
        if step == 2:
            works[0].abandoned = True  # the stream ended while step 2 ran

    pipe = FakePipe(during)
    (call,) = group_jobs([work.job for work in works])
    with pytest.raises(Abandoned):
        run_call_unless_abandoned(works, call, pipe.run)
    assert pipe.steps_run == 3  # steps 0, 1 and the one that was running: of 8


def test_a_call_with_one_live_job_runs_to_the_end_and_keeps_its_previews():
    works = [Work(job((1,))), Work(job((2,)))]
    previews = []

    def during(step):
        if step == 1:
            works[0].abandoned = True

    pipe = FakePipe(during)
    (call,) = group_jobs([work.job for work in works])
    images = run_call_unless_abandoned(works, call, pipe.run, lambda pipe, i, t, kwargs: previews.append(i) or {})
    assert pipe.steps_run == 8 and images == ["image of seed 1", "image of seed 2"]
    assert previews == list(range(8))


def test_in_a_batch_only_the_abandoned_call_is_dropped():
    works = [Work(job((1,))), Work(job((2,), width=128)), Work(job((3,)))]
    works[1].abandoned = True
    pipe = FakePipe()
    outcomes = run_grouped([work.job for work in works], lambda call: run_call_unless_abandoned(works, call, pipe.run))
    assert [outcome.images for outcome in outcomes] == [["image of seed 1"], [], ["image of seed 3"]]
    assert isinstance(outcomes[1].error, Abandoned) and outcomes[0].error is None
    assert pipe.steps_run == 8  # one call of 8 steps: the 128-wide one never started


# --- the installed diffusers pipelines ----------------------------------------------------------

@pytest.fixture(scope="module")
def pipes():
    from builtin_models import ensure_builtin_model
    from deployments.pipeline_loader import load_pipelines
    from tests.conftest import MODEL_CACHE

    for name in FAMILIES.values():
        ensure_builtin_model(name, MODEL_CACHE)
    return {
        family: load_pipelines(family, f"builtin:{name}", "cpu", "float32", MODEL_CACHE)
        for family, name in FAMILIES.items()
    }


class Denoiser:
    """Counts the forward passes of a pipeline's denoiser; ``on_forward(n)`` runs before the
    n-th (1-based) and may block it."""

    def __init__(self, module, on_forward=None) -> None:
        self.calls = 0
        self.on_forward = on_forward or (lambda n: None)
        self._hook = module.register_forward_pre_hook(self._before)

    def _before(self, module, args):
        self.calls += 1
        self.on_forward(self.calls)

    def remove(self) -> None:
        self._hook.remove()


@pytest.mark.parametrize("mode", [mode for mode in Mode if mode is not Mode.EDIT])  # EDIT: test_qwen_image_edit
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_and_mode_stops_at_the_next_step(pipes, family, mode):
    """The interrupt flag that StopWhenAbandoned sets is honoured by this diffusers' pipeline:
    abandoned during step 1, the call runs no step after it; the next call on the same
    pipeline runs all its steps (the flag is reset)."""
    from deployments.optimisations import denoiser_of
    from deployments.pipeline_runner import run_pipeline

    image = None if mode is Mode.TEXT_TO_IMAGE else _input(_scene())
    mask = _left_half_mask()[0] if mode is Mode.INPAINT else None
    works = [Work(job((4, 5), steps=8, mode=mode, guidance=GUIDANCE[family], image=image, mask=mask))]
    (call,) = group_jobs([works[0].job])
    steps = []  # denoiser passes seen at each step's end
    denoiser = Denoiser(denoiser_of(pipes[family][mode]))

    def on_forward(n):
        if len(steps) == 1:  # a pass of step 1
            works[0].abandoned = True

    def run(call, guard):
        def counted(pipe, i, t, kwargs):
            steps.append(denoiser.calls)
            return guard(pipe, i, t, kwargs)

        return run_pipeline(pipes[family], call.shape, call.prompts, None, call.seeds, "cpu",
                            images=call.images, masks=call.masks, on_step_end=counted)

    try:
        denoiser.on_forward = on_forward
        with pytest.raises(Abandoned):
            run_call_unless_abandoned(works, call, run)
        per_step = steps[0]
        assert len(steps) == 2 and denoiser.calls == 2 * per_step, (steps, denoiser.calls)

        # The same pipeline, next call: every step runs.
        live = [Work(works[0].job)]
        steps.clear()
        denoiser.on_forward, denoiser.calls = (lambda n: None), 0
        assert len(run_call_unless_abandoned(live, call, run)) == 2
        assert len(steps) > 2 and denoiser.calls == len(steps) * per_step
    finally:
        denoiser.remove()


# --- the replica --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replica():
    """The tiny SDXL replica (the class itself, as Serve would build it), no warm-up, no
    safety checker; each part goes straight to the coalescer, and every pipeline call is
    recorded by the seeds it ran."""
    from deployments.model_deployment import ImageModelDeployment
    from deployments.optimisations import denoiser_of
    from serve_app.config import load_app_config
    from tests.conftest import MODEL_CACHE, ROOT

    base = next(m for m in load_app_config(ROOT / "serve_config.yaml").models if m.family == "sdxl")
    data = base.model_dump(mode="json") | {"warmup": False, "safety_checker": None}
    replica = ImageModelDeployment(data, str(MODEL_CACHE))

    async def gather(work):
        return replica._coalescer.submit(work)

    replica._gather_batch = gather
    replica.calls = []
    run_call = replica._run_call

    def recording(call, on_step_end=None):
        replica.calls.append(tuple(call.seeds))
        return run_call(call, on_step_end)

    replica._run_call = recording
    replica.denoiser = Denoiser(denoiser_of(replica._pipelines.text_to_image))
    yield replica
    replica.denoiser.remove()


class Hold:
    """Holds the denoiser's n-th forward pass from now (1-based) until ``release``."""

    def __init__(self, replica, n: int) -> None:
        self.held, self.released = threading.Event(), threading.Event()
        replica.calls.clear()
        replica.denoiser.calls = 0
        replica.denoiser.on_forward = self._before
        self._n = n

    def _before(self, count: int) -> None:
        if count == self._n:
            self.held.set()
            assert self.released.wait(30)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.held.wait, 30)

    def release(self) -> None:
        self.released.set()


async def collect(stream) -> list:
    return [item for chunk in [chunk async for chunk in stream] for item in chunk]


async def until_idle(replica) -> None:
    """Until the pipeline thread has finished what it was running."""
    await asyncio.get_running_loop().run_in_executor(replica._pipeline_thread, lambda: None)


async def cancelled(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_json_job_yields_just_its_final_images(replica):
    async def scenario():
        Hold(replica, 0)
        return await collect(replica.generate_stream(job((7, 8, 9), steps=2)))

    items = asyncio.run(scenario())
    assert all(isinstance(item, StreamedImage) for item in items)
    assert sorted((item.image_index, item.image.seed) for item in items) == [(0, 7), (1, 8), (2, 9)]
    assert replica.calls == [(7, 8, 9)]


def test_work_abandoned_while_queued_never_runs(replica):
    async def scenario():
        hold = Hold(replica, 1)
        running = asyncio.create_task(collect(replica.generate_stream(job((1,), steps=4))))
        await hold.reached()
        waiting = asyncio.create_task(collect(replica.generate_stream(job((2, 3), steps=4))))
        while not replica._coalescer._queue:  # queued behind the running call
            await asyncio.sleep(0.001)
        await cancelled(waiting)  # its client went away
        hold.release()
        (item,) = await running
        assert item.image.seed == 1
        await until_idle(replica)

    asyncio.run(scenario())
    assert replica.calls == [(1,)]
    assert replica.denoiser.calls == 4


def test_a_running_call_nobody_waits_for_stops_after_at_most_one_more_step(replica):
    async def scenario():
        hold = Hold(replica, 3)  # step 2 of 8 is running when the client goes
        request = asyncio.create_task(collect(replica.generate_stream(job((1, 2), steps=8))))
        await hold.reached()
        await cancelled(request)
        hold.release()
        await until_idle(replica)

    asyncio.run(scenario())
    assert replica.calls == [(1, 2)]
    assert replica.denoiser.calls == 3


def test_a_stream_closed_after_a_preview_stops_its_call(replica):
    async def scenario():
        hold = Hold(replica, 5)
        stream = replica.generate_stream(job((1,), steps=8, partial_images=2))
        first = await anext(stream)  # a preview, after step 2
        assert isinstance(first[0], PreviewImage)
        await hold.reached()  # step 4 is running
        await stream.aclose()
        hold.release()
        await until_idle(replica)

    asyncio.run(scenario())
    assert replica.denoiser.calls == 5


def test_a_call_shared_with_a_live_job_runs_to_the_end(replica):
    from PIL import Image

    async def scenario():
        hold = Hold(replica, 2)
        gone = asyncio.create_task(collect(replica.generate_stream(job((1,), steps=6))))
        kept = asyncio.create_task(collect(replica.generate_stream(job((2,), steps=6))))
        await hold.reached()
        assert replica.calls == [(1, 2)]  # one call for both
        await cancelled(gone)
        hold.release()
        (image,) = await kept
        steps = replica.denoiser.calls
        Hold(replica, 0)
        (alone,) = await collect(replica.generate_stream(job((2,), steps=6)))
        return image, steps, alone

    image, steps, alone = asyncio.run(scenario())
    assert steps == 6
    assert image.image_index == 0 and image.image.seed == 2
    pixels = [np.asarray(Image.open(io.BytesIO(item.image.data)), dtype=np.int16) for item in (image, alone)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # as if it had run alone
