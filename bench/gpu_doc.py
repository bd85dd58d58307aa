"""docs/gpu.md, written from bench/results/gpu_pipeline*.json and bench/gpu_plan.py's estimates
(``python bench/gpu_pipeline.py --write-doc``)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import gpu_plan

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gpu.md"
RESULTS = ROOT / "bench" / "results"
GPU_RESULTS = RESULTS / "gpu_pipeline.json"
SMOKE_RESULTS = RESULTS / "gpu_pipeline_cpu_smoke.json"
FLOPS_RESULTS = RESULTS / "gpu_pipeline_flops.json"
SMOKE_COMMAND = (
    "python bench/gpu_pipeline.py --cpu-smoke --ladder --repeats 3 --out bench/results/gpu_pipeline_cpu_smoke.json"
)

# The device commands: (budget given to gpu_run.sh, families, the run tool's timeout_s).
FIRST_RUN = (540, None, 600)
SECOND_RUN = (200, "qwen-image", 240)
CARRY = ".cache/gpu-wheels"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def merge_results(paths: list[Path], into: Path = GPU_RESULTS) -> dict[str, Any]:
    """The families of several GPU runs' results (each command's $OUT/gpu_pipeline.json) in one
    file, later runs winning; they must come from one kind of device."""
    documents = [json.loads(Path(path).read_text()) for path in paths]
    devices = {document["device"] for document in documents}
    if len(devices) != 1:
        raise SystemExit(f"results from different devices, not merged: {sorted(devices)}")
    merged = {**documents[-1], "families": {}}
    for document in documents:
        merged["families"].update(document["families"])
    into.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def device_command(budget: int, families: str | None) -> str:
    return f"bash bench/gpu_run.sh --budget {budget}" + (f" --families {families}" if families else "")


# --- how to run it -------------------------------------------------------------------------------


def run_section(flops: dict[str, Any]) -> list[str]:
    lines = [
        "## Running it on a lent GPU",
        "",
        "A lent machine gives one command at most 10 minutes and about 15 minutes in all, its start",
        "included; it reaches no registry and lacks diffusers and pydantic. So:",
        "",
        "1. Here, with the registry: `bench/gpu_run.sh --download-wheels` puts the wheels of",
        "   `bench/gpu_wheels.txt` in `.cache/gpu-wheels/` (16 MB). `bench/check_gpu_wheels.sh` proves",
        "   they install with `--no-index --no-deps --target` and import diffusers and pydantic on",
        "   Python 3.12 with the GPU machine's versions (torch 2.11, transformers 5.17,",
        "   huggingface_hub 1.33, tokenizers 0.23, safetensors 0.8, accelerate 1.15, an older",
        "   typing_extensions), and runs this benchmark's FLOP count and CPU smoke run there (last run",
        "   for issue 23: passed with torch 2.11.0+cu130, transformers 5.17.0, huggingface_hub 1.33.0,",
        "   tokenizers 0.23.3, safetensors 0.8.0, accelerate 1.15.0, peft 0.21.2, typing_extensions",
        "   4.12.2, Python 3.12.1; without the carried typing_extensions, pydantic fails to import:",
        "   `cannot import name 'Sentinel'`).",
        f"2. On the GPU, from the repository root, with `{CARRY}` carried beside the working tree:",
        "",
        "   | command | timeout_s | carry |",
        "   |---|---:|---|",
        f"   | `{device_command(FIRST_RUN[0], FIRST_RUN[1])}` | {FIRST_RUN[2]} | `{CARRY}` |",
        (
            f"   | then, if 4 minutes of device time are left: `{device_command(SECOND_RUN[0], SECOND_RUN[1])}` "
            f"| {SECOND_RUN[2]} | `{CARRY}` |"
        ),
        "",
        "   Each family runs in its own process under its own `timeout` (what is left of the budget),",
        "   writes its JSON after every measurement and copies it, the log and this page to `$OUT`, the",
        "   one folder that comes back: a timeout or a crash keeps what was measured. Separate processes",
        "   release compiled graphs and GPU memory between families (the in-process path also calls",
        "   `torch._dynamo.reset()` and `torch.cuda.empty_cache()`).",
        "3. Here: `python bench/gpu_pipeline.py --merge-results OUT1/gpu_pipeline.json [OUT2/gpu_pipeline.json]`",
        "   puts the families of each command's `$OUT` into `bench/results/gpu_pipeline.json` and rewrites",
        "   this page.",
        "",
        "`--budget` picks, in order of value, the fullest job of each family that fits in what is left",
        "(bench/gpu_plan.py); one that does not fit is skipped and a later, cheaper one may still run.",
        "`--ladder` adds each family's optimisations ladder (each switch added in turn; several cold",
        "compiles: for a budget of its own).",
        "",
        "### Expected wall time (estimated from counted work, not measured)",
        "",
        *textwrap.wrap(
            f"Counted: the denoiser steps and images each job runs, times the FLOPs below, at "
            f"{gpu_plan.ASSUMED_MFU:.0%} of {gpu_plan.PEAK_TFLOPS_H100:g} TFLOP/s. Assumed: {gpu_plan.START_S:g} s "
            f"to start a process (imports, CUDA context), {gpu_plan.BUILD_S:g} s + "
            f"{gpu_plan.BUILD_S_PER_BILLION_PARAMS:g} s per billion parameters to build random weights on the GPU, "
            "and one inductor compile with CUDA graphs per warmed shape of "
            f"{', '.join(f'{k} {v:g} s' for k, v in gpu_plan.COMPILE_S.items())}: the compile guess is the largest "
            "uncertainty and most of a compiled family's time. Timed on this CPU: the FLOP count on meta-device "
            "models. The machine's own start (minutes) comes on top: it counts against the session's device time, "
            "not against a command's timeout.",
            width=100,
        ),
        "",
        "| job | start | build | peak + FLOP count | compile | work | total s | with `--ladder` |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for family in gpu_plan.FAMILIES:
        for job in gpu_plan.JOBS[family]:
            e = gpu_plan.estimate(job, flops)
            ladder = gpu_plan.estimate(job, flops, ladder=True)["total"]
            lines.append(
                f"| {gpu_plan.describe(job)} | {e['start']:.0f} | {e['build']:.0f} | {e['count']:.0f} "
                f"| {e['compile']:.0f} | {e['work']:.0f} | **{e['total']:.0f}** | {ladder:.0f} |"
            )
    lines += [
        "",
        "| command | runs (if every estimate holds) | estimated wall time |",
        "|---|---|---:|",
    ]
    for budget, families, _ in (FIRST_RUN, SECOND_RUN):
        chosen = gpu_plan.pick(budget, families.split(",") if families else list(gpu_plan.FAMILIES), flops)
        total = gpu_plan.SETUP_S + sum(s for _, s in chosen) + gpu_plan.RESERVE_S
        runs = "; ".join(gpu_plan.describe(job) for job, _ in chosen) or "nothing"
        lines.append(f"| `{device_command(budget, families)}` | {runs} | {total:.0f} s |")
    lines += [
        "",
        f"Both include {gpu_plan.SETUP_S:g} s of set-up (wheels, the CUDA check) and {gpu_plan.RESERVE_S:g} s kept back",
        "to write this page. Where the estimates prove short, the run skips or cuts its later families",
        "rather than overrun its budget; where they prove long, the second command has room.",
        "",
    ]
    return lines


# --- results -------------------------------------------------------------------------------------


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _pct(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.1%}" if row.get(key) is not None else "n/a"


def family_header(result: dict[str, Any]) -> list[str]:
    head = (
        f"**{result['model']}** ({result['dtype']}, {result['size']}, {result['steps']} steps, guidance "
        f"{result['guidance']:g})"
    )
    status = result.get("status", "complete")
    if status != "complete":
        head += f" — **{status}**" if status.startswith("failed") else " — **stopped before the end** (timeout)"
    notes = []
    if "flops_per_image_measured" in result:
        notes.append(f"{result['flops_per_image_measured'] / 1e6:.0f} MFLOP per image, counted while it ran")
    if "flops_counted" in result:
        notes.append(
            f"{result['flops_counted']['tflop_per_image']:,.1f} TFLOP per image, counted for the text lengths used"
        )
    if result.get("text_lengths"):
        used = ", ".join(f"{k} {v}" for k, v in result["text_lengths"].items())
        notes.append(f"tokens per call: {used}")
    peak = result.get("peak_tflops")
    if peak:
        sheet = "" if peak["datasheet"] is None else f"; data sheet {peak['datasheet']:g}"
        notes.append(f"peak measured {peak['measured']['tflops']:g} TFLOP/s ({peak['measured']['how']}){sheet}")
    return ["", head + ("; " + "; ".join(notes) if notes else ""), ""]


def batch_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        (
            "| images per call | warm-up s | s per call | images/s | peak allocated GiB | peak reserved GiB "
            "| device used GiB | MFU (measured peak) | MFU (data sheet) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.get("out_of_memory"):
            lines.append(f"| {row['images_per_call']} | out of memory | | | | | | | |")
            continue
        lines.append(
            f"| {row['images_per_call']} | {row.get('warm_up_s', 0):.1f} | {row['seconds']:.3f} "
            f"| {row['images_per_s']:.3f} | {_gib(row.get('peak_allocated_gib'))} | {_gib(row.get('peak_reserved_gib'))} "
            f"| {_gib(row.get('peak_device_used_gib'))} | {_pct(row, 'mfu')} | {_pct(row, 'mfu_datasheet')} |"
        )
    return lines


def probe_table(probe: dict[str, Any], steps: int) -> list[str]:
    if probe.get("out_of_memory"):
        return [f"Step probe: out of memory at batch 1 (peak reserved {_gib(probe.get('peak_reserved_gib'))} GiB)."]
    fits = {True: "yes", False: "no", None: "n/a"}[probe.get("fits_h100")]
    low, high = probe["steps"]
    return [
        (
            f"| s at {low} / {high} steps | s/step | fixed s per image | {steps}-step image s | peak allocated GiB "
            "| peak reserved GiB | device used GiB | fits an H100 80GB | denoiser MFU (measured peak) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        (
            f"| {probe['seconds'][0]:.3f} / {probe['seconds'][1]:.3f} | {probe['s_per_step']:.4f} | {probe['fixed_s']:.3f} "
            f"| {probe['default_steps_image_s']:.2f} | {_gib(probe.get('peak_allocated_gib'))} "
            f"| {_gib(probe.get('peak_reserved_gib'))} | {_gib(probe.get('peak_device_used_gib'))} | {fits} "
            f"| {_pct(probe, 'mfu')} |"
        ),
    ]


def ladder_table(rungs: list[dict[str, Any]]) -> list[str]:
    lines = [
        (
            "| variant (cumulative) | batch-1 latency s | warm-up s | max pixel difference from all off "
            "| denoiser calls compiled / uncompiled |"
        ),
        "|---|---:|---:|---:|---:|",
    ]
    for rung in rungs:
        calls = rung.get("denoiser_calls")
        calls_text = "" if calls is None else f"{calls['compiled']} / {calls['eager']}"
        lines.append(
            f"| {rung['variant']} | {rung['batch1_latency_s']:.3f} | {rung['warm_up_s']:.1f} "
            f"| {rung['max_pixel_difference_from_all_off']} | {calls_text} |"
        )
    return lines


def results_tables(document: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for result in document["families"].values():
        lines += family_header(result)
        if result.get("by_batch_size"):
            lines += batch_table(result["by_batch_size"]) + [""]
        if result.get("step_probe"):
            lines += probe_table(result["step_probe"], result["steps"]) + [""]
        if result.get("ladder"):
            lines += ladder_table(result["ladder"]) + [""]
    return lines


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


OPTIMISATIONS = [
    "## The optimisations",
    "",
    "Each is a typed, per-model switch (`optimisations:` in the model config, applied by",
    "`deployments/optimisations.py` when a replica loads), on in `serve_config.gpu.yaml` where it",
    "pays and off in the embedded CPU config. `--ladder` measures them one at a time.",
    "",
    "| switch | SDXL | FLUX.1-schnell | Qwen-Image | CPU default |",
    "|---|---|---|---|---|",
    "| `attention: sdpa` (math is the off state; `flash` pins SDPA to its flash kernel) | on | on | on | as loaded (SDPA) |",
    "| `channels_last` (UNet, 2-D VAE) | on | on (VAE) | off: 3-D VAE, no UNet | off |",
    "| `fp16_vae` (fp16-fix VAE, no float32 upcast) | on | n/a (bf16) | n/a (bf16) | off |",
    "| `compile` (static shapes, warmed per size x images per call) | on | on | off: prompt length is in the shape | off |",
    "| CUDA graphs (`compile.mode: reduce-overhead`) | on | on | off | refused: needs CUDA |",
    "| `batching.max_images_by_size` | from the reserved-memory column below | same | same | unset |",
    "",
    "Under CUDA graphs every compiled denoiser call marks a new graph-tree step and hands the",
    "pipeline a copy of its output (`BucketedCompile`): the next replay may reuse the graph pool's",
    "memory, and true CFG (two calls per step) still holds the first output then.",
    "",
    "What compile serves (deployments/optimisations.py, `compile_scope` and `BucketedCompile`):",
    "only a call that runs the denoiser as the warm-up did. A call of an unwarmed shape, a call",
    "with LoRA adapters (peft layers and their scales) and a call with go_fast's TaylorSeer hooks",
    "(FLUX.1, Qwen-Image; `go_fast: true` is the default) run the uncompiled denoiser, so on",
    "FLUX.1-schnell compile speeds up `go_fast: false` requests only. The request path never",
    "traces: compiled calls run under dynamo's `eager_on_recompile` stance, so a warmed graph",
    "whose guards no longer hold runs uncompiled instead of compiling. That is what happens to",
    "every call once an adapter has been loaded (peft wraps the denoiser's linears, and the",
    "wrappers stay while LoRA is off): on a model that serves LoRA requests compile pays only",
    "until the first one. The images are right in every case (tests/test_optimisations.py,",
    "`test_lora_and_go_fast_calls_run_uncompiled_and_nothing_compiles_on_a_request`).",
    "",
]

COLUMNS = [
    "Columns: *peak reserved* is what to size `max_images_by_size` by (CUDA graph pools are reserved",
    "memory, and their tensors do not count as allocated); *device used* adds the memory outside",
    "torch's allocator (CUDA context, library workspaces). MFU is counted FLOPs x images/s over the",
    "peak *measured* on the device (a matmul in the model's dtype, named in each family's line), and",
    "over the data sheet's rate beside it. The fp16-safe SDXL VAE is the pipeline's own VAE weights",
    "saved with the fp16-fix config (no float32 upcast): random weights, not trained to stay inside",
    "float16's range as the real fp16-fix ones were.",
    "",
]


def write_doc() -> None:
    flops = _load(FLOPS_RESULTS)
    smoke = _load(SMOKE_RESULTS)
    gpu = _load(GPU_RESULTS)
    lines = [
        "# GPU performance (issues 16, 23)",
        "",
        "Written by `python bench/gpu_pipeline.py --write-doc` from `bench/results/gpu_pipeline*.json`",
        "and `bench/gpu_plan.py`.",
        "",
    ]
    if gpu is None:
        lines += [
            "**Not measured on a GPU.** No GPU was lent to this work yet; every figure below is either a",
            "FLOP count (no GPU needed), an estimate, or a CPU smoke run of the tiny models, which shows that",
            "the benchmark and the optimisations run, not how fast a GPU is.",
            "",
        ]
    else:
        lines += [f"Measured on **{gpu['device']}** ({gpu['started']}).", ""]
    lines += run_section(flops["flops"]) if flops is not None else []
    lines += [
        "## What one image costs",
        "",
        "FLOPs counted with torch's FlopCounterMode on meta-device models built from the published",
        "configs (`configs/`, `bench/full_size.py`), at `serve_config.gpu.yaml`'s defaults; classifier-free",
        "guidance (SDXL, one doubled batch) and true CFG (Qwen-Image, two passes) included, for a typical",
        "prompt (a GPU run recounts them for the text lengths it used). The compute limit is the peak",
        "dense bf16/fp16 rate of an H100/H200 SXM (989 TFLOP/s) over those FLOPs; the target is at",
        "least half of it, sustained.",
        "",
    ]
    if flops is not None:
        lines += flops_table(flops["flops"], gpu_plan.PEAK_TFLOPS_H100) + [""]
    lines += OPTIMISATIONS
    lines += ["## Measured on the GPU", ""]
    if gpu is not None:
        lines += COLUMNS + results_tables(gpu) + [""]
    else:
        lines += ["Not measured on a GPU.", ""]
    if smoke is not None:
        lines += [
            "## CPU smoke run (NOT GPU figures)",
            "",
            f"`{SMOKE_COMMAND}`:",
            "the built-in tiny models on the shared 2-core CPU of the development machine, float32,",
            "through the same loader, optimisations, warm-up and runner. torch.compile traces with the",
            "`eager` backend here (inductor would spend minutes compiling C++); flash attention and CUDA",
            "graphs cannot run on a CPU; the production rows use the CPU config (all off), and MFU is",
            "against a small float32 matmul on this CPU. The latencies say nothing about a GPU; the pixel",
            "differences say the switches keep the images.",
        ]
        lines += results_tables(smoke) + [""]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    DOC.write_text(text.rstrip() + "\n")
