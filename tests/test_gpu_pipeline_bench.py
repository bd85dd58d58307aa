"""bench/gpu_pipeline.py cannot rot: its --cpu-smoke mode runs the whole measurement on the
tiny models on CPU (the same loader, optimisations, warm-up and runner as on a GPU), and
--count-flops builds a full-size family from configs/ on the meta device."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT


def run_bench(*args: str) -> None:
    """The script's main(), in this process (torch and diffusers are imported already)."""
    spec = importlib.util.spec_from_file_location("gpu_pipeline", ROOT / "bench" / "gpu_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(args)) == 0


def test_cpu_smoke_measures_every_switch_and_batch_size(tmp_path):
    out = tmp_path / "smoke.json"
    run_bench("--cpu-smoke", "--families", "flux", "--repeats", "1", "--batch-sizes", "1,2", "--out", str(out))
    document = json.loads(out.read_text())
    assert "NOT a GPU" in document["device"]
    flux = document["families"]["flux"]
    assert flux["model"] == "tiny-flux"
    assert flux["flops_per_image_measured"] > 1e6
    variants = [rung["variant"] for rung in flux["ladder"]]
    assert variants == ["all off (math attention)", "+ sdpa", "+ channels_last", "+ torch.compile"]
    for rung in flux["ladder"]:
        assert rung["batch1_latency_s"] > 0
        assert rung["max_pixel_difference_from_all_off"] <= 2
    assert flux["ladder"][-1]["optimisations"]["compile"]["batch_sizes"] == [1]
    assert [row["images_per_call"] for row in flux["by_batch_size"]] == [1, 2]
    assert all(row["images_per_s"] > 0 for row in flux["by_batch_size"])


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
