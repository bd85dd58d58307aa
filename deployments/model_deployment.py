"""The per-model Ray Serve deployment: dynamic batching on one diffusers pipeline.

A replica loads its pipeline once, then serves ``generate_stream(job)``, its one generation
method (Serve's streaming handle calls; ``serve_app/routing.py`` is the caller, and a JSON
response drains the same stream). ``@serve.batch`` gathers jobs until ``max_batch_images``
images are waiting (it counts images, not requests) or the wait timeout passes, and hands
them to a ``BatchCoalescer``, which merges the jobs that queue while the pipeline is busy into
the next full batch (see ``deployments/coalescing.py`` for why Serve's batcher alone gives
small batches under load). A batch is grouped by call shape and each group is one pipeline
call. The pipeline runs on a dedicated thread so the event loop keeps accepting work;
encoding runs on another pool so the pipeline thread goes straight on to the next batch.

A job streams its previews (``deployments/previews.py``, only when it asks for some) and then
its final images as they are encoded. A stream that ends before its images (the router
cancelled it: the client went away, the deadline passed) abandons its work: what is still
queued never runs, and a running pipeline call in which nobody is left stops at the next
denoising step (``deployments/abandonment.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from deployments.abandonment import StepCallback, StopWhenAbandoned, Work, run_call_unless_abandoned
from deployments.adapters import AdapterCache
from deployments.coalescing import BatchCoalescer
from deployments.grouping import JobOutcome, PipelineCall, count_images, run_grouped
from deployments.optimisations import compile_scope
from deployments.pipeline_loader import PipelineSet
from deployments.safety_checker import SafetyChecker
from deployments.speed_mode import speed_mode
from serve_app.config import BatchingConfig, GoFastConfig, ModelConfig
from serve_app.metrics import LATENCY_BOUNDARIES_S, model_histogram
from serve_app.work import (
    CallShape,
    GeneratedImage,
    GenerationJob,
    InputImage,
    Mode,
    PreviewImage,
    StreamedImage,
    StreamItem,
)

logger = logging.getLogger("ray.serve")

# Placeholders: the real values come from the model's config in reconfigure(), which Serve
# calls right after __init__ with the deployment's user_config.
_INITIAL_BATCH = BatchingConfig()


class ImageModelDeployment:
    def __init__(self, model: ModelConfig | dict[str, Any], cache_dir: str) -> None:
        import torch

        from deployments.pipeline_loader import load_pipelines

        self.model = ModelConfig.model_validate(model)
        # Ray sets OMP_NUM_THREADS from num_cpus; make torch honour it even if it was
        # imported before the variable was set.
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self._pipelines = load_pipelines(
            family=self.model.family,
            weights=self.model.weights,
            device=self.model.device,
            dtype=self.model.dtype,
            cache_dir=Path(cache_dir),
            model=self.model,
        )
        self._adapters = AdapterCache(
            self._pipelines.text_to_image, self.model.loras, self.model.lora_cache_size, Path(cache_dir)
        )
        self._safety = (
            None
            if self.model.safety_checker is None
            else SafetyChecker(self.model.safety_checker.weights, self.model.device, Path(cache_dir))
        )
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        # Counting a prompt's tokens for ``usage``: one thread of its own, with its own copies
        # of the pipeline's tokenizers, because a fast tokenizer's truncation settings are
        # shared state that a count would change under a running pipeline call.
        self._count_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="count-tokens")
        self._counting_pipe = _tokenizers_of(self._pipelines)
        self._max_batch_images = self.model.batching.max_batch_images
        self._batching = self.model.batching
        self._coalescer: BatchCoalescer[Work, JobOutcome] = BatchCoalescer(
            run_batch=self._run_batch,
            executor=self._pipeline_thread,
            size_of=lambda work: work.num_images,
            max_images=lambda: self._max_batch_images,
            on_batch=model_histogram(
                "imagegen_pipeline_batch_images",
                "Images in each batch the model's pipeline ran.",
                self.model.id,
                [1, 2, 4, 8, 16, 32, 64],
            ).observe,
            is_abandoned=lambda work: work.abandoned,
            # Batch API lines only fill the slots interactive jobs leave (serve_app/lane.py).
            is_batch=lambda work: work.job.priority == "batch",
            shape_of=lambda work: work.job.shape,
            batch_grace_s=lambda: self._batching.batch_lane_grace_s,
        )
        self._queue_wait = model_histogram(
            "imagegen_queue_wait_seconds",
            "From a job's arrival at the model replica to the start of the batch that runs it.",
            self.model.id,
            LATENCY_BOUNDARIES_S,
        )
        self._generation = model_histogram(
            "imagegen_generation_seconds", "One pipeline call, encoding excluded.", self.model.id, LATENCY_BOUNDARIES_S
        )
        self._failed_fatally: str | None = None
        from deployments.previews import build_relay

        self._previews = build_relay(self._pipelines, self.model.device)
        if self.model.warmup:
            # On the thread that runs every batch: CUDA graphs recorded there are replayed there.
            self._pipeline_thread.submit(self._warm_up).result()
        logger.info(
            "model %s ready (%s, %s on %s)", self.model.id, self.model.weights, self.model.dtype, self.model.device
        )

    def _warm_up(self) -> None:
        """Generate before traffic so a replica that cannot (out of memory, bad weights) fails
        its start instead of its first request, kernels are loaded, and a compiled denoiser
        is compiled for every configured size (deployments/optimisations.py)."""
        from deployments.optimisations import warm_up
        from deployments.pipeline_runner import run_pipeline

        def run(shape: CallShape, prompts: list[str], seeds: list[int]) -> None:
            images = None
            if shape.mode is not Mode.TEXT_TO_IMAGE:  # an edit-only family: a grey input image
                grey = InputImage(shape.width, shape.height, "RGB", bytes([128]) * (3 * shape.width * shape.height))
                images = [grey] * len(prompts)
            run_pipeline(self._pipelines, shape, prompts, None, seeds, self.model.device, images=images)

        warm_up(self._pipelines, self.model, run)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch limits are changeable at runtime (``user_config`` in serve_config.yaml)."""
        batching = BatchingConfig.model_validate(user_config or {})
        self._max_batch_images = batching.max_batch_images
        self._batching = batching
        self._gather_batch.set_max_batch_size(batching.max_batch_images)
        self._gather_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    async def generate_stream(self, job: GenerationJob) -> AsyncIterator[tuple[StreamItem, ...]]:
        """The one generation method: each image's previews as the pipeline reaches them (only
        when ``job.partial_images`` asks for some), then each final image as soon as it is
        encoded; image indexes count within ``job``. Items are yielded in chunks, each one
        what was ready at once (a JSON request's job of n images is a few chunks, not n
        streamed items); the router flattens them.

        However the stream ends before its last image (the caller cancelled it), its work is
        abandoned: parts still queued never run, and a pipeline call left with no live job
        stops at the next denoising step."""
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        # Futures of the items, in the order they must be yielded; ``added`` wakes the reader.
        ready: deque[asyncio.Future[StreamItem | None]] = deque()
        added = asyncio.Event()
        parts = [Work(part) for part in job.split(self._max_batch_images)]
        offsets = [sum(work.num_images for work in parts[:i]) for i in range(len(parts))]
        checked = self._safety is not None and job.check_safety
        finished = False
        # The prompt's tokens for the response's usage, once per job, on the counting thread
        # with its own copies of the tokenizers (see __init__): never a hop on the pipeline
        # thread between batches.
        text_tokens = loop.run_in_executor(self._count_thread, self._count_text_tokens, job)

        def put(future: asyncio.Future[StreamItem | None]) -> None:
            ready.append(future)
            added.set()

        def preview_sink(offset: int, part: GenerationJob):
            def on_loop(image_index: int, partial: int, pixels: Any, step: int, total: int) -> None:
                if finished:  # the caller went away while its batch ran on: encode nothing for it
                    return
                encode = self._encode_preview
                args = (pixels, offset + image_index, partial, step, total, part, self._safety if checked else None)
                put(loop.run_in_executor(self._encode_pool, encode, *args))

            # Called on the pipeline thread: only hand the pixels over to the event loop.
            return lambda *args: loop.call_soon_threadsafe(on_loop, *args)

        def failed(error: BaseException) -> None:
            if finished:
                return  # nobody reads it (and an unread exception would be logged)
            future: asyncio.Future[StreamItem | None] = loop.create_future()
            future.set_exception(error)
            put(future)

        async def finish(work: Work, offset: int) -> None:
            try:
                outcome = await (await self._gather_batch(work))
            except Exception as exc:  # noqa: BLE001 - ends the stream with it
                failed(exc)
                return
            if outcome.started_at is not None:
                self._queue_wait.observe(max(0.0, outcome.started_at - arrived))
            if outcome.error is not None:
                failed(outcome.error)
                return
            flags = [False] * len(outcome.images)
            if checked:
                try:
                    flags = await loop.run_in_executor(self._pipeline_thread, self._safety.flags, outcome.images)
                except Exception as exc:  # noqa: BLE001 - ends the stream with it
                    failed(exc)
                    return
            tokens = await asyncio.shield(text_tokens)  # shared by the job's parts
            for index, (image, seed, flagged) in enumerate(zip(outcome.images, work.job.seeds, flags)):
                encode = self._encode_final
                args = (image, seed, offset + index, work.job, flagged, tokens)
                put(loop.run_in_executor(self._encode_pool, encode, *args))

        if job.partial_images > 0:
            for work, offset in zip(parts, offsets):
                self._previews.register(work.job, preview_sink(offset, work.job))
        runs = [asyncio.ensure_future(finish(work, offset)) for work, offset in zip(parts, offsets)]
        try:
            expected = job.num_images
            while expected:
                while not ready:
                    added.clear()
                    await added.wait()
                chunk = [await ready.popleft()]
                while ready and ready[0].done():
                    chunk.append(ready.popleft().result())
                items = tuple(item for item in chunk if item is not None)  # None: a flagged preview
                expected -= sum(1 for item in items if isinstance(item, StreamedImage))
                if items:
                    yield items
        finally:
            # Done, failed, or the caller went away: whatever of this job is still queued or
            # running is work nobody waits for.
            finished = True
            for work in parts:
                work.abandoned = True
                self._previews.unregister(work.job)
            for run in runs:
                run.cancel()
            for future in ready:  # retrieved, so that asyncio does not log them as lost
                future.add_done_callback(_ignore_outcome)

    @staticmethod
    def _encode_preview(
        pixels: Any,
        image_index: int,
        partial: int,
        step: int,
        total: int,
        job: GenerationJob,
        safety: SafetyChecker | None = None,
    ) -> PreviewImage | None:
        """A preview at the final size (the latent grid is 8x smaller), in the job's format;
        None when the request's safety checker flags it. Previews are checked like final
        images: otherwise a stream would show what the checker withholds at the end. (The
        checker runs on the encode pool, beside the pipeline: one CLIP pass per preview.)"""
        from PIL import Image

        from deployments.encoding import encode_image

        image = Image.fromarray(pixels, "RGB").resize((job.shape.width, job.shape.height), Image.BILINEAR)
        if safety is not None and safety.flags([image])[0]:
            return None
        return PreviewImage(
            image_index=image_index,
            partial_image_index=partial,
            data=encode_image(image, job.output_format, job.output_quality),
            step=step,
            total_steps=total,
        )

    @classmethod
    def _encode_final(
        cls, image: Any, seed: int, image_index: int, job: GenerationJob, flagged: bool = False, text_tokens: int = 0
    ) -> StreamedImage:
        return StreamedImage(image_index=image_index, image=cls._encode(image, seed, job, flagged, text_tokens))

    def _count_text_tokens(self, job: GenerationJob) -> int:
        """The job's prompt and negative prompt tokens as ``usage`` reports them
        (``Family.count_text_tokens``); 0, logged, if the tokenizer fails: a count is not
        worth failing a generation for."""
        texts = [job.prompt] if job.negative_prompt is None else [job.prompt, job.negative_prompt]
        try:
            family = self._pipelines.family
            return sum(family.count_text_tokens(self._counting_pipe, job.shape, text) for text in texts)
        except Exception:  # reported as 0 text tokens
            logger.warning("request %s: could not count the prompt's tokens", job.request_id, exc_info=True)
            return 0

    @serve.batch(
        max_batch_size=_INITIAL_BATCH.max_batch_images,
        batch_wait_timeout_s=_INITIAL_BATCH.batch_wait_timeout_s,
        batch_size_fn=count_images,
    )
    async def _gather_batch(self, works: list[Work]) -> list[asyncio.Future[JobOutcome]]:
        # Returns at once with one future per part, so Serve goes on gathering the next
        # batch while the pipeline runs; the coalescer decides what the pipeline runs next.
        return [self._coalescer.submit(work) for work in works]

    def _run_batch(self, works: list[Work]) -> list[JobOutcome]:
        """One batch, on the pipeline thread: one call per shape; a call whose jobs were all
        abandoned does not start, or stops at its next step (``deployments/abandonment.py``)."""
        started = time.monotonic()
        jobs = [work.job for work in works]

        def run(call: PipelineCall) -> Any:
            previews = self._previews.for_call(jobs, call)
            return run_call_unless_abandoned(works, call, self._run_call, previews)

        outcomes = run_grouped(jobs, run, max_call_images=self._images_per_call)
        for outcome in outcomes:
            outcome.started_at = started
        return outcomes

    def _images_per_call(self, shape: CallShape) -> int:
        limit = self._batching.images_per_call(shape.width, shape.height)
        return min(limit, self._pipelines.family.max_images_per_call or limit)

    def _run_call(self, call: PipelineCall, on_step_end: StepCallback | None = None) -> list[Any]:
        started = time.monotonic()
        try:
            images = run_call(
                self._pipelines, self._adapters, self.model.speed_mode, call, self.model.device, on_step_end
            )
            if not (isinstance(on_step_end, StopWhenAbandoned) and on_step_end.interrupted):
                self._generation.observe(time.monotonic() - started)
            return images
        except RuntimeError as exc:
            # A CUDA device error leaves the replica unusable; let the health check
            # replace it instead of failing every later request.
            if "CUDA" in str(exc) and "out of memory" not in str(exc):
                self._failed_fatally = str(exc)
            raise

    @staticmethod
    def _encode(
        image: Any, seed: int, job: GenerationJob, flagged: bool = False, text_tokens: int = 0
    ) -> GeneratedImage:
        from deployments.encoding import encode_image

        return GeneratedImage(
            # A flagged image never leaves the replica.
            data=b"" if flagged else encode_image(image, job.output_format, job.output_quality),
            flagged=flagged,
            seed=seed,
            output_format=job.output_format,
            width=image.width,
            height=image.height,
            text_tokens=text_tokens,
        )

    def check_health(self) -> None:
        if self._failed_fatally is not None:
            raise RuntimeError(f"pipeline failed fatally: {self._failed_fatally}")


def run_call(
    pipelines: PipelineSet,
    adapters: AdapterCache,
    speed: GoFastConfig,
    call: PipelineCall,
    device: str,
    on_step_end: Any = None,
) -> list[Any]:
    """One pipeline call with its LoRA set active and its speed mode on, for this call only
    (``deployments/adapters.py``, ``deployments/speed_mode.py``), on the compiled denoiser
    only where neither changes it (``deployments/optimisations.py``)."""
    from deployments.pipeline_runner import run_pipeline

    adapters.activate(call.shape.adapters)
    with compile_scope(pipelines, call.shape, speed), speed_mode(pipelines.text_to_image, speed, call.shape):
        return run_pipeline(
            pipelines,
            call.shape,
            call.prompts,
            call.negative_prompts,
            call.seeds,
            device,
            images=call.images,
            masks=call.masks,
            on_step_end=on_step_end,
            references=call.references,
        )


def _tokenizers_of(pipelines: PipelineSet) -> Any:
    """Copies of the text-to-image pipeline's tokenizers, as the attributes the family counts
    with (``Family.text_tokenizers``)."""
    import copy
    import types

    pipe = pipelines.text_to_image
    attributes = pipelines.family.text_tokenizers
    return types.SimpleNamespace(
        **{name: copy.deepcopy(getattr(pipe, name)) for name in attributes if getattr(pipe, name, None) is not None}
    )


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


ImageModel = serve.deployment(ImageModelDeployment)
