"""Serving throughput: does the served graph keep up with the bare pipeline? (issue 2, item 8)

Tiny SDXL (builtin:tiny-sdxl), 64x64, 4 steps, 16 closed-loop clients, each sending its
next request (n=1, its own prompt and seed) the moment the previous one returns:

  (a) direct  the pipeline called in this process (load_pipeline + run_pipeline +
              encode_image to PNG), one torch thread like the replica (num_cpus 1), at
              batch sizes 1, 2, 4, 8, 16; the 16 clients are simulated with zero overhead
              (a FIFO of requests, served B at a time). The best batch size is the baseline.
  (b) served  serve.run(build_app(config)) of the embedded default restricted to
              tiny-sdxl, one fixed replica, over HTTP with a real API key; batching on.
  (c) served  the same graph with max_batch_images 1.

Targets on a 2-core machine: (b)/(a) >= 0.85 and (b)/(c) >= 1.7. All figures of one run
come from one process on one machine, so the ratios are what matters; a second run of
(a) after the served runs checks that the machine stayed quiet.

    python bench/serving_throughput.py            # full run: JSON + docs/benchmarks.md
    python bench/serving_throughput.py --quick    # smoke run (prints, writes nothing)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODEL_CACHE,
    RESULTS,
    CpuMeter,
    HttpConnection,
    RequestRecord,
    bench_config,
    closed_loop,
    create_key,
    free_port,
    machine_info,
    post_json_bytes,
    ray_instance,
    serve_graph,
    steady_state,
    temp_dir,
    update_doc_section,
    wait_for_quiet,
    write_json,
)

NAME = "serving_throughput"
MODEL = "tiny-sdxl"
SIZE = 64
STEPS = 4
DIRECT_BATCH_SIZES = (1, 2, 4, 8, 16)


def parse_variant(text: str) -> tuple[int, float, int]:
    """``16:0.2`` -> (max_batch_images 16, batch_wait_timeout_s 0.2, 1 ingress replica);
    ``16:0.2:2`` -> the same with 2 ingress replicas."""
    parts = text.split(":")
    batch = int(parts[0])
    wait = float(parts[1]) if len(parts) > 1 and parts[1] else 0.05
    ingress = int(parts[2]) if len(parts) > 2 and parts[2] else 1
    return batch, wait, ingress


# -- (a) the pipeline in process -------------------------------------------------------------
def measure_direct(batch_sizes, clients: int, warmup: int, measure: int) -> dict[str, Any]:
    import torch

    from deployments.encoding import encode_image
    from deployments.pipeline_loader import load_pipeline
    from deployments.pipeline_runner import run_pipeline
    from serve_app.config import load_app_config
    from serve_app.work import CallShape

    # The replica's CPU budget: num_cpus 1 -> OMP_NUM_THREADS=1 -> one torch thread.
    torch.set_num_threads(1)
    model = next(m for m in load_app_config(Path(__file__).resolve().parents[1] / "serve_config.yaml").models
                 if m.id == MODEL)
    pipe = load_pipeline(family=model.family.value, weights=model.weights, device="cpu", dtype=model.dtype,
                         cache_dir=MODEL_CACHE)
    shape = CallShape(width=SIZE, height=SIZE, steps=STEPS, guidance=model.defaults.guidance,
                      with_negative_prompt=False)

    def call(prompts: list[str], seeds: list[int]) -> list[bytes]:
        images = run_pipeline(pipe, model.family.value, shape, prompts, None, seeds, "cpu")
        return [encode_image(image, "png", model.defaults.output_quality) for image in images]

    results = {}
    for batch in batch_sizes:
        call([f"warm-up {i}" for i in range(batch)], list(range(batch)))
        call([f"warm-up {i}" for i in range(batch)], list(range(batch)))
        # Closed loop with instant clients: client c resubmits when its image is done.
        queue: deque[tuple[int, float, int]] = deque()
        now = time.perf_counter()
        seq = 0
        for c in range(clients):
            queue.append((c, now, seq))
            seq += 1
        done: list[RequestRecord] = []
        quiet = wait_for_quiet()
        meter = CpuMeter()
        while len(done) < warmup + measure:
            take = [queue.popleft() for _ in range(min(batch, len(queue)))]
            call([f"client {c} request {s}" for c, _, s in take], [1000 + s for _, _, s in take])
            end = time.perf_counter()
            for c, start, _ in take:
                done.append(RequestRecord(start, end, 200, 1))
                queue.append((c, end, seq))
                seq += 1
        result = steady_state(done[: warmup + measure], clients, warmup).summary()
        result["cpu"] = meter.stop()
        result["quiet_before"] = quiet
        results[str(batch)] = result
        print(f"  direct batch {batch:2d}: {result['images_per_s']:6.1f} images/s  "
              f"p50 {result['latency']['p50_ms']:7.1f} ms  p95 {result['latency']['p95_ms']:7.1f} ms  "
              f"cpu {result['cpu']}", flush=True)
    best = max(results, key=lambda b: results[b]["images_per_s"])
    return {"by_batch_size": results, "best_batch_size": int(best), "best": results[best]}


# -- (b), (c) the served graph ----------------------------------------------------------------
async def measure_served(port: int, key: str, clients: int, warmup: int, measure: int) -> dict[str, Any]:
    host = "127.0.0.1"
    connections = [HttpConnection(host, port) for _ in range(clients)]
    bad = []

    async def one(client: int, seq: int) -> tuple[int, int]:
        payload = {
            "model": MODEL,
            "prompt": f"client {client} request {seq}",
            "n": 1,
            "size": f"{SIZE}x{SIZE}",
            "num_inference_steps": STEPS,
            "seed": 1000 + seq,
        }
        response = await connections[client].request(post_json_bytes(host, port, "/v1/images/generations", payload, key))
        images = 0
        if response.status == 200:
            images = len(json.loads(response.body)["data"])
        elif len(bad) < 3:
            bad.append(response.body[:300])
        return response.status, images

    meter = CpuMeter()
    client_cpu = time.process_time()
    result = await closed_loop(clients, warmup, measure, one)
    client_cpu = time.process_time() - client_cpu
    cpu = meter.stop()
    cpu["client_cpu_ms_per_request"] = round(client_cpu / max(result.requests, 1) * 1000, 3)
    for connection in connections:
        await connection.close()
    summary = result.summary()
    summary["cpu"] = cpu
    if bad:
        summary["errors"] = [b.decode("utf-8", "replace") for b in bad]
    return summary


def served_runs(variants: list[tuple[str, int, float, int]], clients: int, warmup: int, measure: int,
                max_ongoing: int) -> dict[str, Any]:
    from ray import serve

    out: dict[str, Any] = {}
    with temp_dir("imagegen-bench-") as tmp, ray_instance(num_cpus=2):
        data = Path(tmp)
        port = free_port()
        key = None
        for index, (label, batch, wait, ingress) in enumerate(variants):
            config = bench_config(data, max_batch_images=batch, batch_wait_timeout_s=wait,
                                  max_ongoing_requests=max_ongoing, ingress_replicas=ingress)
            started = time.perf_counter()
            serve_graph(config, port, first=index == 0)
            deploy_s = time.perf_counter() - started
            if key is None:
                key = create_key(config.accounts.database_url, "bench", "100000000")
            quiet = wait_for_quiet()
            result = asyncio.run(measure_served(port, key, clients, warmup, measure))
            result["quiet_before"] = quiet
            result["config"] = {"max_batch_images": batch, "batch_wait_timeout_s": wait, "ingress_replicas": ingress,
                                "max_ongoing_requests": max_ongoing, "num_replicas": 1,
                                "replica_num_cpus": config.models[0].deployment.ray_actor_options.get("num_cpus")}
            result["deploy_s"] = round(deploy_s, 1)
            out[label] = result
            lat = result["latency"]
            print(f"  served {label} (batch {batch}, wait {wait}s, ingress x{ingress}): "
                  f"{result['images_per_s']:6.1f} images/s  p50 {lat['p50_ms']:7.1f} ms  p95 {lat['p95_ms']:7.1f} ms  "
                  f"statuses {result['statuses']}  cpu {result['cpu']}", flush=True)
        serve.delete("imagegen")
    return out


# -- report -----------------------------------------------------------------------------------
def markdown(doc: dict[str, Any]) -> str:
    direct = doc["direct"]
    served = doc["served"]
    r = doc["ratios"]
    m = doc["machine"]
    lines = [
        "## Serving throughput (issue 2)",
        "",
        f"`python bench/serving_throughput.py` — tiny SDXL, {SIZE}x{SIZE}, {STEPS} steps, "
        f"{doc['config']['clients']} closed-loop clients, n=1 per request (prompt and seed vary), "
        f"{doc['config']['measure']} measured requests after {doc['config']['warmup']} warm-up, "
        f"PNG output. Machine: {m['nproc']} cores ({m['cpu_model']}), ray {m['versions']['ray']}, "
        f"torch {m['versions']['torch']}, diffusers {m['versions']['diffusers']}.",
        "",
        "| configuration | images/s | p50 ms | p95 ms |",
        "|---|---:|---:|---:|",
    ]
    for batch, res in direct["by_batch_size"].items():
        best = " (best)" if int(batch) == direct["best_batch_size"] else ""
        lines.append(f"| (a) pipeline in process, batch {batch}{best} | {res['images_per_s']:.1f} | "
                     f"{res['latency']['p50_ms']:.0f} | {res['latency']['p95_ms']:.0f} |")
    if "direct_after" in doc:
        res = doc["direct_after"]["best"]
        lines.append(f"| (a) again after the served runs, batch {doc['direct_after']['best_batch_size']} | "
                     f"{res['images_per_s']:.1f} | {res['latency']['p50_ms']:.0f} | {res['latency']['p95_ms']:.0f} |")
    for label, res in served.items():
        c = res["config"]
        lines.append(f"| {label}: served, max_batch_images {c['max_batch_images']}, wait "
                     f"{c['batch_wait_timeout_s']} s | {res['images_per_s']:.1f} | {res['latency']['p50_ms']:.0f} | "
                     f"{res['latency']['p95_ms']:.0f} |")
    lines += [
        "",
        f"- (b)/(a) = **{r['b_over_a']:.2f}** (target >= 0.85: {'met' if r['b_over_a'] >= 0.85 else 'MISSED'}); "
        f"(b)/(c) = **{r['b_over_c']:.2f}** (target >= 1.7: {'met' if r['b_over_c'] >= 1.7 else 'MISSED'}).",
    ]
    if "b_default_over_a" in r:
        lines.append(f"- With the shipped batching (max_batch_images 8, wait 0.05 s): (b8)/(a) = "
                     f"{r['b_default_over_a']:.2f}, (b8)/(c) = {r['b_default_over_c']:.2f}.")
    lines += [f"- {note}" for note in doc.get("notes", [])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; writes no results")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320, help="measured requests per configuration")
    parser.add_argument("--warmup", type=int, default=64, help="completions discarded before measuring")
    parser.add_argument("--batched", type=parse_variant, default=parse_variant("16:0.25"),
                        help="(b) as MAX_BATCH_IMAGES:WAIT_S[:INGRESS_REPLICAS] (default 16:0.25)")
    parser.add_argument("--extra", type=parse_variant, action="append", default=[],
                        help="more served variants to measure, same syntax (repeatable)")
    parser.add_argument("--skip-direct", action="store_true", help="exploration: no (a) runs")
    parser.add_argument("--no-default-variant", action="store_true",
                        help="skip the extra served run with the shipped batching (8:0.05)")
    parser.add_argument("--max-ongoing", type=int, default=16, help="model deployment max_ongoing_requests")
    parser.add_argument("--output", type=Path, default=RESULTS / f"{NAME}.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup = 48, 16

    started = time.time()
    if not args.skip_direct:
        print(f"(a) pipeline in process, {args.clients} simulated clients", flush=True)
        direct = measure_direct(DIRECT_BATCH_SIZES, args.clients, args.warmup, args.requests)

    variants = [("(b)", *args.batched)]
    if not args.no_default_variant and args.batched != (8, 0.05, 1):
        variants.append(("(b8)", 8, 0.05, 1))
    for i, extra in enumerate(args.extra):
        variants.append((f"(x{i + 1})", *extra))
    variants.append(("(c)", 1, 0.05, 1))
    print(f"served graph, {args.clients} HTTP clients", flush=True)
    served = served_runs(variants, args.clients, args.warmup, args.requests, args.max_ongoing)
    if args.skip_direct:
        return 0

    print("(a) again, to check the machine stayed quiet", flush=True)
    best = direct["best_batch_size"]
    direct_after = measure_direct((best,), args.clients, args.warmup, args.requests)

    a = direct["best"]["images_per_s"]
    ratios = {
        "b_over_a": round(served["(b)"]["images_per_s"] / a, 3),
        "b_over_c": round(served["(b)"]["images_per_s"] / served["(c)"]["images_per_s"], 3),
        "a_after_over_a": round(direct_after["best"]["images_per_s"] / a, 3),
    }
    if "(b8)" in served:
        ratios["b_default_over_a"] = round(served["(b8)"]["images_per_s"] / a, 3)
        ratios["b_default_over_c"] = round(served["(b8)"]["images_per_s"] / served["(c)"]["images_per_s"], 3)
    doc = {
        "benchmark": NAME,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "machine": machine_info(),
        "config": {
            "model": MODEL, "size": f"{SIZE}x{SIZE}", "steps": STEPS, "n": 1, "output_format": "png",
            "clients": args.clients, "warmup": args.warmup, "measure": args.requests,
            "direct_torch_threads": 1, "ray_num_cpus": 2,
        },
        "targets": {"b_over_a": 0.85, "b_over_c": 1.7},
        "direct": direct,
        "direct_after": direct_after,
        "served": served,
        "ratios": ratios,
        "notes": [],
    }
    if abs(ratios["a_after_over_a"] - 1) > 0.05:
        doc["notes"].append(f"(a) moved by {100 * (ratios['a_after_over_a'] - 1):+.0f}% between the start and the "
                            "end of the run: the machine was busy with something else; rerun.")
    print(json.dumps(ratios))
    print(markdown(doc))
    if not args.quick:
        write_json(args.output, doc)
        update_doc_section(NAME, markdown(doc))
        print(f"wrote {args.output} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
