"""The full-size model families on one GPU, through the served code path (issues 16, 23).

For one family (SDXL, FLUX.1-schnell, Qwen-Image) at full size with random weights (the
published configs in configs/, the same compute as the real weights), in the dtype and at the
defaults of serve_config.gpu.yaml (size, steps, guidance), with the optimisations that config
turns on, in this order (the most valuable first, each written as soon as it is measured):

1. The device's peak: a large matmul in the model's dtype (MFU is reported against it and
   against the data sheet's rate).
2. By images per call (bench/gpu_plan.py's plan: SDXL 1 and 8, FLUX.1-schnell 1 and 4): that
   shape's warm-up (the replica's, so the compile with CUDA graphs), one unmeasured call, then
   the repeats: seconds per call, images/s, peak allocated and reserved memory, MFU. The FLOPs
   are counted on meta-device models for the text lengths the first call really used.
3. ``--step-probe A,B`` (Qwen-Image, eager): batch-1 seconds at A and B steps, so s/step and
   the fixed cost per image, and whether its memory fits an H100.
4. ``--ladder`` (an option): batch-1 latency with every optimisation off, then with each one
   added in turn, and each image's largest pixel difference from the all-off image.

Every generation goes through deployments.grouping.run_grouped and
deployments.pipeline_runner.run_pipeline, as ImageModelDeployment._run_batch runs a batch; the
warm-up is deployments.optimisations.warm_up, as at replica start.

    bench/gpu_run.sh --budget 540                    # on a lent GPU: what fits, one process a family
    python bench/gpu_pipeline.py --families sdxl     # one family here, on a CUDA GPU
    python bench/gpu_pipeline.py --count-flops       # FLOPs only (CPU, meta device): JSON
    python bench/gpu_pipeline.py --write-doc         # docs/gpu.md from bench/results/gpu_pipeline*.json
    python bench/gpu_pipeline.py --merge-results OUT1/gpu_pipeline.json OUT2/gpu_pipeline.json
                                                     # the device runs' results into bench/results, then the doc
    python bench/gpu_pipeline.py --cpu-smoke --out /tmp/smoke.json
                                                     # the tiny models on CPU, same code (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import machine_info, write_json
from gpu_plan import FAMILIES, JOBS

RESULTS = ROOT / "bench" / "results" / "gpu_pipeline.json"
FLOPS_RESULTS = ROOT / "bench" / "results" / "gpu_pipeline_flops.json"
PROMPT = "a photograph of an old lighthouse on a cliff above a stormy sea, golden hour"

# Peak dense (no sparsity) bf16/fp16 tensor-core rates, TFLOP/s, from the vendor data sheets.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
# What an H100 80GB reports as its total memory (torch.cuda.mem_get_info), GiB.
H100_MEMORY_GIB = 79.2


def production_model(family: str, smoke: bool):
    """The served model config of ``family``: serve_config.gpu.yaml's, or in the smoke run
    serve_config.yaml's tiny model."""
    from serve_app.config import load_app_config

    config = ROOT / ("serve_config.yaml" if smoke else "serve_config.gpu.yaml")
    return next(m for m in load_app_config(config).models if m.family == family)


def ladder(family: str, smoke: bool, fp16_vae_source: str | None, size: str) -> list[tuple[str, Any]]:
    """(name, Optimisations) from all off to all on, one optimisation added per rung."""
    from serve_app.config import CompileOptions, Optimisations

    compile_backend = "eager" if smoke else "inductor"  # inductor on a CPU compiles C++ for minutes
    rungs: list[tuple[str, Optimisations]] = []
    current = Optimisations(attention="math")
    rungs.append(("all off (math attention)", current))
    current = current.model_copy(update={"attention": "sdpa"})
    rungs.append(("+ sdpa", current))
    if not smoke:
        rungs.append(("+ flash (sdpa flash kernel)", current.model_copy(update={"attention": "flash"})))
    current = current.model_copy(update={"channels_last": True})
    rungs.append(("+ channels_last", current))
    if family == "sdxl" and fp16_vae_source is not None:
        current = current.model_copy(update={"fp16_vae": fp16_vae_source})
        rungs.append(("+ fp16-safe VAE", current))
    compiled = CompileOptions(mode="default", backend=compile_backend, sizes=[size], batch_sizes=[1])
    current = current.model_copy(update={"compile": compiled})
    rungs.append(("+ torch.compile", current))
    if not smoke:
        graphs = compiled.model_copy(update={"mode": "reduce-overhead"})
        rungs.append(("+ CUDA graphs (reduce-overhead)", current.model_copy(update={"compile": graphs})))
    return rungs


class Bench:
    """One family's pipelines, run the way a replica runs them."""

    def __init__(self, family: str, model, pipelines, device: str) -> None:
        self.family = family
        self.model = model
        self.pipelines = pipelines
        self.device = device
        self.original_vae = pipelines.text_to_image.vae

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def set_optimisations(self, options) -> None:
        import torch

        from deployments.optimisations import apply_optimisations, compiled_of, denoiser_of

        pipe = self.pipelines.text_to_image
        previous = compiled_of(denoiser_of(pipe))
        if previous is not None:
            previous.remove()
            torch._dynamo.reset()
        if options.fp16_vae is None and pipe.vae is not self.original_vae:
            for each in self.pipelines.pipelines.values():
                each.register_modules(vae=self.original_vae)
        if not options.channels_last:
            for module in (getattr(pipe, "unet", None), pipe.vae):
                if module is not None:
                    for param in module.parameters():
                        param.data = param.data.contiguous()
        self.pipelines.optimisations = apply_optimisations(self.pipelines, options, self.model.dtype)
        self.model = self.model.model_copy(update={"optimisations": options})

    def warm_up(self, images_per_call: int | None = None) -> float:
        """The replica's warm-up (the compile, where compile is on), for ``images_per_call``
        only when given: each shape is compiled just before it is measured, so a timeout
        keeps the figures of the shapes before it. Seconds."""
        from deployments.optimisations import warm_up

        model = self.model
        options = model.optimisations.compile
        if options is not None and images_per_call is not None:
            options = options.model_copy(update={"batch_sizes": [images_per_call], "sizes": [model.defaults.size]})
            model = model.model_copy(
                update={"optimisations": model.optimisations.model_copy(update={"compile": options})}
            )
        started = time.perf_counter()
        warm_up(self.pipelines, model, lambda shape, prompts, seeds: self._run(shape, prompts, seeds))
        self.sync()
        return time.perf_counter() - started

    def shape(self, steps: int | None = None):
        from serve_app.work import CallShape

        width, height = (int(v) for v in self.model.defaults.size.split("x"))
        return CallShape(
            width=width,
            height=height,
            steps=steps or self.model.defaults.steps,
            guidance=self.model.defaults.guidance,
            with_negative_prompt=False,
        )

    def generate(self, n: int, seed: int = 0, steps: int | None = None) -> tuple[float, list]:
        """One batch of ``n`` images at the production defaults (``steps`` aside), as a replica
        runs it: (seconds, images)."""
        from deployments.grouping import run_grouped
        from serve_app.work import GenerationJob

        jobs = [
            GenerationJob(
                request_id=f"bench-{seed}-{i}",
                prompt=PROMPT,
                negative_prompt=None,
                shape=self.shape(steps),
                seeds=(seed + i,),
            )
            for i in range(n)
        ]
        self.sync()
        started = time.perf_counter()
        outcomes = run_grouped(
            jobs,
            lambda call: self._run(call.shape, call.prompts, call.seeds),
            max_call_images=lambda shape: self.model.batching.images_per_call(shape.width, shape.height),
        )
        self.sync()
        elapsed = time.perf_counter() - started
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        return elapsed, [image for outcome in outcomes for image in outcome.images]

    def _run(self, shape, prompts: list[str], seeds: list[int]) -> list:
        from deployments.pipeline_runner import run_pipeline

        return run_pipeline(self.pipelines, shape, prompts, None, seeds, self.device)

    def sync(self) -> None:
        if self.on_cuda:
            import torch

            torch.cuda.synchronize()

    def measured_flops(self) -> float:
        """FLOPs of one batch-1 served call, counted by FlopCounterMode while it runs."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.generate(1)
        return float(counter.get_total_flops())


@contextlib.contextmanager
def record_text_lengths(pipe: Any) -> Iterator[dict[str, list[int]]]:
    """The token counts each text encoder call and each denoiser call sees inside the block
    (read by forward pre-hooks, removed afterwards): what the FLOP count must use."""
    from deployments.optimisations import denoiser_of

    lengths: dict[str, list[int]] = {"denoiser": []}
    handles = []

    def encoder_hook(name: str) -> Callable:
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                lengths.setdefault(name, []).append(int(ids.shape[-1]))

        return hook

    def denoiser_hook(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states")
        if states is not None:
            lengths["denoiser"].append(int(states.shape[1]))

    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            handles.append(module.register_forward_pre_hook(encoder_hook(name), with_kwargs=True))
    handles.append(denoiser_of(pipe).register_forward_pre_hook(denoiser_hook, with_kwargs=True))
    try:
        yield lengths
    finally:
        for handle in handles:
            handle.remove()


def per_image_lengths(lengths: dict[str, list[int]], steps: int) -> dict[str, list[int]]:
    """Recorded lengths of a batch-1 call of ``steps`` steps, with the denoiser's reduced to
    the calls of one step (every step makes the same calls)."""
    denoiser = lengths["denoiser"]
    per_step = max(1, len(denoiser) // steps)
    return {**lengths, "denoiser": denoiser[:per_step]}


def max_pixel_difference(a: list, b: list) -> int:
    import numpy as np

    return int(max(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() for x, y in zip(a, b)))


def datasheet_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((rate for key, rate in PEAK_TFLOPS.items() if key in device_name), None)


def measure_peak_tflops(device: str, dtype_name: str) -> dict[str, Any]:
    """The device's achieved peak: the best of three timings of back-to-back square matmuls in
    the model's dtype (on a CPU, a small float32 one: the smoke run only exercises this)."""
    import torch

    on_cuda = device.startswith("cuda")
    n, iterations = (8192, 20) if on_cuda else (512, 5)
    dtype = getattr(torch, dtype_name) if on_cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(3):
        sync()
        started = time.perf_counter()
        for _ in range(iterations):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - started) / iterations)
    del a, b, out
    how = f"{str(dtype).removeprefix('torch.')} {n}x{n} @ {n}x{n} matmul, best of 3x{iterations}"
    return {"tflops": round(2 * n**3 / best / 1e12, 4), "how": how}


# --- memory -------------------------------------------------------------------------------------


def reset_memory_peaks(bench: Bench) -> None:
    if bench.on_cuda:
        import torch

        gc.collect()
        # Cached blocks the previous shape left would count as this one's reserved memory.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_figures(bench: Bench) -> dict[str, float | None]:
    """Peak allocated and peak reserved memory since the last reset, and the device memory in
    use outside torch's allocator (CUDA context, library workspaces), GiB. Reserved is what to
    size by: CUDA graph pools are reserved but their tensors do not count as allocated."""
    if not bench.on_cuda:
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, "peak_device_used_gib": None}
    import torch

    free, total = torch.cuda.mem_get_info()
    outside = (total - free) - torch.cuda.memory_reserved()
    peak_reserved = torch.cuda.max_memory_reserved()
    gib = 2**30
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
        "peak_reserved_gib": round(peak_reserved / gib, 2),
        "peak_device_used_gib": round((peak_reserved + outside) / gib, 2),
        "device_total_gib": round(total / gib, 2),
    }


def release(on_cuda: bool) -> None:
    """Drop compiled graphs (CUDA graph trees included) and cached GPU memory: what the next
    family in this process must not inherit."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if on_cuda:
        torch.cuda.empty_cache()


# --- one family ----------------------------------------------------------------------------------


class Recorder:
    """The results document, rewritten (and copied to ``copy_to``) after every measurement, so a
    family stopped by its timeout keeps what it measured."""

    def __init__(self, out: Path, copy_to: Path | None, document: dict[str, Any]) -> None:
        self.out = out
        self.copy_to = copy_to
        self.document = document
        self.saved: set[str] = set()  # the families this process has written
        previous = json.loads(out.read_text()) if out.exists() else None
        if previous is not None and previous.get("device") == document["device"]:
            # Families run one at a time (one process each) add up in one file, same device only.
            document["families"] = {**previous.get("families", {}), **document["families"]}

    def save(self, family: str, result: dict[str, Any]) -> None:
        self.document["families"][family] = result
        self.saved.add(family)
        write_json(self.out, self.document)
        if self.copy_to is not None:
            write_json(self.copy_to / self.out.name, self.document)


def load_family(family: str, smoke: bool, work: Path) -> tuple[Bench, str | None]:
    """(Bench, fp16-safe VAE source) for ``family``."""
    import torch

    from deployments.pipeline_loader import assemble_pipelines, load_pipelines, resolve_weights
    from serve_app.families import get_family

    model = production_model(family, smoke)
    if smoke:
        cache = ROOT / ".cache" / "models"
        pipelines = load_pipelines(family, model.weights, "cpu", model.dtype, cache)
        # The tiny model's own VAE folder stands in for the fp16-fix weights.
        folder = resolve_weights(get_family(family), model.weights, cache)
        vae_source = str(Path(folder) / "vae") if family == "sdxl" else None
        return Bench(family, model, pipelines, "cpu"), vae_source
    from full_size import build_fp16_fix_vae, build_pipeline

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke or --count-flops on a CPU")
    pipe = build_pipeline(family, model.device, model.dtype)
    pipelines = assemble_pipelines(get_family(family), pipe, model)
    vae_source = str(build_fp16_fix_vae(work / "sdxl-vae-fp16-fix", pipe.vae)) if family == "sdxl" else None
    return Bench(family, model, pipelines, model.device), vae_source


class FamilyRun:
    """Measures one family in order of value, saving after each measurement."""

    def __init__(self, family: str, args, repeats: int, bench: Bench, vae_source: str | None, save: Callable) -> None:
        self.family = family
        self.args = args
        self.repeats = repeats
        self.bench = bench
        self.vae_source = vae_source
        self._save = save
        model = bench.model
        self.result: dict[str, Any] = {
            "model": model.id,
            "dtype": model.dtype,
            "size": model.defaults.size,
            "steps": model.defaults.steps,
            "guidance": model.defaults.guidance,
            "production_optimisations": model.optimisations.model_dump(),
            "status": "running",
        }
        self.flops_per_image: float | None = None
        self.denoiser_flops_per_step: float | None = None

    def save(self) -> None:
        self._save(self.family, self.result)

    def peaks(self) -> None:
        import torch

        name = torch.cuda.get_device_name() if self.bench.on_cuda else "cpu"
        measured = measure_peak_tflops(self.bench.device, self.bench.model.dtype)
        self.result["peak_tflops"] = {"measured": measured, "datasheet": datasheet_tflops(name, self.args.peak_tflops)}
        self.save()

    def count_flops(self, lengths: dict[str, list[int]], steps: int) -> None:
        """FLOPs per image for the text lengths the call used (counted on meta-device models;
        in the smoke run, counted while a call ran)."""
        model = self.bench.model
        per_image = per_image_lengths(lengths, steps)
        self.result["text_lengths"] = per_image
        if self.args.cpu_smoke:
            self.flops_per_image = self.result["flops_per_image_measured"]
            return
        from full_size import count_flops

        width, height = (int(v) for v in model.defaults.size.split("x"))
        counted = count_flops(
            self.family, width, height, model.defaults.steps, model.defaults.guidance, text_lengths=per_image
        )
        self.result["flops_counted"] = counted
        self.flops_per_image = counted["tflop_per_image"] * 1e12
        self.denoiser_flops_per_step = counted["tflop_by_part_per_image"]["denoiser"] * 1e12 / model.defaults.steps

    def first_call(self, n: int, steps: int | None = None) -> None:
        """One unmeasured call (the shape's first after capture: lazy inits, cuDNN's choice of
        kernels); the first one records the text lengths and counts the FLOPs."""
        if self.flops_per_image is not None:
            self.bench.generate(n, steps=steps)
            return
        with record_text_lengths(self.bench.pipelines.text_to_image) as lengths:
            self.bench.generate(1, steps=steps)
        self.count_flops(lengths, steps or self.bench.model.defaults.steps)
        if n != 1:
            self.bench.generate(n, steps=steps)

    def mfu(self, flops_per_s: float) -> dict[str, float]:
        rates = self.result["peak_tflops"]
        out = {"mfu": round(flops_per_s / (rates["measured"]["tflops"] * 1e12), 4)}
        if rates["datasheet"] is not None:
            out["mfu_datasheet"] = round(flops_per_s / (rates["datasheet"] * 1e12), 4)
        return out

    def by_batch_size(self, counts: list[int]) -> None:
        import torch

        rows = self.result.setdefault("by_batch_size", [])
        for n in counts:
            try:
                row = self.measure_batch(n)
            except torch.OutOfMemoryError:
                rows.append({"images_per_call": n, "out_of_memory": True})
                self.save()
                break
            rows.append(row)
            print(f"  {self.family} {n} per call: {row}", flush=True)
            self.save()

    def measure_batch(self, n: int) -> dict[str, Any]:
        warm_s = self.bench.warm_up(n)
        self.first_call(n)
        reset_memory_peaks(self.bench)
        times = [self.bench.generate(n)[0] for _ in range(self.repeats)]
        seconds = statistics.median(times)
        row = {
            "images_per_call": n,
            "warm_up_s": round(warm_s, 2),
            "seconds": round(seconds, 4),
            "images_per_s": round(n / seconds, 4),
            **memory_figures(self.bench),
            **self.mfu(self.flops_per_image * n / seconds),
        }
        if n == 1:
            self.result["batch1_latency_s"] = row["seconds"]
        return row

    def step_probe(self, low: int, high: int) -> None:
        """Batch-1 seconds at ``low`` and ``high`` steps: s/step, the fixed cost per image,
        the default-steps image they imply, and whether the memory fits an H100."""
        import torch

        bench = self.bench
        if not self.result.get("by_batch_size"):
            bench.warm_up()  # the replica's (nothing is compiled where this family measures no batch)
        try:
            self.first_call(1, steps=low)
            reset_memory_peaks(bench)
            seconds = {}
            for steps in (low, high):
                seconds[steps] = statistics.median([bench.generate(1, steps=steps)[0] for _ in range(self.repeats)])
        except torch.OutOfMemoryError:
            self.result["step_probe"] = {"out_of_memory": True, "fits_h100": False, **memory_figures(bench)}
            self.save()
            return
        per_step = (seconds[high] - seconds[low]) / (high - low)
        fixed = seconds[low] - low * per_step
        probe = {
            "steps": [low, high],
            "seconds": [round(seconds[low], 4), round(seconds[high], 4)],
            "s_per_step": round(per_step, 4),
            "fixed_s": round(fixed, 4),
            "default_steps_image_s": round(fixed + bench.model.defaults.steps * per_step, 3),
            **memory_figures(bench),
        }
        if self.denoiser_flops_per_step is not None and per_step > 0:
            probe.update(self.mfu(self.denoiser_flops_per_step / per_step))
        if probe["peak_device_used_gib"] is not None:
            probe["fits_h100"] = probe["peak_device_used_gib"] <= H100_MEMORY_GIB
        self.result["step_probe"] = probe
        print(f"  {self.family} step probe: {probe}", flush=True)
        self.save()

    def ladder(self) -> None:
        bench = self.bench
        rungs, reference = [], None
        self.result["ladder"] = rungs
        for name, options in ladder(self.family, self.args.cpu_smoke, self.vae_source, bench.model.defaults.size):
            bench.set_optimisations(options)
            warm_s = bench.warm_up()
            times, images = [], None
            for _ in range(self.repeats):
                elapsed, images = bench.generate(1)
                times.append(elapsed)
            reference = reference or images
            latency = statistics.median(times)
            compiled = compiled_of_bench(bench)
            rungs.append(
                {
                    "variant": name,
                    "denoiser_calls": None if compiled is None else dict(compiled.calls),
                    "optimisations": options.model_dump(),
                    "warm_up_s": round(warm_s, 3),
                    "batch1_latency_s": round(latency, 4),
                    "max_pixel_difference_from_all_off": max_pixel_difference(reference, images),
                }
            )
            print(f"  {self.family} {name}: {latency:.3f} s (warm-up {warm_s:.1f} s)", flush=True)
            self.save()

    def production_options(self):
        """serve_config.gpu.yaml's optimisations, compiled for the default size; its fp16-fix VAE
        (a hub id: nothing downloads here) is the pipeline's own VAE saved with that config."""
        options = self.bench.model.optimisations
        if options.fp16_vae is not None:
            options = options.model_copy(update={"fp16_vae": self.vae_source})
        if options.compile is not None:
            compiled = options.compile.model_copy(update={"sizes": [self.bench.model.defaults.size]})
            options = options.model_copy(update={"compile": compiled})
        return options

    def run(self, counts: list[int], probe: tuple[int, int] | None) -> None:
        self.save()
        if self.args.cpu_smoke:
            self.result["flops_per_image_measured"] = self.bench.measured_flops()
        self.peaks()
        self.bench.set_optimisations(self.production_options())
        self.by_batch_size(counts)
        if probe is not None:
            self.step_probe(*probe)
        compiled = compiled_of_bench(self.bench)
        if compiled is not None:
            self.result["compiled_calls"] = dict(compiled.calls)
        if self.args.ladder:
            self.ladder()
        self.result["status"] = "complete"
        self.save()


def compiled_of_bench(bench: Bench):
    from deployments.optimisations import compiled_of, denoiser_of

    return compiled_of(denoiser_of(bench.pipelines.text_to_image))


def run_family(family: str, args, work: Path, save: Callable[[str, dict[str, Any]], None]) -> None:
    """Build ``family`` and measure it, saving as it goes; what it held is garbage once this
    returns or its exception is handled (``release``)."""
    job = JOBS[family][0]  # the family's plan, where the command line does not say
    counts = job.batch_sizes if args.batch_sizes is None else args.batch_sizes
    probe = job.step_probe if args.step_probe is None else (tuple(args.step_probe) or None)
    started = time.perf_counter()
    bench, vae_source = load_family(family, args.cpu_smoke, work)
    run = FamilyRun(family, args, args.repeats or job.repeats, bench, vae_source, save)
    run.result["build_s"] = round(time.perf_counter() - started, 1)
    limit = bench.model.batching.max_batch_images
    run.run([n for n in counts if n <= limit], probe)


def count_only(families: list[str]) -> dict[str, Any]:
    from full_size import count_flops

    from serve_app.config import load_app_config

    models = load_app_config(ROOT / "serve_config.gpu.yaml").models
    out = {}
    for family in families:
        model = next(m for m in models if m.family == family)
        width, height = (int(v) for v in model.defaults.size.split("x"))
        out[family] = count_flops(family, width, height, model.defaults.steps, model.defaults.guidance)
        out[family]["model"] = model.id
        print(f"{family}: {out[family]['tflop_per_image']:.1f} TFLOP per image", flush=True)
    return out


def int_list(text: str) -> list[int]:
    """ "1,2,8" -> [1, 2, 8]; "none" or "" -> []."""
    return [] if text.strip() in ("", "none") else [int(n) for n in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU (the test suite runs this)")
    parser.add_argument("--count-flops", action="store_true", help="only count FLOPs on meta-device models")
    parser.add_argument("--repeats", type=int, default=None, help="default: the family's plan (bench/gpu_plan.py)")
    parser.add_argument("--batch-sizes", type=int_list, default=None, help="images per call, e.g. 1,8 (or none)")
    parser.add_argument("--step-probe", type=int_list, default=None, help="two step counts for s/step (or none)")
    parser.add_argument("--ladder", action="store_true", help="also add the optimisations one at a time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the data sheet's rate (default: by name)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--copy-to", type=Path, default=None, help="also write the results here (the device's $OUT)")
    parser.add_argument("--write-doc", action="store_true", help="only rewrite docs/gpu.md from the JSON results")
    parser.add_argument(
        "--merge-results", type=Path, nargs="+", default=None, help="GPU runs' $OUT/gpu_pipeline.json: merge, write doc"
    )
    args = parser.parse_args(argv)
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(args.family_list) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; known: {list(FAMILIES)}")
    if args.step_probe and len(args.step_probe) != 2:
        parser.error("--step-probe takes two step counts, e.g. 2,6")
    if args.cpu_smoke and args.out is None and not args.count_flops:
        parser.error("--cpu-smoke writes only where --out says (it must not replace GPU figures)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_doc or args.merge_results:
        from gpu_doc import merge_results, write_doc

        if args.merge_results:
            merge_results(args.merge_results)
        write_doc()
        return 0

    import torch

    document: dict[str, Any] = {
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.count_flops:
        document["flops"] = count_only(args.family_list)
        write_json(args.out or FLOPS_RESULTS, document)
        return 0
    if args.cpu_smoke:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        document["device"] = "cpu (smoke run: tiny models, NOT a GPU measurement)"
    else:
        document["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    document["families"] = {}
    recorder = Recorder(args.out or RESULTS, args.copy_to, document)
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as work:
        for family in args.family_list:
            print(f"{family}:", flush=True)
            try:
                run_family(family, args, Path(work), recorder.save)
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next family
                result = recorder.document["families"][family] if family in recorder.saved else {}
                recorder.save(family, {**result, "status": f"failed: {type(exc).__name__}: {exc}"[:500]})
                print(f"  {family} failed: {exc!r}", flush=True)
                failed.append(family)
            # The family's pipelines are garbage now (its exception too): the next must not
            # inherit its compiled graphs or cached GPU memory.
            release(torch.cuda.is_available())
    print(json.dumps({"written": str(recorder.out), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
