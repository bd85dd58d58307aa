"""What one lent GPU budget buys (issue 23): the families in order of value, what each one's
process measures, how long it should take, estimated from counted work, and which of them a
budget picks. Torch-free, so bench/gpu_run.sh asks it before each family in a second.

    python bench/gpu_plan.py                        # every job and its estimate, as JSON
    python bench/gpu_plan.py --budget 540           # what a 540-second command runs
    python bench/gpu_plan.py fit flux 300           # "<estimated s> <gpu_pipeline.py arguments>" of
                                                    # the fullest flux job that fits in 300 s (exit 1: none)

The estimate of a job, in seconds, is the sum of
- start: Python, torch, diffusers and transformers imports, the CUDA context (assumed);
- build: the full-size model with random weights on the GPU, per billion parameters (assumed);
- count: its FLOPs on meta-device models for the prompt length it used (timed on a CPU);
- compile: one inductor compile with CUDA graphs per warmed images-per-call (assumed: the
  largest uncertainty, and most of a compiled family's time);
- work: the denoiser steps and images it runs (counted: warm-up, one unmeasured run per
  shape, the repeats), times the FLOPs per step and per image of
  bench/results/gpu_pipeline_flops.json, at an assumed ASSUMED_MFU of an H100's peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOPS = ROOT / "bench" / "results" / "gpu_pipeline_flops.json"

PEAK_TFLOPS_H100 = 989.4  # dense bf16/fp16, SXM data sheet
ASSUMED_MFU = 0.4  # of that peak, for generation work (the target is 0.5)
START_S = 25.0
BUILD_S = 5.0
BUILD_S_PER_BILLION_PARAMS = 2.0
PEAK_PROBE_S = 5.0  # the bf16 matmul that measures the device's peak
# FLOP counting on meta-device models, per family (timed on the 2-core development CPU: 5.8, 2.4, 2.6 s).
COUNT_S = {"sdxl": 6.0, "flux": 3.0, "qwen-image": 3.0}
# One inductor compile (reduce-overhead: CUDA graphs) of the denoiser for one shape.
COMPILE_S = {"sdxl": 90.0, "flux": 150.0, "qwen-image": 240.0}
CALL_OVERHEAD_S = 0.1  # per pipeline call: scheduler, Python, PNG-free PIL conversion
SETUP_S = 20.0  # gpu_run.sh before the first family: wheels into a target folder, CUDA check
RESERVE_S = 20.0  # gpu_run.sh after the last family: docs/gpu.md rewritten, results copied
WARM_UP_STEPS = 2  # deployments.optimisations.warm_up_calls: two steps per warmed shape
DEFAULT_STEPS = {"sdxl": 30, "flux": 4, "qwen-image": 50}


@dataclass(frozen=True)
class Job:
    """What one family's process measures."""

    family: str
    batch_sizes: tuple[int, ...]  # images per call, each warmed (compiled) and measured in turn
    repeats: int
    compiled: bool  # serve_config.gpu.yaml compiles it: one compile per batch size
    step_probe: tuple[int, int] | None = None  # batch-1 s/step from two step counts

    def arguments(self, ladder: bool = False) -> list[str]:
        args = ["--families", self.family, "--repeats", str(self.repeats)]
        args += ["--batch-sizes", ",".join(map(str, self.batch_sizes)) or "none"]
        if self.step_probe is not None:
            args += ["--step-probe", ",".join(map(str, self.step_probe))]
        return args + (["--ladder"] if ladder else [])


# In order of value; a family's jobs from the fullest to the least that is still worth running.
JOBS: dict[str, tuple[Job, ...]] = {
    # Production SDXL: batch-1 latency, images/s at 1 and 8 per call, memory, MFU.
    "sdxl": (Job("sdxl", (1, 8), repeats=3, compiled=True), Job("sdxl", (1,), repeats=3, compiled=True)),
    "flux": (Job("flux", (1, 4), repeats=3, compiled=True), Job("flux", (1,), repeats=2, compiled=True)),
    # Not compiled in production (prompt length is in the shape): eager s/step and whether its
    # 29B parameters and activations fit an H100, at 2 and 6 steps rather than 50.
    "qwen-image": (Job("qwen-image", (), repeats=2, compiled=False, step_probe=(2, 6)),),
}
FAMILIES = tuple(JOBS)


def load_flops(path: Path = FLOPS) -> dict[str, Any]:
    return json.loads(path.read_text())["flops"]


def work_counts(job: Job, ladder: bool = False) -> dict[str, int]:
    """Denoiser image-steps, decoded images and pipeline calls the job runs."""
    steps = DEFAULT_STEPS[job.family]
    image_steps = images = calls = 0
    for n in job.batch_sizes:
        # Warm-up (compiled: two steps), one unmeasured run, the repeats.
        image_steps += n * WARM_UP_STEPS + n * steps * (1 + job.repeats)
        images += n * (2 + job.repeats)
        calls += 2 + job.repeats
    if job.step_probe is not None:
        low, high = job.step_probe
        image_steps += low + job.repeats * (low + high)
        images += 1 + 2 * job.repeats
        calls += 1 + 2 * job.repeats
    if ladder:
        rungs = len(ladder_rungs(job.family))
        image_steps += rungs * (WARM_UP_STEPS + steps * job.repeats)
        images += rungs * (1 + job.repeats)
        calls += rungs * (1 + job.repeats)
    return {"image_steps": image_steps, "images": images, "calls": calls}


def ladder_rungs(family: str) -> list[str]:
    """The ladder's rungs on a GPU (bench/gpu_pipeline.py ``ladder``)."""
    rungs = ["all off (math attention)", "+ sdpa", "+ flash (sdpa flash kernel)", "+ channels_last"]
    if family == "sdxl":
        rungs.append("+ fp16-safe VAE")
    return rungs + ["+ torch.compile", "+ CUDA graphs (reduce-overhead)"]


def estimate(job: Job, flops: dict[str, Any], ladder: bool = False) -> dict[str, float]:
    """Seconds by part and in total (see the module's docstring)."""
    row = flops[job.family]
    denoiser_per_step = row["tflop_by_part_per_image"]["denoiser"] / row["steps"]
    rest_per_image = row["tflop_per_image"] - row["tflop_by_part_per_image"]["denoiser"]
    counts = work_counts(job, ladder)
    rate = PEAK_TFLOPS_H100 * ASSUMED_MFU
    compiles = len(job.batch_sizes) if job.compiled else 0
    if ladder:
        compiles += 2  # the ladder's "+ torch.compile" and "+ CUDA graphs" rungs, batch 1
    parts = {
        "start": START_S,
        "build": BUILD_S + BUILD_S_PER_BILLION_PARAMS * sum(row["params_billion"].values()),
        "count": PEAK_PROBE_S + COUNT_S[job.family],
        "compile": COMPILE_S[job.family] * compiles,
        "work": (counts["image_steps"] * denoiser_per_step + counts["images"] * rest_per_image) / rate
        + counts["calls"] * CALL_OVERHEAD_S,
    }
    parts["total"] = sum(parts.values())
    return {k: round(v, 1) for k, v in parts.items()}


def fit(family: str, seconds: float, flops: dict[str, Any], ladder: bool = False) -> Job | None:
    """The fullest job of ``family`` whose estimate fits in ``seconds``."""
    return next((job for job in JOBS[family] if estimate(job, flops, ladder)["total"] <= seconds), None)


def pick(budget: float, families: list[str], flops: dict[str, Any], ladder: bool = False) -> list[tuple[Job, float]]:
    """What gpu_run.sh runs in ``budget`` seconds if every estimate holds: in order of value,
    the fullest job of each family that fits in what is left; one that does not is skipped
    and a later, cheaper one may still run."""
    left = budget - SETUP_S - RESERVE_S
    chosen = []
    for family in families:
        job = fit(family, left, flops, ladder)
        if job is not None:
            seconds = estimate(job, flops, ladder)["total"]
            chosen.append((job, seconds))
            left -= seconds
    return chosen


def describe(job: Job) -> str:
    what = []
    if job.batch_sizes:
        what.append(f"{', '.join(map(str, job.batch_sizes))} image{'s' if job.batch_sizes != (1,) else ''} per call")
    if job.step_probe is not None:
        what.append(f"eager s/step from {job.step_probe[0]} and {job.step_probe[1]} steps")
    return f"{job.family} ({'; '.join(what)}; {job.repeats} repeats)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=None, help="seconds: print what fits")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--ladder", action="store_true", help="each family also runs the optimisations ladder")
    parser.add_argument("fit", nargs="*", help="fit FAMILY SECONDS: the gpu_pipeline.py arguments that fit")
    args = parser.parse_args(argv)
    flops = load_flops()
    if args.fit:
        if len(args.fit) != 3 or args.fit[0] != "fit" or args.fit[1] not in JOBS:
            parser.error(f"expected: fit FAMILY SECONDS with FAMILY one of {list(JOBS)}")
        job = fit(args.fit[1], float(args.fit[2]), flops, args.ladder)
        if job is None:
            return 1
        print(f"{estimate(job, flops, args.ladder)['total']:.0f}", " ".join(job.arguments(args.ladder)))
        return 0
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if args.budget is not None:
        chosen = pick(args.budget, families, flops, args.ladder)
        print(json.dumps([{"job": describe(job), "estimated_s": seconds} for job, seconds in chosen], indent=2))
        return 0
    table = {describe(job): estimate(job, flops, args.ladder) for f in families for job in JOBS[f]}
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
