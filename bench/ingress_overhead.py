"""Ingress overhead: what auth, billing and rate limiting cost per request. (issue 3, item 7)

Against the served graph (the embedded default restricted to tiny-sdxl, one fixed model
replica, one ingress replica, its own SQLite database), over HTTP:

  Rejections  401 (a well-formed key that is not in the database: one key lookup),
              402 (a key with 0 credits: auth, validation, rate limit, a refused
              reservation), 429 (a key with rpm 1: auth, validation, a refused rate-limit
              check). Each is measured three ways:
                - closed loop: 32 clients, each sending its next request the moment the
                  previous one returns (the saturation throughput; latency there is mostly
                  queueing, p50 ~ 32 / throughput by Little's law);
                - paced: the same 32 clients offering half that throughput, spread evenly
                  (latency of a rejection on a loaded but not saturated server);
                - sequential: one client (the floor).
  Accepted    a 32x32, 1-step, n=1 image. The overhead beyond the pipeline is measured two
              ways, one request at a time: served latency minus the in-process pipeline
              time of the same call (run_pipeline + encode_image, one torch thread, in this
              process), and served latency minus the latency of the same job sent straight
              to the model deployment's handle from this driver (which isolates proxy +
              ingress: HTTP, auth, rate limit, reservation, settlement, JSON). Both with a
              0.05 s batch wait (a lone request waits that long for company) and with the
              shipped batch_wait_timeout_s 0. Then at 32 concurrent clients: HTTP vs handle
              throughput, and the CPU each Serve process spends per request.

Target on a 2-core machine: p99 of a rejection under 20 ms for one client at a time; the
rejections/s at 32 clients are reported.

    python bench/ingress_overhead.py            # full run: JSON + docs/benchmarks.md
    python bench/ingress_overhead.py --quick    # smoke run (prints, writes nothing)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODEL_CACHE,
    RESULTS,
    SERVE_PROFILES,
    CpuMeter,
    HttpConnection,
    Meters,
    RequestRecord,
    bench_config,
    closed_loop,
    create_key,
    free_port,
    http_front,
    http_port_of_app,
    latency_summary,
    machine_info,
    post_json_bytes,
    profile_env,
    profile_ingress_replicas,
    profile_label,
    ray_instance,
    run_profile_worker,
    serve_graph,
    temp_dir,
    update_doc_section,
    wait_for_quiet,
    write_json,
)

NAME = "ingress_overhead"
MODEL = "tiny-sdxl"
HOST = "127.0.0.1"
PATH = "/v1/images/generations"
TARGET_P99_MS = 20.0


def payload(seq: int, *, size: int = 32, steps: int = 1) -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"a small red apple {seq}", "n": 1, "size": f"{size}x{size}",
            "num_inference_steps": steps, "seed": 5000 + seq}


# -- load shapes ------------------------------------------------------------------------------
class Client:
    """One HTTP client per simulated user, sending generation requests with one key."""

    def __init__(self, port: int, clients: int, key: str | None) -> None:
        self.port = port
        self.key = key
        self.connections = [HttpConnection(HOST, port) for _ in range(clients)]
        self.unexpected: list[str] = []

    async def one(self, client: int, seq: int) -> tuple[int, int]:
        raw = post_json_bytes(HOST, self.port, PATH, payload(seq), self.key)
        response = await self.connections[client].request(raw)
        images = len(json.loads(response.body)["data"]) if response.status == 200 else 0
        return response.status, images

    async def close(self) -> None:
        for connection in self.connections:
            await connection.close()


async def paced_loop(clients: int, rate: float, count: int, one) -> list[RequestRecord]:
    """``clients`` clients together offering ``rate`` requests/s, evenly staggered; a
    client whose response comes late sends its next request at once (no burst catch-up)."""
    interval = clients / rate
    per_client = max(1, count // clients)
    records: list[RequestRecord] = []
    start_at = time.perf_counter() + 0.05

    async def client(index: int) -> None:
        next_at = start_at + index * interval / clients
        for k in range(per_client):
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            start = time.perf_counter()
            status, images = await one(index, index * per_client + k)
            records.append(RequestRecord(start, time.perf_counter(), status, images))
            next_at = max(next_at + interval, time.perf_counter())

    await asyncio.gather(*(client(i) for i in range(clients)))
    return records


def summarize(records: list[RequestRecord], expected: int | None = None) -> dict[str, Any]:
    """Throughput of all answers; latency of those with the ``expected`` status (all if None)."""
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    window_s = max(r.end for r in records) - min(r.start for r in records)
    return {
        "requests": len(records),
        "window_s": round(window_s, 3),
        "requests_per_s": round(len(records) / window_s, 1),
        "latency": latency_summary([r.end - r.start for r in records if expected is None or r.status == expected]),
        "statuses": statuses,
    }


async def rejection_scenario(port: int, key: str | None, expected: int, clients: int, warmup: int,
                             measure: int, sequential: int) -> dict[str, Any]:
    out: dict[str, Any] = {"expected_status": expected}
    client = Client(port, clients, key)

    out["quiet_before"] = wait_for_quiet()
    meters = Meters()
    closed = await closed_loop(clients, warmup, measure, client.one, meters.start, meters.snapshot)
    out["cpu"] = meters.report(closed.requests)
    # Throughput counts every answer; latency only the expected rejections (a 429 key's
    # first request, say, is admitted and generates).
    out["closed_loop"] = {**closed.summary(), "latency": latency_summary(
        [r.end - r.start for r in closed.sent_in_window if r.status == expected])}
    saturation = closed.requests / closed.window_s

    rate = saturation / 2
    meter = CpuMeter()
    records = await paced_loop(clients, rate, min(measure, int(rate * 8) + clients), client.one)
    out["paced_half_saturation"] = {"offered_per_s": round(rate, 1), **summarize(records, expected=expected),
                                    "foreign_cores": meter.stop()["foreign_cores"]}

    one_client = Client(port, 1, key)
    records = []
    meter = CpuMeter()
    for seq in range(sequential):
        start = time.perf_counter()
        status, images = await one_client.one(0, seq)
        records.append(RequestRecord(start, time.perf_counter(), status, images))
    out["sequential"] = {**summarize(records[5:], expected=expected), "foreign_cores": meter.stop()["foreign_cores"]}
    await client.close()
    await one_client.close()
    return out


# -- accepted requests ------------------------------------------------------------------------
def pipeline_time(samples: int) -> dict[str, Any]:
    """The in-process cost of the accepted request's work: one 32x32, 1-step image + PNG."""
    import torch

    from deployments.encoding import encode_image
    from deployments.pipeline_loader import load_pipelines
    from deployments.pipeline_runner import run_pipeline
    from serve_app.config import load_app_config
    from serve_app.planning import plan_generation
    from serve_app.protocol import parse_generation_request

    torch.set_num_threads(1)
    model = next(m for m in load_app_config(Path(__file__).resolve().parents[1] / "serve_config.yaml").models
                 if m.id == MODEL)
    pipe = load_pipelines(family=model.family, weights=model.weights, device="cpu", dtype=model.dtype,
                         cache_dir=MODEL_CACHE)
    times = []
    for seq in range(samples + 3):
        job = plan_generation(parse_generation_request(payload(seq)), model).jobs("bench", 8)[0]
        start = time.perf_counter()
        images = run_pipeline(pipe, job.shape, [job.prompt], None, list(job.seeds), "cpu")
        encode_image(images[0], job.output_format, job.output_quality)
        if seq >= 3:
            times.append(time.perf_counter() - start)
    del pipe
    return latency_summary(times)


async def sequential_http(port: int, key: str, count: int) -> dict[str, Any]:
    client = Client(port, 1, key)
    times = []
    for seq in range(count + 3):
        start = time.perf_counter()
        status, _ = await client.one(0, 10_000 + seq)
        if status != 200:
            raise RuntimeError(f"accepted request got HTTP {status}")
        if seq >= 3:
            times.append(time.perf_counter() - start)
    await client.close()
    return latency_summary(times)


def model_handle_and_jobs(config):
    from ray import serve

    from serve_app.planning import plan_generation
    from serve_app.protocol import parse_generation_request

    model = config.models[0]
    handle = serve.get_deployment_handle(model.deployment_name, app_name="imagegen")

    def job(seq: int):
        plan = plan_generation(parse_generation_request(payload(seq)), model)
        return plan.jobs(f"bench-{seq}", model.batching.max_batch_images)[0]

    return handle, job


async def generate_via_handle(handle, job) -> int:
    """One job through the model deployment's one generation method, as the ingress's router
    calls it (a streaming handle; the replica yields chunks of items): its final images."""
    from serve_app.work import StreamedImage

    images = 0
    async for chunk in handle.options(stream=True).generate_stream.remote(job):
        images += sum(1 for item in chunk if isinstance(item, StreamedImage))
    return images


async def sequential_handle(handle, job, count: int) -> dict[str, Any]:
    times = []
    for seq in range(count + 3):
        start = time.perf_counter()
        assert await generate_via_handle(handle, job(20_000 + seq)) == 1
        if seq >= 3:
            times.append(time.perf_counter() - start)
    return latency_summary(times)


async def concurrent_handle(handle, job, clients: int, warmup: int, measure: int, meters):
    async def one(client: int, seq: int) -> tuple[int, int]:
        return 200, await generate_via_handle(handle, job(30_000 + seq))

    return await closed_loop(clients, warmup, measure, one, meters.start, meters.snapshot)


async def accepted_overhead(config, port: int, key: str, sequential: int, clients: int, warmup: int,
                            measure: int, pipeline: dict[str, Any]) -> dict[str, Any]:
    handle, job = model_handle_and_jobs(config)
    wait_for_quiet()
    served = await sequential_http(port, key, sequential)
    direct = await sequential_handle(handle, job, sequential)
    out: dict[str, Any] = {
        "batch_wait_timeout_s": config.models[0].batching.batch_wait_timeout_s,
        "sequential": {
            "pipeline_in_process": pipeline,
            "served_http": served,
            "model_handle_from_driver": direct,
            "overhead_p50_ms": {
                "served_minus_pipeline": round(served["p50_ms"] - pipeline["p50_ms"], 2),
                "served_minus_handle (proxy + ingress)": round(served["p50_ms"] - direct["p50_ms"], 2),
                "handle_minus_pipeline (replica: batching wait, encode, Serve)":
                    round(direct["p50_ms"] - pipeline["p50_ms"], 2),
            },
        },
    }
    if clients:
        wait_for_quiet()
        meters = Meters()
        client = Client(port, clients, key)
        try:
            loaded = await closed_loop(clients, warmup, measure, client.one, meters.start, meters.snapshot)
        finally:
            await client.close()
        http_cpu = meters.report(loaded.requests)
        wait_for_quiet()
        meters = Meters()
        loaded_handle = await concurrent_handle(handle, job, clients, warmup, measure, meters)
        handle_cpu = meters.report(loaded_handle.requests)
        out["concurrent"] = {
            "clients": clients,
            "served_http": {**loaded.summary(), "cpu": http_cpu},
            "model_handle_from_driver": {**loaded_handle.summary(), "cpu": handle_cpu},
        }
    return out


# -- report -----------------------------------------------------------------------------------
def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    c = doc["config"]
    lines = [
        "## Ingress overhead (issues 3 and 12)",
        "",
        f"`python bench/ingress_overhead.py` — the served graph (tiny-sdxl only, 1 ingress replica unless "
        f"stated, 1 model replica, SQLite accounts), {c['clients']} clients over keep-alive HTTP/1.1. Serve "
        f"profiles: *defaults* is what `serve run serve_config.yaml` gives (Serve's Python HTTP proxy in front); "
        f"*throughput-optimized* sets `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (clients talk to the ingress replica's own "
        f"HTTP port); *HAProxy + throughput-optimized* is the README's throughput mode (HAProxy on the usual port, "
        f"forwarding to the ingress replicas' own HTTP servers). "
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), ray {m['versions']['ray']}.",
        "",
        "Rejections. Each kind uses one key; every rejection is the ingress's own answer (nothing repeats it in "
        "the proxy; floods belong to the gateway in front, README \"Operating\"). *closed*: every client sends again as soon "
        f"as it has its answer (saturation; p50 is then about {c['clients']} / throughput; latency counts the "
        f"requests sent after the first {c['warmup']} answers); *paced*: the same clients offering half the "
        "closed-loop throughput; *1 client*: one request at a time.",
        "",
        "| Serve | rejection | closed req/s | closed p50 | closed p99 | paced req/s | paced p50 | paced p99 | "
        "1 client p50 | 1 client p99 | CPU ms/req proxy + ingress + limiter |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for profile, res in doc["profiles"].items():
        for label, r in res["rejections"].items():
            closed, paced, seq = r["closed_loop"], r["paced_half_saturation"], r["sequential"]
            cpu = r["cpu"]["cpu_ms_per_request"]
            lines.append(
                f"| {profile_label(profile)} | {label} | {closed['requests_per_s']:.0f} | "
                f"{closed['latency']['p50_ms']:.1f} | {closed['latency']['p99_ms']:.1f} | "
                f"{paced['requests_per_s']:.0f} | {paced['latency']['p50_ms']:.1f} | "
                f"{paced['latency']['p99_ms']:.1f} | "
                f"{seq['latency']['p50_ms']:.1f} | {seq['latency']['p99_ms']:.1f} | "
                f"{cpu.get('proxy', 0):.1f} + {cpu.get('ingress', 0):.1f} + {cpu.get('rate_limiter', 0):.1f} |"
            )
    lines.append("")
    for profile, res in doc["profiles"].items():
        v = res["verdict"]
        lines.append(
            f"- Target: a rejection's p99 < {TARGET_P99_MS:.0f} ms for one client at a time, {profile_label(profile)}: "
            f"**{'met' if v['sequential_met'] else 'MISSED'}** (worst {v['sequential_worst_p99_ms']:.1f} ms). At "
            f"{c['clients']} clients (reported, no target: a flood is the gateway's to drop) the ingress answers "
            f"{min(r['closed_loop']['requests_per_s'] for r in res['rejections'].values()):.0f}-"
            f"{max(r['closed_loop']['requests_per_s'] for r in res['rejections'].values()):.0f} rejections/s, "
            f"closed-loop p99 up to {v['closed_loop_worst_p99_ms']:.0f} ms."
        )
    lines += [
        "",
        "Accepted request (32x32, 1 step, n=1), one at a time, p50 ms. *handle*: the same job sent from the "
        "benchmark driver straight to the model deployment's handle, skipping proxy and ingress.",
        "",
        "| Serve | batch wait | pipeline in process | handle | served over HTTP | served − pipeline | "
        "served − handle (proxy + ingress) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for profile, res in doc["profiles"].items():
        for acc in res["accepted"]:
            s = acc["sequential"]
            o = s["overhead_p50_ms"]
            lines.append(
                f"| {profile_label(profile)} | {acc['batch_wait_timeout_s']} s | "
                f"{s['pipeline_in_process']['p50_ms']:.1f} | {s['model_handle_from_driver']['p50_ms']:.1f} | "
                f"{s['served_http']['p50_ms']:.1f} | {o['served_minus_pipeline']:.1f} | "
                f"{o['served_minus_handle (proxy + ingress)']:.1f} |"
            )
    lines.append("")
    for profile, res in doc["profiles"].items():
        loaded = next((a["concurrent"] for a in res["accepted"] if "concurrent" in a), None)
        if not loaded:
            continue
        http, handle = loaded["served_http"], loaded["model_handle_from_driver"]
        cpu = http["cpu"]["cpu_ms_per_request"]
        lines.append(
            f"- Accepted at {loaded['clients']} concurrent clients, {profile_label(profile)}, batch wait 0.05 s: "
            f"over HTTP "
            f"{http['requests_per_s']:.1f} req/s (p50 {http['latency']['p50_ms']:.0f} ms) vs straight to the handle "
            f"{handle['requests_per_s']:.1f} req/s (p50 {handle['latency']['p50_ms']:.0f} ms); CPU per accepted "
            f"request over HTTP: proxy {cpu.get('proxy', 0):.1f} ms, ingress {cpu.get('ingress', 0):.1f} ms, rate "
            f"limiter {cpu.get('rate_limiter', 0):.1f} ms, model replica {cpu.get('model_replica', 0):.1f} ms."
        )
    lines += [f"- {note}" for note in doc.get("notes", [])]
    return "\n".join(lines)


def served_worker(args, pipeline: dict[str, Any]) -> dict[str, Any]:
    """Everything that needs the served graph, in this process's own Ray instance, on one
    event loop (under RAY_SERVE_THROUGHPUT_OPTIMIZED the driver's handle routers use it)."""
    # No serve.shutdown() at the end: the driver's handles are bound to the finished loop, and
    # ray.shutdown() stops this private instance (controller, proxy, replicas) anyway.
    with temp_dir("imagegen-bench-") as tmp, ray_instance(num_cpus=2, serve_shutdown=False):
        return asyncio.run(_served_worker(args, pipeline, Path(tmp)))


async def _served_worker(args, pipeline: dict[str, Any], data: Path) -> dict[str, Any]:
    rejections: dict[str, Any] = {}
    accepted: list[dict[str, Any]] = []
    proxy_port = free_port()
    replicas = profile_ingress_replicas(args.served_worker)
    config = bench_config(data, max_batch_images=8, batch_wait_timeout_s=0.05, ingress_replicas=replicas)
    serve_graph(config, proxy_port, first=True)
    port = http_port_of_app(proxy_port)
    url = config.accounts.database_url
    keys = {
        "401 invalid_api_key": ("qbt_" + secrets.token_urlsafe(32), 401),  # well-formed, not in the database
        "402 insufficient_funds": (create_key(url, "zero", "0"), 402),
        "429 rate_limit_exceeded": (create_key(url, "slow", "1000", rpm=1), 429),
    }
    ok_key = create_key(url, "bench", "100000000")
    for label, (key, expected) in keys.items():
        print(f"  {label}: {args.clients} clients", flush=True)
        res = await rejection_scenario(port, key, expected, args.clients, args.warmup, args.requests,
                                       args.sequential)
        rejections[label] = res
        for mode in ("closed_loop", "paced_half_saturation", "sequential"):
            r = res[mode]
            print(f"    {mode:22s} {r['requests_per_s']:7.1f} req/s  p50 {r['latency']['p50_ms']:6.1f} ms  "
                  f"p99 {r['latency']['p99_ms']:6.1f} ms  statuses {r['statuses']}", flush=True)
        print(f"    cpu ms/request {res['cpu']['cpu_ms_per_request']}  foreign cores {res['cpu']['foreign_cores']}",
              flush=True)

    print("  accepted, batch wait 0.05 s", flush=True)
    accepted.append(await accepted_overhead(config, port, ok_key, args.sequential, args.clients,
                                            max(16, args.accepted // 6), args.accepted, pipeline))
    print(f"    {json.dumps(accepted[-1]['sequential']['overhead_p50_ms'])}", flush=True)
    conc = accepted[-1]["concurrent"]
    for kind in ("served_http", "model_handle_from_driver"):
        r = conc[kind]
        print(f"    {kind:26s} {r['requests_per_s']:6.1f} req/s  p50 {r['latency']['p50_ms']:6.1f} ms  "
              f"cpu ms/request {r['cpu']['cpu_ms_per_request']}", flush=True)
    config = bench_config(data, max_batch_images=8, batch_wait_timeout_s=0.0, ingress_replicas=replicas)
    serve_graph(config, proxy_port, first=False)
    port = http_port_of_app(proxy_port)
    print("  accepted, batch wait 0 s (shipped)", flush=True)
    accepted.append(await accepted_overhead(config, port, ok_key, args.sequential, 0, 0, 0, pipeline))
    print(f"    {json.dumps(accepted[-1]['sequential']['overhead_p50_ms'])}", flush=True)
    worst = {mode: max(r[mode]["latency"]["p99_ms"] for r in rejections.values())
             for mode in ("closed_loop", "paced_half_saturation", "sequential")}
    return {
        "http": http_front(port, proxy_port),
        "rejections": rejections,
        "accepted": accepted,
        "verdict": {
            "closed_loop_worst_p99_ms": worst["closed_loop"],
            "closed_loop_met": worst["closed_loop"] < TARGET_P99_MS,
            "paced_worst_p99_ms": worst["paced_half_saturation"],
            "paced_met": worst["paced_half_saturation"] < TARGET_P99_MS,
            "sequential_worst_p99_ms": worst["sequential"],
            "sequential_met": worst["sequential"] < TARGET_P99_MS,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; writes no results")
    parser.add_argument("--clients", type=int, default=32)
    # Rejections run at thousands per second, so these are a few seconds each: long enough
    # that one host hiccup does not make the p99, and the warm-up outlasts the first burst
    # of a new key (its first answers all come from the ingress).
    parser.add_argument("--requests", type=int, default=10000, help="measured rejections per kind (closed loop)")
    parser.add_argument("--warmup", type=int, default=2000, help="rejections discarded first (closed loop)")
    parser.add_argument("--sequential", type=int, default=100, help="one-at-a-time requests per measurement")
    parser.add_argument("--accepted", type=int, default=320, help="accepted requests at full concurrency")
    parser.add_argument("--profiles", default="default,haproxy_optimized@2",
                        help=f"comma-separated Serve profiles to measure: {', '.join(SERVE_PROFILES)}")
    parser.add_argument("--output", type=Path, default=RESULTS / f"{NAME}.json")
    parser.add_argument("--served-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup, args.sequential, args.accepted = 300, 64, 20, 64

    if args.served_worker:  # a child process: one Ray instance with this profile's environment
        result = served_worker(args, json.loads(args.pipeline_json))
        args.worker_output.write_text(json.dumps(result))
        return 0

    started = time.time()
    print("in-process pipeline time of the accepted request", flush=True)
    wait_for_quiet()
    pipeline = pipeline_time(max(args.sequential, 20))
    print(f"  p50 {pipeline['p50_ms']} ms", flush=True)

    forward = [a for a in sys.argv[1:] if a != "--quick"]
    if args.quick:
        forward += ["--requests", str(args.requests), "--warmup", str(args.warmup), "--sequential",
                    str(args.sequential), "--accepted", str(args.accepted)]
    forward += ["--pipeline-json", json.dumps(pipeline)]
    profiles: dict[str, Any] = {}
    for profile in [p.strip() for p in args.profiles.split(",") if p.strip()]:
        print(f"served graph, Serve {profile_label(profile)}", flush=True)
        profiles[profile] = run_profile_worker(Path(__file__).resolve(), profile, forward)

    doc = {
        "benchmark": NAME,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "machine": machine_info(),
        "config": {"model": MODEL, "clients": args.clients, "warmup": args.warmup, "measure": args.requests,
                   "sequential": args.sequential, "accepted_payload": payload(0), "ray_num_cpus": 2,
                   "ingress_replicas": {p: profile_ingress_replicas(p) for p in profiles},
                   "model_replicas": 1, "max_batch_images": 8,
                   "profiles": {p: profile_env(p) for p in profiles}},
        "target": {"rejection_p99_ms": TARGET_P99_MS},
        "pipeline_in_process": pipeline,
        "profiles": profiles,
        "notes": [],
    }
    foreign = max(
        max(r["cpu"]["foreign_cores"], r["paced_half_saturation"]["foreign_cores"], r["sequential"]["foreign_cores"])
        for res in profiles.values()
        for r in res["rejections"].values()
    )
    doc["max_foreign_cores"] = foreign
    if foreign > 0.1:
        doc["notes"].append(f"Other processes used up to {foreign} cores during a measurement: disturbed; rerun.")
    print(markdown(doc))
    if not args.quick:
        write_json(args.output, doc)
        update_doc_section(NAME, markdown(doc))
        print(f"wrote {args.output} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
