"""go_fast per family: speed-up and image difference against go_fast false (issue 13).

For each tiny model of serve_config.yaml: the request {size 128x128, num_inference_steps
16, n 2, seed 1} planned exactly as the service plans it (``plan_generation``), once with
go_fast true and once with false, run through the model deployment's call
(``deployments.model_deployment.run_call``: the speed mode applied around the pipeline) on
one torch thread, as a replica of the embedded default has. Timings alternate the two modes
and take the median of the repetitions; the images of the same seeds are compared (PSNR
and SSIM of go_fast true against go_fast false).

    python bench/go_fast.py          # full run: JSON + docs/benchmarks.md
    python bench/go_fast.py --quick  # smoke run (prints, writes nothing)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MODEL_CACHE, RESULTS, ROOT, machine_info, update_doc_section, write_json

NAME = "go_fast"


def psnr(a, b) -> float:
    import numpy as np

    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def ssim(a, b) -> float:
    """Mean SSIM over 7x7 windows of the luma (Wang et al. 2004 constants)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    def luma(image):
        rgb = torch.from_numpy(np.asarray(image.convert("RGB"), np.float64)).permute(2, 0, 1)
        return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None, None]

    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean = lambda t: F.avg_pool2d(t, 7, stride=1)
    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def run(size: int, steps: int, n: int, repetitions: int) -> dict[str, Any]:
    import torch

    from deployments.adapters import AdapterCache
    from deployments.grouping import group_jobs
    from deployments.model_deployment import run_call
    from deployments.pipeline_loader import load_pipelines
    from serve_app.config import load_app_config
    from serve_app.planning import plan_generation
    from serve_app.protocol import parse_generation_request

    torch.set_num_threads(1)
    config = load_app_config(ROOT / "serve_config.yaml")
    rows = []
    for model in config.models:
        pipes = load_pipelines(model.family, model.weights, model.device, model.dtype, MODEL_CACHE)
        adapters = AdapterCache(pipes.text_to_image, {}, 1, MODEL_CACHE)
        calls, shapes = {}, {}
        for go_fast in (False, True):
            body = {
                "model": model.id,
                "prompt": "a lighthouse on a cliff at dusk",
                "size": f"{size}x{size}",
                "num_inference_steps": steps,
                "n": n,
                "seed": 1,
                "go_fast": go_fast,
            }
            plan = plan_generation(parse_generation_request(body), model)
            (calls[go_fast],) = group_jobs(plan.jobs("bench", n))
            shapes[go_fast] = plan.shape
        images: dict[bool, list] = {}
        seconds: dict[bool, list[float]] = {False: [], True: []}
        run_call(pipes, adapters, model.speed_mode, calls[False], "cpu")  # warm-up
        for _ in range(repetitions):
            for go_fast in (False, True):
                started = time.perf_counter()
                images[go_fast] = run_call(pipes, adapters, model.speed_mode, calls[go_fast], "cpu")
                seconds[go_fast].append(time.perf_counter() - started)
        slow, fast = statistics.median(seconds[False]), statistics.median(seconds[True])
        speed = model.speed_mode
        rows.append(
            {
                "model": model.id,
                "family": model.family,
                "go_fast": "TaylorSeer cache, full pass every "
                f"{speed.cache_interval} steps after {speed.cache_warmup_steps}"
                if speed.cache == "taylorseer"
                else f"{speed.step_fraction:g} of the steps ({shapes[False].steps} -> {shapes[True].steps})",
                "seconds_go_fast_false": round(slow, 4),
                "seconds_go_fast_true": round(fast, 4),
                "speedup": round(slow / fast, 2),
                "psnr_db": round(statistics.mean(psnr(a, b) for a, b in zip(images[True], images[False])), 2),
                "ssim": round(statistics.mean(ssim(a, b) for a, b in zip(images[True], images[False])), 3),
            }
        )
        print(rows[-1], flush=True)
    return {"size": size, "steps": steps, "n": n, "repetitions": repetitions, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "## go_fast per family (issue 13)",
        "",
        (
            f"`python bench/go_fast.py`: each tiny model of serve_config.yaml, {result['n']} images of "
            f"{result['size']}x{result['size']} at {result['steps']} steps in one call, one torch thread, "
            f"median of {result['repetitions']} alternating runs; the images of go_fast true compared with those of "
            "go_fast false at the same seeds, on a 2-core machine shared with other work (alternating runs keep the "
            "ratio fair). On the tiny random-weight models the text encoders and the VAE are a large share of a call, "
            "so a transformer cache saves less than it would on real weights, and TaylorSeer's extrapolation of a "
            "smooth random model is nearly exact (hence the PSNR); neither number is a claim about real weights, "
            "which only a GPU with them can measure."
        ),
        "",
        "| model | go_fast does | s (false) | s (true) | speed-up | PSNR dB | SSIM |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['go_fast']} | {row['seconds_go_fast_false']} | {row['seconds_go_fast_true']} | "
            f"{row['speedup']}x | {row['psnr_db']} | {row['ssim']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(size=64, steps=8, n=1, repetitions=1) if args.quick else run(size=128, steps=16, n=2, repetitions=5)
    if args.quick:
        print(markdown(result))
        return
    result["machine"] = machine_info()
    write_json(RESULTS / f"{NAME}.json", result)
    update_doc_section(NAME, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
