"""Image-to-image throughput: does dynamic batching pay for image input too? (issue 11, item 7)

Tiny SDXL (builtin:tiny-sdxl) served as `serve run serve_config.yaml` serves it (Serve's
HTTP proxy, one ingress replica, one fixed model replica), 16 closed-loop clients, each
sending its next request the moment the previous one returns: n=1, its own prompt and seed,
and its own 64x64 PNG input as a data URI with strength 0.5 at 8 steps (4 denoising steps).

  (b) batched      the shipped batching (max_batch_images 8, wait 0 s)
  (c) max batch 1  the same graph with max_batch_images 1

Also reported: the replica's resident memory after loading the text-to-image pipeline alone
and after adding its image-to-image and inpainting siblings (``from_pipe``: same modules).

    python bench/image_to_image.py          # full run: JSON + docs/benchmarks.md
    python bench/image_to_image.py --quick  # smoke run (prints, writes nothing)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODEL_CACHE,
    RESULTS,
    bench_config,
    create_key,
    free_port,
    machine_info,
    ray_instance,
    serve_graph,
    served_load,
    temp_dir,
    update_doc_section,
    wait_for_quiet,
    write_json,
)

NAME = "image_to_image"
MODEL = "tiny-sdxl"
SIZE = 64
STEPS = 8
STRENGTH = 0.5
VARIANTS = [("(b)", 8, 0.0), ("(c)", 1, 0.0)]


def input_images(count: int) -> list[str]:
    """Distinct structured 64x64 PNG inputs as data URIs (a gradient, a square, shifted)."""
    import numpy as np
    from PIL import Image

    uris = []
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(count):
        pixels = np.stack([(x * 4 + i * 13) % 256, (y * 4 + i * 29) % 256, np.full_like(x, (i * 37) % 256)], -1)
        pixels[16 + i % 16 : 40 + i % 16, 8:32] = (20 + i * 7 % 200, 40, 60)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def replica_memory() -> dict[str, Any]:
    """Resident memory as a replica loads: the text-to-image pipeline, then its image modes
    made with ``from_pipe`` (as ``load_pipelines`` does), then, for comparison, the
    image-to-image pipeline loaded a second time with ``from_pretrained``."""
    import gc

    import torch

    from builtin_models import ensure_builtin_model
    from serve_app.families import get_family
    from serve_app.work import Mode

    def rss_mib() -> float:
        gc.collect()
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
        return round(int(line.split()[1]) / 1024, 1)

    torch.set_num_threads(1)
    family, folder = get_family("sdxl"), ensure_builtin_model(MODEL, MODEL_CACHE)
    text = family.pipeline_class(Mode.TEXT_TO_IMAGE).from_pretrained(folder)
    text_only = rss_mib()
    siblings = {mode: family.pipeline_class(mode).from_pipe(text) for mode in (Mode.IMAGE_TO_IMAGE, Mode.INPAINT)}
    with_modes = rss_mib()
    shared = all(pipe.components[name] is module for pipe in siblings.values()
                 for name, module in text.components.items() if name != "scheduler" and module is not None)
    again = family.pipeline_class(Mode.IMAGE_TO_IMAGE).from_pretrained(folder)
    with_copy = rss_mib()
    weights = sum(p.numel() * p.element_size() for module in text.components.values()
                  if isinstance(module, torch.nn.Module) for p in module.parameters())
    del again
    return {"text_to_image_only_mib": text_only, "with_image_modes_mib": with_modes,
            "with_a_second_from_pretrained_mib": with_copy, "image_modes_share_modules": shared,
            "weights_mib": round(weights / 2**20, 1)}


async def measure(port: int, key: str, clients: int, warmup: int, measure_n: int) -> dict[str, Any]:
    images = input_images(clients)

    def payload(client: int, seq: int) -> dict[str, Any]:
        return {
            "model": MODEL,
            "prompt": f"client {client} request {seq}",
            "image": images[client],
            "strength": STRENGTH,
            "num_inference_steps": STEPS,
            "seed": 1000 + seq,
        }

    return await served_load(port, key, clients, warmup, measure_n, payload)


def served_runs(clients: int, warmup: int, measure_n: int) -> dict[str, Any]:
    from ray import serve

    out: dict[str, Any] = {}
    with temp_dir("imagegen-bench-") as tmp, ray_instance(num_cpus=2):
        data = Path(tmp)
        port = free_port()
        key = None
        for index, (label, batch, wait) in enumerate(VARIANTS):
            config = bench_config(data, max_batch_images=batch, batch_wait_timeout_s=wait)
            serve_graph(config, port, first=index == 0)
            if key is None:
                key = create_key(config.accounts.database_url, "bench", "100000000")
            quiet = wait_for_quiet()
            result = asyncio.run(measure(port, key, clients, warmup, measure_n))
            result["quiet_before"] = quiet
            result["config"] = {"max_batch_images": batch, "batch_wait_timeout_s": wait}
            out[label] = result
            lat = result["latency"]
            print(f"  {label} max_batch_images {batch}: {result['images_per_s']:6.1f} images/s  "
                  f"p50 {lat['p50_ms']:7.1f} ms  p95 {lat['p95_ms']:7.1f} ms  statuses {result['statuses']}", flush=True)
        serve.delete("imagegen")
    return out


def markdown(doc: dict[str, Any]) -> str:
    m, c, mem = doc["machine"], doc["config"], doc["memory"]
    lines = [
        "## Image-to-image throughput (issue 11)",
        "",
        f"`python bench/image_to_image.py` — tiny SDXL, {SIZE}x{SIZE} PNG input as a data URI, strength {STRENGTH}, "
        f"{STEPS} steps ({int(STEPS * STRENGTH)} denoising steps), {c['clients']} closed-loop clients, each with its "
        f"own input image, prompt and seed; {c['measure']} measured requests after {c['warmup']} warm-up per row. "
        f"Serve defaults (HTTP proxy), one ingress replica, one model replica (one torch thread). Machine: "
        f"{m['nproc']} cores ({m['cpu_model']}), ray {m['versions']['ray']}, torch {m['versions']['torch']}, "
        f"diffusers {m['versions']['diffusers']}.",
        "",
        "| configuration | images/s | p50 ms | p95 ms |",
        "|---|---:|---:|---:|",
    ]
    for label, res in doc["served"].items():
        lines.append(f"| {label} max_batch_images {res['config']['max_batch_images']} | {res['images_per_s']:.1f} | "
                     f"{res['latency']['p50_ms']:.0f} | {res['latency']['p95_ms']:.0f} |")
    lines += [
        "",
        f"- Batched over max batch 1: **{doc['ratio_b_over_c']:.2f}x** the images/s.",
        f"- Replica memory (resident, one process): text-to-image pipeline alone {mem['text_to_image_only_mib']:.0f} "
        f"MiB; with its image-to-image and inpainting pipelines made by `from_pipe` {mem['with_image_modes_mib']:.0f} "
        f"MiB (they share every module: {'yes' if mem['image_modes_share_modules'] else 'NO'}); an image-to-image "
        f"pipeline loaded separately with `from_pretrained` brings it to {mem['with_a_second_from_pretrained_mib']:.0f} "
        f"MiB. The tiny model's weights are {mem['weights_mib']:.1f} MiB, so the difference is small here; a second "
        f"copy of real SDXL in fp16 would be its whole UNet, VAE and text encoders, about 7 GB of GPU memory.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run; writes nothing")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    warmup, measure_n = (16, 48) if args.quick else (64, 400)
    doc: dict[str, Any] = {"machine": machine_info(),
                           "config": {"clients": args.clients, "warmup": warmup, "measure": measure_n,
                                      "steps": STEPS, "strength": STRENGTH, "size": SIZE}}
    print("replica memory ...", flush=True)
    doc["memory"] = replica_memory()
    print(f"  {doc['memory']}", flush=True)
    started = time.perf_counter()
    doc["served"] = served_runs(args.clients, warmup, measure_n)
    doc["ratio_b_over_c"] = round(doc["served"]["(b)"]["images_per_s"] / doc["served"]["(c)"]["images_per_s"], 2)
    doc["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(markdown(doc))
    if not args.quick:
        write_json(RESULTS / f"{NAME}.json", doc)
        update_doc_section(NAME, markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
