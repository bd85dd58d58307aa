"""The full-size model families on one GPU, through the served code path (issue 16).

For each family (SDXL, FLUX.1-schnell, Qwen-Image) at full size with random weights (the
published configs in configs/, the same compute as the real weights), in the dtype and at the
defaults of serve_config.gpu.yaml (size, steps, guidance):

1. FLOPs per image, counted with torch's FlopCounterMode on meta-device models (bench/full_size.py).
2. The optimisations ladder: batch-1 latency with every optimisation off, then with each one
   added in turn (SDPA, flash, channels_last, the fp16-safe SDXL VAE, torch.compile, CUDA
   graphs), each applied by deployments/optimisations.py exactly as a replica applies them,
   and the image's largest pixel difference from the all-off image.
3. With the optimisations serve_config.gpu.yaml turns on: images/s and peak GPU memory by
   images per call (1, 2, 4, 8 up to the model's batch limit, stopping at out-of-memory) and
   the model FLOP utilisation (counted FLOPs x images/s / the GPU's peak dense bf16/fp16 rate).

Every generation goes through deployments.grouping.run_grouped and
deployments.pipeline_runner.run_pipeline, as ImageModelDeployment._run_batch runs a batch
(the per-size image limit included); the warm-up (and so the compile over the size buckets)
is deployments.optimisations.warm_up, as at replica start.

    python bench/gpu_pipeline.py                     # on a CUDA GPU: JSON + docs/gpu.md
    python bench/gpu_pipeline.py --families sdxl     # one family
    python bench/gpu_pipeline.py --count-flops       # FLOPs only (CPU, meta device): JSON + docs
    python bench/gpu_pipeline.py --cpu-smoke --out /tmp/smoke.json
                                                     # the tiny models on CPU, same code (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import machine_info, write_json

FAMILIES = ("sdxl", "flux", "qwen-image")
RESULTS = ROOT / "bench" / "results" / "gpu_pipeline.json"
FLOPS_RESULTS = ROOT / "bench" / "results" / "gpu_pipeline_flops.json"
DOC = ROOT / "docs" / "gpu.md"
PROMPT = "a photograph of an old lighthouse on a cliff above a stormy sea, golden hour"

# Peak dense (no sparsity) bf16/fp16 tensor-core rates, TFLOP/s, from the vendor data sheets.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def production_model(family: str, smoke: bool):
    """The served model config of ``family``: serve_config.gpu.yaml's, or in the smoke run
    serve_config.yaml's tiny model."""
    from serve_app.config import load_app_config

    config = ROOT / ("serve_config.yaml" if smoke else "serve_config.gpu.yaml")
    return next(m for m in load_app_config(config).models if m.family == family)


def ladder(family: str, model, smoke: bool, fp16_vae_source: str | None) -> list[tuple[str, Any]]:
    """(name, Optimisations) from all off to all on, one optimisation added per rung."""
    from serve_app.config import CompileOptions, Optimisations

    size = model.defaults.size
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

    def warm_up(self) -> float:
        from deployments.optimisations import warm_up

        started = time.perf_counter()
        warm_up(self.pipelines, self.model, lambda shape, prompts, seeds: self._run(shape, prompts, seeds))
        self.sync()
        return time.perf_counter() - started

    def shape(self):
        from serve_app.work import CallShape

        width, height = (int(v) for v in self.model.defaults.size.split("x"))
        return CallShape(
            width=width,
            height=height,
            steps=self.model.defaults.steps,
            guidance=self.model.defaults.guidance,
            with_negative_prompt=False,
        )

    def generate(self, n: int, seed: int = 0) -> tuple[float, list]:
        """One batch of ``n`` images at the production defaults, as a replica runs it:
        (seconds, images)."""
        from deployments.grouping import run_grouped
        from serve_app.work import GenerationJob

        jobs = [
            GenerationJob(
                request_id=f"bench-{seed}-{i}",
                prompt=PROMPT,
                negative_prompt=None,
                shape=self.shape(),
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
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def measured_flops(self) -> float:
        """FLOPs of one batch-1 served call, counted by FlopCounterMode while it runs."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.generate(1)
        return float(counter.get_total_flops())


def max_pixel_difference(a: list, b: list) -> int:
    import numpy as np

    return int(max(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() for x, y in zip(a, b)))


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((rate for key, rate in PEAK_TFLOPS.items() if key in device_name), None)


def load_family(family: str, smoke: bool, work: Path):
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
    vae_source = str(build_fp16_fix_vae(work / "sdxl-vae-fp16-fix", model.dtype)) if family == "sdxl" else None
    return Bench(family, model, pipelines, model.device), vae_source


def run_family(family: str, args, work: Path) -> dict[str, Any]:
    import torch

    smoke = args.cpu_smoke
    bench, vae_source = load_family(family, smoke, work)
    model = bench.model
    production_options = model.optimisations
    on_cuda = bench.device.startswith("cuda")
    result: dict[str, Any] = {
        "model": model.id,
        "dtype": model.dtype,
        "size": model.defaults.size,
        "steps": model.defaults.steps,
        "guidance": model.defaults.guidance,
        "production_optimisations": production_options.model_dump(),
    }
    if smoke:
        result["flops_per_image_measured"] = bench.measured_flops()
        flops_per_image = result["flops_per_image_measured"]
    else:
        from full_size import count_flops

        width, height = (int(v) for v in model.defaults.size.split("x"))
        counted = count_flops(family, width, height, model.defaults.steps, model.defaults.guidance)
        result["flops_counted"] = counted
        flops_per_image = counted["tflop_per_image"] * 1e12
    peak = peak_tflops(torch.cuda.get_device_name() if on_cuda else "cpu", args.peak_tflops)

    rungs = []
    reference = None
    for name, options in ladder(family, model, smoke, vae_source):
        bench.set_optimisations(options)
        warm_s = bench.warm_up()
        times, images = [], None
        for repeat in range(args.repeats):
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
        print(f"  {family} {name}: {latency:.3f} s (warm-up {warm_s:.1f} s)", flush=True)
    result["ladder"] = rungs

    # The production configuration (the smoke run's is the CPU config's: all off): images/s,
    # memory and MFU by images per call.
    if production_options.fp16_vae is not None:
        # The served config names the hub's fp16-fix weights; nothing downloads here, so the
        # same architecture with random weights stands in.
        production_options = production_options.model_copy(update={"fp16_vae": vae_source})
    counts = [n for n in args.batch_sizes if n <= model.batching.max_batch_images]
    compile_options = production_options.compile
    if compile_options is not None:
        compile_options = compile_options.model_copy(update={"batch_sizes": counts, "sizes": [model.defaults.size]})
    bench.set_optimisations(production_options.model_copy(update={"compile": compile_options}))
    result["production_warm_up_s"] = round(bench.warm_up(), 3)
    by_batch = []
    for n in counts:
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            times = [bench.generate(n)[0] for _ in range(args.repeats)]
        except torch.OutOfMemoryError:
            by_batch.append({"images_per_call": n, "out_of_memory": True})
            break
        seconds = statistics.median(times)
        row = {
            "images_per_call": n,
            "seconds": round(seconds, 4),
            "images_per_s": round(n / seconds, 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None,
        }
        if peak is not None:
            row["mfu"] = round(flops_per_image * n / seconds / (peak * 1e12), 4)
        by_batch.append(row)
        print(f"  {family} production, {n} per call: {row}", flush=True)
    result["by_batch_size"] = by_batch
    compiled = compiled_of_bench(bench)
    if compiled is not None:
        result["compiled_calls"] = dict(compiled.calls)
    result["peak_tflops"] = peak
    del bench
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def compiled_of_bench(bench: Bench):
    from deployments.optimisations import compiled_of, denoiser_of

    return compiled_of(denoiser_of(bench.pipelines.text_to_image))


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


# --- docs/gpu.md -------------------------------------------------------------------------------

SMOKE_RESULTS = ROOT / "bench" / "results" / "gpu_pipeline_cpu_smoke.json"
RUN_COMMAND = "bench/gpu_run.sh"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def flops_table(flops: dict[str, Any], peak: float) -> list[str]:
    lines = [
        (
            "| model | size, steps, guidance | TFLOP per image | denoiser | VAE decode | text encoders | parameters (B) "
            f"| compute limit at {peak:g} TFLOP/s | 50% of it |"
        ),
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for family, row in flops.items():
        parts = row["tflop_by_part_per_image"]
        text = sum(v for k, v in parts.items() if k.startswith("text_encoder"))
        params = ", ".join(f"{k} {v:.2f}" for k, v in row["params_billion"].items())
        limit = peak / row["tflop_per_image"]
        lines.append(
            f"| {row.get('model', family)} | {row['width']}x{row['height']}, {row['steps']}, {row['guidance']:g} "
            f"| {row['tflop_per_image']:,.1f} | {parts['denoiser']:,.1f} | {parts['vae_decode']:.1f} | {text:.2f} "
            f"| {params} | {limit:.3f} images/s ({1 / limit:.2f} s) | {limit / 2:.3f} images/s |"
        )
    return lines


def results_tables(document: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for result in document["families"].values():
        lines += [
            "",
            (
                f"**{result['model']}** ({result['dtype']}, {result['size']}, {result['steps']} steps, guidance "
                f"{result['guidance']:g})"
                + (
                    f"; {result['flops_per_image_measured'] / 1e6:.0f} MFLOP per image, counted while it ran"
                    if "flops_per_image_measured" in result
                    else ""
                )
            ),
            "",
            (
                "| variant (cumulative) | batch-1 latency s | warm-up s | max pixel difference from all off "
                "| denoiser calls compiled / uncompiled |"
            ),
            "|---|---:|---:|---:|---:|",
        ]
        for rung in result["ladder"]:
            calls = rung.get("denoiser_calls")
            calls_text = "" if calls is None else f"{calls['compiled']} / {calls['eager']}"
            lines.append(
                f"| {rung['variant']} | {rung['batch1_latency_s']:.3f} | {rung['warm_up_s']:.1f} "
                f"| {rung['max_pixel_difference_from_all_off']} | {calls_text} |"
            )
        lines += [
            "",
            "| images per call | s per call | images/s | peak GPU memory GiB | MFU |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in result["by_batch_size"]:
            if row.get("out_of_memory"):
                lines.append(f"| {row['images_per_call']} | out of memory | | | |")
                continue
            memory = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
            mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
            lines.append(
                f"| {row['images_per_call']} | {row['seconds']:.3f} | {row['images_per_s']:.3f} | {memory} | {mfu} |"
            )
    return lines


def write_doc() -> None:
    flops = _load(FLOPS_RESULTS)
    smoke = _load(SMOKE_RESULTS)
    gpu = _load(RESULTS)
    lines = [
        "# GPU performance (issue 16)",
        "",
        "Written by `python bench/gpu_pipeline.py --write-doc` from `bench/results/gpu_pipeline*.json`.",
        "",
    ]
    if gpu is None:
        lines += [
            "**Not measured on a GPU.** No GPU was available to this work; every figure below is either a",
            "FLOP count (no GPU needed) or a CPU smoke run of the tiny models, which shows that the benchmark",
            "and the optimisations run, not how fast a GPU is. To take the GPU figures, on one H100/H200",
            "machine, in a checkout of this repository:",
            "",
            "    bench/gpu_run.sh",
            "",
            "(it installs diffusers and pydantic from `.whl/` or PyPI if missing, runs",
            "`bench/gpu_pipeline.py` for all three families, writes `bench/results/gpu_pipeline.json` and",
            "rewrites this page). All three families at `--repeats 3` take an estimated 30-40 minutes, most",
            "of it torch.compile warm-ups and Qwen-Image's 50-step images; where one command may run 10",
            "minutes at most, run the families one by one with fewer repeats:",
            "`bench/gpu_run.sh --families sdxl --repeats 2`, then `flux`, then `qwen-image --repeats 1`",
            "(each run writes its families into `bench/results/gpu_pipeline.json`).",
        ]
    else:
        lines += [f"Measured on **{gpu['device']}** ({gpu['started']}); command: `{RUN_COMMAND}`."]
    lines += [
        "",
        "## What one image costs",
        "",
        "FLOPs counted with torch's FlopCounterMode on meta-device models built from the published",
        "configs (`configs/`, `bench/full_size.py`), at `serve_config.gpu.yaml`'s defaults; classifier-free",
        "guidance (SDXL, one doubled batch) and true CFG (Qwen-Image, two passes) included. The compute",
        "limit is the peak dense bf16/fp16 rate of an H100/H200 SXM (989 TFLOP/s) over those FLOPs; the",
        "issue's target is at least half of it, sustained.",
        "",
    ]
    if flops is not None:
        lines += flops_table(flops["flops"], PEAK_TFLOPS["H200"])
    lines += [
        "",
        "## The optimisations",
        "",
        "Each is a typed, per-model switch (`optimisations:` in the model config, applied by",
        "`deployments/optimisations.py` when a replica loads), on in `serve_config.gpu.yaml` where it",
        "pays and off in the embedded CPU config. The benchmark adds them one at a time (the ladder).",
        "",
        "| switch | SDXL | FLUX.1-schnell | Qwen-Image | CPU default |",
        "|---|---|---|---|---|",
        "| `attention: sdpa` (math is the off state; `flash` pins SDPA to its flash kernel) | on | on | on | as loaded (SDPA) |",
        "| `channels_last` (UNet, 2-D VAE) | on | on (VAE) | off: 3-D VAE, no UNet | off |",
        "| `fp16_vae` (fp16-fix VAE, no float32 upcast) | on | n/a (bf16) | n/a (bf16) | off |",
        "| `compile` (static shapes, warmed per size x images per call) | on | on | off: prompt length is in the shape | off |",
        "| CUDA graphs (`compile.mode: reduce-overhead`) | on | on | off | refused: needs CUDA |",
        "| `batching.max_images_by_size` | from the memory column below | same | same | unset |",
        "",
    ]
    if gpu is not None:
        lines += ["## Measured on the GPU"] + results_tables(gpu) + [""]
    else:
        lines += ["## Measured on the GPU", "", "Not measured on a GPU.", ""]
    if smoke is not None:
        lines += [
            "## CPU smoke run (NOT GPU figures)",
            "",
            "`python bench/gpu_pipeline.py --cpu-smoke --repeats 3 --out bench/results/gpu_pipeline_cpu_smoke.json`:",
            "the built-in tiny models on the shared 2-core CPU of the development machine, float32,",
            "through the same loader, optimisations, warm-up and runner. torch.compile traces with the",
            "`eager` backend here (inductor would spend minutes compiling C++); flash attention and CUDA",
            "graphs cannot run on a CPU; the production rows use the CPU config (all off). The latencies",
            "say nothing about a GPU; the pixel differences say the switches keep the images.",
        ]
        lines += results_tables(smoke) + [""]
    DOC.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU (the test suite runs this)")
    parser.add_argument("--count-flops", action="store_true", help="only count FLOPs on meta-device models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak rate (default: by name)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--write-doc", action="store_true", help="only rewrite docs/gpu.md from the JSON results")
    args = parser.parse_args(argv)
    if args.write_doc:
        write_doc()
        return 0
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; known: {list(FAMILIES)}")
    args.batch_sizes = [int(n) for n in args.batch_sizes.split(",")]

    import torch

    document: dict[str, Any] = {
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.count_flops:
        document["flops"] = count_only(families)
        write_json(args.out or FLOPS_RESULTS, document)
        return 0
    if args.cpu_smoke:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        document["device"] = "cpu (smoke run: tiny models, NOT a GPU measurement)"
    else:
        document["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    document["families"] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as work:
        for family in families:
            print(f"{family}:", flush=True)
            document["families"][family] = run_family(family, args, Path(work))
    out = args.out or RESULTS
    if args.cpu_smoke and args.out is None:
        raise SystemExit("--cpu-smoke writes only where --out says (it must not replace GPU figures)")
    previous = _load(out)
    if previous is not None and previous.get("device") == document["device"]:
        # Families run one at a time add up in one file (same device only).
        document["families"] = {**previous.get("families", {}), **document["families"]}
    write_json(out, document)
    print(json.dumps({"written": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
