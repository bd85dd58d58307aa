"""bench/gpu_pipeline.py and bench/gpu_run.sh cannot rot: --cpu-smoke runs the whole
measurement on the tiny models on CPU (the same loader, optimisations, warm-up and runner as on
a GPU, and the same one-process-per-family orchestration), --count-flops builds a full-size
family from configs/ on the meta device, and bench/gpu_plan.py's budget picks are checked
against the order of value of issue 23."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_plan  # bench/ is not a package: on sys.path above


def load_bench():
    """bench/gpu_pipeline.py as a module, in this process (torch and diffusers are imported already)."""
    spec = importlib.util.spec_from_file_location("gpu_pipeline", ROOT / "bench" / "gpu_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*args: str, expect: int = 0):
    module = load_bench()
    assert module.main(list(args)) == expect
    return module


def test_cpu_smoke_measures_every_switch_and_batch_size(tmp_path):
    out, copies = tmp_path / "smoke.json", tmp_path / "out"
    run_bench(
        "--cpu-smoke", "--families", "flux", "--repeats", "1", "--batch-sizes", "1,2", "--ladder",
        "--out", str(out), "--copy-to", str(copies),
    )  # fmt: skip
    document = json.loads(out.read_text())
    assert "NOT a GPU" in document["device"]
    assert json.loads((copies / "smoke.json").read_text()) == document  # what $OUT gets
    flux = document["families"]["flux"]
    assert flux["model"] == "tiny-flux"
    assert flux["status"] == "complete"
    assert flux["flops_per_image_measured"] > 1e6
    # FLUX pads prompts: the lengths the call used are the padded ones.
    assert flux["text_lengths"]["text_encoder"] == [77]
    assert flux["text_lengths"]["denoiser"] == flux["text_lengths"]["text_encoder_2"]
    assert flux["peak_tflops"]["measured"]["tflops"] > 0 and "matmul" in flux["peak_tflops"]["measured"]["how"]
    variants = [rung["variant"] for rung in flux["ladder"]]
    assert variants == ["all off (math attention)", "+ sdpa", "+ channels_last", "+ torch.compile"]
    for rung in flux["ladder"]:
        assert rung["batch1_latency_s"] > 0
        assert rung["max_pixel_difference_from_all_off"] <= 2
    assert flux["ladder"][-1]["optimisations"]["compile"]["batch_sizes"] == [1]
    rows = flux["by_batch_size"]
    assert [row["images_per_call"] for row in rows] == [1, 2]
    for row in rows:
        assert row["images_per_s"] > 0 and row["mfu"] > 0
        assert {"peak_allocated_gib", "peak_reserved_gib", "peak_device_used_gib"} <= set(row)
    assert flux["batch1_latency_s"] == rows[0]["seconds"]


def test_each_measurement_is_saved_as_it_is_made(tmp_path):
    """A family that fails (or is killed by its timeout) half-way keeps what it measured."""
    out = tmp_path / "partial.json"
    module = load_bench()
    measure = module.FamilyRun.measure_batch

    def fail_on_two(self, n):
        if n == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return measure(self, n)

    module.FamilyRun.measure_batch = fail_on_two
    args = ["--cpu-smoke", "--families", "flux", "--repeats", "1", "--batch-sizes", "1,2", "--out", str(out)]
    assert module.main(args) == 1
    flux = json.loads(out.read_text())["families"]["flux"]
    assert flux["status"].startswith("failed: RuntimeError: CUDA error")
    assert [row["images_per_call"] for row in flux["by_batch_size"]] == [1]


def test_each_family_is_released_before_the_next(tmp_path):
    """In one process (gpu_run.sh uses one per family), compiled graphs and cached GPU memory
    are dropped after every family, failed or not."""
    module = load_bench()
    events = []

    def run_family(family, args, work, save):
        events.append(family)
        save(family, {"status": "running"})
        if family == "flux":
            raise RuntimeError("out of luck")

    module.run_family = run_family
    module.release = lambda on_cuda: events.append("release")
    args = ["--cpu-smoke", "--families", "flux,qwen-image", "--out", str(tmp_path / "released.json")]
    assert module.main(args) == 1
    assert events == ["flux", "release", "qwen-image", "release"]


def test_gpu_run_runs_each_family_in_its_own_process_and_copies_to_out(tmp_path):
    """bench/gpu_run.sh's orchestration on the CPU: one process per family under its own
    timeout, results and log in $OUT; Qwen-Image's plan is the eager s/step probe."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "GPU_RUN_RESULTS": str(tmp_path / "results"), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--cpu-smoke", "--families", "qwen-image", "--budget", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    qwen = json.loads((out / "gpu_pipeline_smoke.json").read_text())["families"]["qwen-image"]
    assert qwen["status"] == "complete"
    probe = qwen["step_probe"]
    assert probe["steps"] == [2, 3] and probe["s_per_step"] == pytest.approx(
        (probe["seconds"][1] - probe["seconds"][0]), abs=1e-3
    )
    # True CFG with the blank negative prompt: two denoiser calls per step, of different lengths.
    assert len(qwen["text_lengths"]["denoiser"]) == 2
    log = (out / "gpu_run.log").read_text()
    assert "qwen-image: estimated" in log and "qwen-image: done" in log


def test_full_size_flops_are_counted_from_the_published_configs(tmp_path):
    out = tmp_path / "flops.json"
    run_bench("--count-flops", "--families", "flux", "--out", str(out))
    flux = json.loads(out.read_text())["flops"]["flux"]
    # FLUX.1-schnell: a 11.9B-parameter transformer and the 4.76B T5-XXL encoder.
    assert round(flux["params_billion"]["transformer"], 1) == 11.9
    assert round(flux["params_billion"]["text_encoder_2"], 2) == 4.76
    assert (flux["width"], flux["height"], flux["steps"]) == (1024, 1024, 4)
    assert 250 < flux["tflop_per_image"] < 350
    assert flux["tflop_by_part_per_image"]["denoiser"] > 0.9 * flux["tflop_per_image"]


def test_flops_are_counted_for_the_text_lengths_a_call_used():
    from full_size import count_flops

    assumed = count_flops("qwen-image", 512, 512, 10, 4.0)
    # The prompt as the bench's tokenizer made it (82 tokens) and the blank negative (13).
    used = count_flops("qwen-image", 512, 512, 10, 4.0, text_lengths={"text_encoder": [213, 144], "denoiser": [82, 13]})
    assert used["text_lengths"]["denoiser"] == [82, 13]
    assert used["tflop_by_part_per_image"]["text_encoder"] > assumed["tflop_by_part_per_image"]["text_encoder"]
    assert used["tflop_by_part_per_image"]["denoiser"] != assumed["tflop_by_part_per_image"]["denoiser"]
    assert used["tflop_by_part_per_image"]["vae_decode"] == assumed["tflop_by_part_per_image"]["vae_decode"]


def test_fp16_safe_vae_holds_the_pipelines_own_weights(tmp_path):
    import torch
    from diffusers import AutoencoderKL
    from full_size import build_fp16_fix_vae

    torch.manual_seed(1)
    own = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8,
        layers_per_block=1,
        force_upcast=True,
    )
    fixed = AutoencoderKL.from_pretrained(str(build_fp16_fix_vae(tmp_path / "vae", own)))
    assert fixed.config.force_upcast is False
    theirs = fixed.state_dict()
    assert all(torch.equal(weight, theirs[name]) for name, weight in own.state_dict().items())


# --- the budget --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flops():
    return gpu_plan.load_flops()


def test_a_budget_buys_the_families_in_order_of_value(flops):
    chosen = gpu_plan.pick(540, list(gpu_plan.FAMILIES), flops)
    # SDXL in full (1 and 8 per call), then as much FLUX.1-schnell as still fits.
    assert [job.family for job, _ in chosen][:2] == ["sdxl", "flux"]
    assert chosen[0][0].batch_sizes == (1, 8)
    total = gpu_plan.SETUP_S + sum(seconds for _, seconds in chosen) + gpu_plan.RESERVE_S
    assert total <= 540
    # Too little for anything compiled: the cheap Qwen-Image probe still runs.
    assert [job.family for job, _ in gpu_plan.pick(180, list(gpu_plan.FAMILIES), flops)] == ["qwen-image"]
    assert gpu_plan.pick(30, list(gpu_plan.FAMILIES), flops) == []


def test_the_plan_cli_gives_gpu_run_the_arguments_that_fit(flops):
    fits = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_plan.py"), "fit", "flux", "250"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert float(fits[0]) <= 250
    assert fits[1:] == ["--families", "flux", "--repeats", "2", "--batch-sizes", "1"]
    none = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_plan.py"), "fit", "flux", "60"], check=False)
    assert none.returncode == 1
    ladder = gpu_plan.estimate(gpu_plan.JOBS["sdxl"][0], flops, ladder=True)["total"]
    assert ladder > gpu_plan.estimate(gpu_plan.JOBS["sdxl"][0], flops)["total"] + 2 * gpu_plan.COMPILE_S["sdxl"] - 1
