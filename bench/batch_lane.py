"""The batch lane: does a large batch leave interactive traffic alone? (issue 22, item 3)

Tiny SDXL (builtin:tiny-sdxl) served as `serve run serve_config.yaml` serves it (Serve's
HTTP proxy, one ingress replica with its batch runner, one fixed model replica with the
shipped batching: max 8 images, wait 0 s), its own SQLite database and file store.
Interactive traffic is a closed loop of 4 clients, each sending its next request the
moment the previous one returns: n=1, its own prompt and seed, 64x64, 8 steps. The batch
is one JSONL file of the same call shape (n=1, 64x64, 8 steps, its own prompts and seeds),
uploaded with `POST /v1/files` (purpose batch) and run with `POST /v1/batches`
(endpoint /v1/images/generations, completion window 24h). Four phases, in this order, in
one Ray instance:

  interactive alone        the closed loop, no batch
  interactive + batch      the batch is created and runs (its first lines done) before the
                           closed loop starts; the batch must outlast the loop's window
  batch alone              the rest of the same batch after the loop stopped, until it
                           completes (or --batch-alone-max-s passes: then it is cancelled)
  interactive alone again  the closed loop once more: the machine's drift

Interactive figures are the closed loop's steady state (warm-up excluded). The batch lane's
images/s in a window are the images of the lines that succeeded in it, read after the run
from the batch's rows (`batch_lines.finished_at`, `images`) in the database; the request
counts of `GET /v1/batches/{id}`, polled once a second, are kept for the record. The total
is interactive + batch images/s over the interactive window. "Model replica cores" is the
replica's CPU seconds over the window: how busy the pipeline's core was (1.0: no room left).

Targets (issue 22): interactive p99 with the batch <= 1.2x p99 alone; batch images/s > 0
while interactive traffic runs; total images/s with the batch >= interactive images/s
alone. "Alone" is the mean of the two interactive-alone rows, which bracket the batch rows.

    python bench/batch_lane.py          # full run: JSON + docs/benchmarks.md
    python bench/batch_lane.py --quick  # smoke run (prints, writes nothing)
    python bench/batch_lane.py --concurrent-lines 4  # batches.max_concurrent_lines: own JSON and section
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    CpuMeter,
    HttpConnection,
    Meters,
    ServeCpu,
    bench_config,
    closed_loop,
    create_key,
    free_port,
    machine_info,
    post_json_bytes,
    ray_instance,
    serve_graph,
    temp_dir,
    update_doc_section,
    wait_for_quiet,
    write_json,
)

NAME = "batch_lane"
MODEL = "tiny-sdxl"
HOST = "127.0.0.1"
SIZE = 64
STEPS = 8
CLIENTS = 4
MAX_BATCH_IMAGES = 8  # the shipped batching of tiny-sdxl (serve_config.yaml)
BATCH_WAIT_S = 0.0
FINAL = ("completed", "failed", "expired", "cancelled")
P99_LIMIT = 1.2
# wall clock = perf_counter + this (the batch rows carry time.time(), the load perf_counter)
WALL_OFFSET = time.time() - time.perf_counter()


def wall(perf: float) -> float:
    return perf + WALL_OFFSET


# -- HTTP ------------------------------------------------------------------------------------
def raw_request(method: str, path: str, key: str, body: bytes = b"", content_type: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Authorization: Bearer {key}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def call(conn: HttpConnection, raw: bytes, expect: int = 200) -> dict[str, Any]:
    response = await conn.request(raw)
    if response.status != expect:
        raise RuntimeError(f"HTTP {response.status}: {response.body[:500].decode('utf-8', 'replace')}")
    return json.loads(response.body)


def request_body(prompt: str, seed: int, size: int, steps: int) -> dict[str, Any]:
    """Interactive requests and batch lines alike: one call shape (size, steps, default
    guidance, no negative prompt), so batch lines can ride in interactive pipeline calls."""
    return {"model": MODEL, "prompt": prompt, "size": f"{size}x{size}", "num_inference_steps": steps, "seed": seed}


def batch_file(lines: int, size: int, steps: int) -> bytes:
    rows = [
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/images/generations",
                "body": request_body(f"batch line {i}, a lighthouse at dusk", 50_000 + i, size, steps),
            },
            separators=(",", ":"),
        )
        for i in range(lines)
    ]
    return ("\n".join(rows) + "\n").encode()


async def submit_batch(port: int, key: str, data: bytes) -> dict[str, Any]:
    """POST /v1/files (multipart, purpose batch), then POST /v1/batches."""
    conn = HttpConnection(HOST, port)
    boundary = f"bench-{uuid.uuid4().hex}"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="batch_lane.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    try:
        uploaded = await call(
            conn, raw_request("POST", "/v1/files", key, form, f"multipart/form-data; boundary={boundary}")
        )
        payload = {"input_file_id": uploaded["id"], "endpoint": "/v1/images/generations", "completion_window": "24h"}
        body = json.dumps(payload).encode()
        return await call(conn, raw_request("POST", "/v1/batches", key, body, "application/json"))
    finally:
        await conn.close()


class BatchWatch:
    """Polls GET /v1/batches/{id} once a second: (wall time, status, completed, failed)."""

    def __init__(self, port: int, key: str, batch_id: str, every_s: float = 1.0) -> None:
        self.port, self.key, self.batch_id, self.every_s = port, key, batch_id, every_s
        self.samples: list[tuple[float, str, int, int]] = []
        self.last: dict[str, Any] = {}
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        conn = HttpConnection(HOST, self.port)
        try:
            while True:
                batch = await call(conn, raw_request("GET", f"/v1/batches/{self.batch_id}", self.key))
                counts = batch["request_counts"]
                self.last = batch
                self.samples.append((time.time(), batch["status"], counts["completed"], counts["failed"]))
                if batch["status"] in FINAL:
                    self.done.set()
                    return
                await asyncio.sleep(self.every_s)
        finally:
            await conn.close()

    @property
    def completed(self) -> int:
        return self.last.get("request_counts", {}).get("completed", 0)

    async def until(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self._task is not None and self._task.done() and self._task.exception() is not None:
                raise self._task.exception()
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {self.batch_id}: {what} not within {timeout_s:.0f} s: {self.last}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# -- interactive load ------------------------------------------------------------------------
async def interactive(
    port: int, key: str, clients: int, warmup: int, measure: int, size: int, steps: int, tag: str
) -> dict[str, Any]:
    """The closed loop's steady state, with its window in wall-clock time and CPU meters."""
    connections = [HttpConnection(HOST, port) for _ in range(clients)]
    bad: list[str] = []

    async def one(client: int, seq: int) -> tuple[int, int]:
        body = request_body(f"{tag} client {client} request {seq}, a lighthouse at dusk", 1000 + seq, size, steps)
        response = await connections[client].request(
            post_json_bytes(HOST, port, "/v1/images/generations", body, key)
        )
        if response.status != 200:
            if len(bad) < 3:
                bad.append(response.body[:300].decode("utf-8", "replace"))
            return response.status, 0
        return response.status, len(json.loads(response.body)["data"])

    meters = Meters()
    result = await closed_loop(clients, warmup, measure, one, meters.start, meters.snapshot)
    cpu = meters.report(result.requests)
    for connection in connections:
        await connection.close()
    summary = result.summary()
    summary["cpu"] = cpu
    summary["window_wall"] = [wall(result.window_start), wall(result.records[-1].end)]
    summary["model_replica_cores"] = round(cpu["cpu_s"].get("model_replica", 0.0) / result.window_s, 2)
    if bad:
        summary["errors"] = bad
    return summary


# -- the batch's rows ------------------------------------------------------------------------
def batch_rows(database: Path, batch_id: str) -> list[dict[str, Any]]:
    """The batch's lines as the runner recorded them (read-only, after the run)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT l.line_no, l.state, l.images, l.attempts, l.status_code, l.finished_at "
            "FROM batch_lines l JOIN batches b ON b.seq = l.batch_seq WHERE b.id = ? ORDER BY l.line_no",
            (batch_id,),
        ).fetchall()
    return [dict(row) for row in rows]


def batch_rate(rows: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Images (and lines) of the lines that succeeded in (start, end], per second."""
    done = [r for r in rows if r["state"] == "succeeded" and r["finished_at"] and start < r["finished_at"] <= end]
    seconds = max(end - start, 1e-9)
    images = sum(r["images"] for r in done)
    return {
        "window_s": round(seconds, 3),
        "lines": len(done),
        "images": images,
        "images_per_s": round(images / seconds, 2),
    }


def timeline(rows: list[dict[str, Any]], start: float, bin_s: float = 5.0) -> list[list[float]]:
    """[seconds from ``start``, batch images/s in that bin] for the whole batch."""
    finished = [r for r in rows if r["state"] == "succeeded" and r["finished_at"]]
    if not finished:
        return []
    end = max(r["finished_at"] for r in finished)
    bins: list[list[float]] = []
    edge = start
    while edge < end:
        images = sum(r["images"] for r in finished if edge < r["finished_at"] <= edge + bin_s)
        bins.append([round(edge - start, 1), round(images / bin_s, 2)])
        edge += bin_s
    return bins


# -- the run ---------------------------------------------------------------------------------
async def phases(port: int, key: str, database: Path, args: argparse.Namespace) -> dict[str, Any]:
    clients, warmup, measure, size, steps = args.clients, args.warmup, args.measure, args.size, args.steps
    doc: dict[str, Any] = {}

    def show(label: str, row: dict[str, Any], batch: float | None = None) -> None:
        lat = row["latency"]
        extra = "" if batch is None else f"  batch {batch:5.2f} images/s"
        print(
            f"  {label:24s} {row['images_per_s']:6.2f} images/s  p50 {lat['p50_ms']:7.1f} ms  "
            f"p99 {lat['p99_ms']:7.1f} ms  replica {row['model_replica_cores']:.2f} cores  "
            f"statuses {row['statuses']}{extra}",
            flush=True,
        )

    # 1. interactive alone (its warm-up also warms the pipeline and starts the batch runner)
    quiet = await asyncio.to_thread(wait_for_quiet)
    alone = await interactive(port, key, clients, warmup, measure, size, steps, "alone")
    alone["quiet_before"] = quiet
    show("interactive alone", alone)

    # 2. interactive while the batch runs
    quiet = await asyncio.to_thread(wait_for_quiet)
    data = batch_file(args.batch_lines, size, steps)
    created_perf = time.perf_counter()
    batch = await submit_batch(port, key, data)
    watch = BatchWatch(port, key, batch["id"])
    watch.start()
    lane_warmup = min(4, args.batch_lines)
    await watch.until(lambda: watch.completed >= lane_warmup, 120, f"{lane_warmup} lines done")
    lane_started_s = time.perf_counter() - created_perf
    with_batch = await interactive(port, key, clients, warmup, measure, size, steps, "with-batch")
    with_batch["quiet_before"] = quiet
    still_running = not watch.done.is_set()
    show("interactive + batch", with_batch)
    phase2_batch_id, phase2_watch = batch["id"], watch
    if not still_running:
        # The batch ended inside the window: the row above understates the lane, and nothing is
        # left for the next row; a second batch of the same lines runs alone.
        print(f"  WARNING: the batch ended before the interactive window did: raise --batch-lines "
              f"(it is {args.batch_lines})", flush=True)
        await watch.stop()
        batch = await submit_batch(port, key, data)
        watch = BatchWatch(port, key, batch["id"])
        watch.start()

    # 3. the rest of the batch alone
    await asyncio.sleep(1.0)  # the interactive loop's last requests are out of the pipeline
    alone_start = time.time()
    serve_cpu, cpu_meter = ServeCpu(), CpuMeter()
    try:
        await asyncio.wait_for(watch.done.wait(), args.batch_alone_max_s)
        capped = False
    except asyncio.TimeoutError:
        capped = True
    alone_end_cap = time.time()
    serve_cpu.snapshot()
    cpu_meter.snapshot()
    if capped:
        conn = HttpConnection(HOST, port)
        try:
            await call(conn, raw_request("POST", f"/v1/batches/{batch['id']}/cancel", key, b""))
        finally:
            await conn.close()
    await watch.until(watch.done.is_set, 180, "a final status")
    await watch.stop()
    final = watch.last

    # 4. interactive alone again: the drift of the machine over the run
    quiet = await asyncio.to_thread(wait_for_quiet)
    again = await interactive(port, key, clients, warmup, measure, size, steps, "again")
    again["quiet_before"] = quiet
    show("interactive alone again", again)

    # the batch's figures, from its rows
    rows = batch_rows(database, batch["id"])
    phase2_rows = rows if batch["id"] == phase2_batch_id else batch_rows(database, phase2_batch_id)
    w0, w1 = with_batch["window_wall"]
    lane_during = batch_rate(phase2_rows, w0, w1)
    succeeded = [r["finished_at"] for r in rows if r["state"] == "succeeded" and r["finished_at"]]
    last_line = max(succeeded) if succeeded else alone_start
    alone_end = alone_end_cap if capped else last_line
    lane_alone = batch_rate(rows, alone_start, alone_end)
    cpu = serve_cpu.stop(max(lane_alone["lines"], 1))
    metered_s = max(alone_end_cap - alone_start, 1e-9)  # the CPU meter's interval
    lane_alone["model_replica_cores"] = round(cpu["cpu_s"].get("model_replica", 0.0) / metered_s, 2)
    lane_alone["capped"] = capped
    lane_alone["cpu"] = {**cpu_meter.stop(), **cpu}
    with_batch["batch"] = lane_during
    with_batch["total_images_per_s"] = round(with_batch["images_per_s"] + lane_during["images_per_s"], 2)
    print(
        f"  {'':24s} batch lane {lane_during['images_per_s']:.2f} images/s during the window, "
        f"total {with_batch['total_images_per_s']:.2f} images/s",
        flush=True,
    )
    print(
        f"  {'batch alone':24s} {lane_alone['images_per_s']:6.2f} images/s over {lane_alone['window_s']:.1f} s  "
        f"replica {lane_alone['model_replica_cores']:.2f} cores{'  (capped, cancelled)' if capped else ''}",
        flush=True,
    )
    attempts: dict[str, int] = {}
    states: dict[str, int] = {}
    codes: dict[str, int] = {}
    for row in rows:
        attempts[str(row["attempts"])] = attempts.get(str(row["attempts"]), 0) + 1
        states[row["state"]] = states.get(row["state"], 0) + 1
        codes[str(row["status_code"])] = codes.get(str(row["status_code"]), 0) + 1
    output_ok = None
    if final.get("output_file_id"):
        conn = HttpConnection(HOST, port)
        try:
            response = await conn.request(raw_request("GET", f"/v1/files/{final['output_file_id']}/content", key))
        finally:
            await conn.close()
        output_ok = sum(
            1 for text in response.body.decode().splitlines()
            if text and json.loads(text)["response"]["status_code"] == 200
        )
    created_wall = wall(created_perf)
    first_done = [r["finished_at"] for r in phase2_rows if r["state"] == "succeeded" and r["finished_at"]]
    doc["phases"] = {"interactive_alone": alone, "with_batch": with_batch, "batch_alone": lane_alone,
                     "interactive_alone_again": again}
    doc["batch"] = {
        "id": phase2_batch_id,
        "lines": args.batch_lines,
        "status": phase2_watch.last.get("status"),
        "request_counts": phase2_watch.last.get("request_counts"),
        "line_states": states,
        "status_codes": codes,
        "attempts": attempts,
        "output_lines_200": output_ok,
        "lane_warmup_lines": lane_warmup,
        "lane_warmup_s": round(lane_started_s, 2),
        "first_line_after_s": round(min(first_done) - created_wall, 2) if first_done else None,
        "ran_past_with_batch_window": still_running,
        "second_batch_for_batch_alone": None if still_running else {"id": batch["id"], "final": final},
        "polled_counts": [[round(t - created_wall, 2), s, c, f] for t, s, c, f in phase2_watch.samples],
        "images_per_s_timeline_5s": timeline(phase2_rows, created_wall),
        "interactive_with_batch_window_s_from_create": [round(w0 - created_wall, 2), round(w1 - created_wall, 2)],
    }
    return doc


def served_run(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    with temp_dir("imagegen-bench-") as tmp, ray_instance(num_cpus=2):
        config = bench_config(Path(tmp), max_batch_images=MAX_BATCH_IMAGES, batch_wait_timeout_s=BATCH_WAIT_S)
        if args.concurrent_lines is not None:
            config = config.model_copy(
                update={"batches": config.batches.model_copy(update={"max_concurrent_lines": args.concurrent_lines})}
            )
        port = free_port()
        serve_graph(config, port, first=True)
        key = create_key(config.accounts.database_url, "bench", "100000000")
        doc = asyncio.run(phases(port, key, Path(tmp) / "imagegen.db", args))
        doc["batches_config"] = json.loads(config.batches.model_dump_json())
        serve.delete("imagegen")
    return doc


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    p = doc["phases"]
    alone = (p["interactive_alone"], p["interactive_alone_again"])
    p99_alone = sum(r["latency"]["p99_ms"] for r in alone) / 2
    p50_alone = sum(r["latency"]["p50_ms"] for r in alone) / 2
    rate_alone = sum(r["images_per_s"] for r in alone) / 2
    with_batch = p["with_batch"]
    p99_ratio = with_batch["latency"]["p99_ms"] / p99_alone
    return {
        "p99_alone_ms": round(p99_alone, 2),
        "p99_with_batch_over_alone": round(p99_ratio, 3),
        "p99_with_batch_over_first_alone": round(
            with_batch["latency"]["p99_ms"] / p["interactive_alone"]["latency"]["p99_ms"], 3
        ),
        "p99_ok": p99_ratio <= P99_LIMIT,
        "p50_with_batch_over_alone": round(with_batch["latency"]["p50_ms"] / p50_alone, 3),
        "batch_images_per_s_with_interactive": with_batch["batch"]["images_per_s"],
        "batch_ok": with_batch["batch"]["images_per_s"] > 0,
        "interactive_images_per_s_alone": round(rate_alone, 2),
        "interactive_images_per_s_with_batch_over_alone": round(with_batch["images_per_s"] / rate_alone, 3),
        "total_images_per_s_with_batch": with_batch["total_images_per_s"],
        "total_over_interactive_alone": round(with_batch["total_images_per_s"] / rate_alone, 3),
        "total_ok": with_batch["total_images_per_s"] >= rate_alone,
    }


def markdown(doc: dict[str, Any], command: str) -> str:
    m, c, t, p = doc["machine"], doc["config"], doc["targets"], doc["phases"]
    b, lane = doc["batch"], doc["batches_config"]

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def foreign(r: dict[str, Any]) -> str:
        value = r.get("cpu", {}).get("foreign_cores")
        return "—" if value is None else f"{value:.2f}"

    def row(label: str, r: dict[str, Any], batch: float | None, total: float | None) -> str:
        lat = r["latency"]
        return (
            f"| {label} | {r['images_per_s']:.2f} | {lat['p50_ms']:.0f} | {lat['p99_ms']:.0f} | "
            f"{'—' if batch is None else f'{batch:.2f}'} | {(total if total is not None else r['images_per_s']):.2f} | "
            f"{r['model_replica_cores']:.2f} | {foreign(r)} |"
        )

    wb, ba = p["with_batch"], p["batch_alone"]
    disturbed = max(r.get("cpu", {}).get("foreign_cores", 0.0) for r in p.values())
    lines = [
        f"## Batch lane (issue 22){'' if command == 'python bench/batch_lane.py' else f': `{command[7:]}`'}",
        "",
        (
            f"`{command}` — tiny SDXL, {c['size']}x{c['size']}, {c['steps']} steps, n=1: {c['clients']} closed-loop "
            f"interactive clients ({c['measure']} measured requests after {c['warmup']} warm-up per row) and one batch "
            f"of {b['lines']} lines of the same call shape (`POST /v1/files` + `POST /v1/batches`, "
            f"/v1/images/generations), in one Ray instance, rows in the order below. Serve defaults (HTTP proxy), one "
            f"ingress replica (its batch runner: {lane['max_concurrent_lines']} lines at a time), one model replica "
            f"(one torch thread), shipped batching (max {c['max_batch_images']} images, wait {c['batch_wait_s']:g} s). "
            f"Machine: {m['nproc']} cores ({m['cpu_model']}), ray {m['versions']['ray']}, torch "
            f"{m['versions']['torch']}, diffusers {m['versions']['diffusers']}."
        ),
        "",
        (
            "| row | interactive images/s | p50 ms | p99 ms | batch images/s | total images/s | model replica cores "
            "| other processes (cores) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("interactive alone", p["interactive_alone"], None, None),
        row("interactive + batch", wb, wb["batch"]["images_per_s"], wb["total_images_per_s"]),
        (
            f"| batch alone{' (capped)' if ba['capped'] else ''} | — | — | — | {ba['images_per_s']:.2f} | "
            f"{ba['images_per_s']:.2f} | {ba['model_replica_cores']:.2f} | {foreign(ba)} |"
        ),
        row("interactive alone again", p["interactive_alone_again"], None, None),
        "",
        (
            f"- Interactive p99 with the batch over alone (mean of the two alone rows): "
            f"**{t['p99_with_batch_over_alone']:.2f}x** (target <= {P99_LIMIT}x: {met(t['p99_ok'])}); p50 "
            f"{t['p50_with_batch_over_alone']:.2f}x; interactive images/s {t['interactive_images_per_s_with_batch_over_alone']:.2f}x."
        ),
        (
            f"- Batch lane while interactive traffic runs: **{t['batch_images_per_s_with_interactive']:.2f} images/s** "
            f"(target > 0: {met(t['batch_ok'])}); alone: {ba['images_per_s']:.2f} images/s."
        ),
        (
            f"- Total images/s with the batch over interactive alone: **{t['total_over_interactive_alone']:.2f}x** "
            f"({t['total_images_per_s_with_batch']:.2f} vs {t['interactive_images_per_s_alone']:.2f}; target >= 1: "
            f"{met(t['total_ok'])})."
        ),
        (
            f"- The batch: {b['status']}, {b['request_counts']}, line attempts {b['attempts']}; first line done "
            f"{b['first_line_after_s']} s after `POST /v1/batches`."
        ),
    ]
    if disturbed > 0.15:
        lines.append(
            f"- Disturbed: processes outside the benchmark used up to {disturbed:.2f} cores during the rows (last "
            f"column; the machine has {m['nproc']}), so the rows are not comparable to a quiet run, nor fully "
            "to one another."
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run; writes nothing")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--warmup", type=int, default=None, help="interactive warm-up requests per row")
    parser.add_argument("--measure", type=int, default=None, help="interactive measured requests per row")
    parser.add_argument("--batch-lines", type=int, default=None, help="lines of the batch")
    parser.add_argument("--batch-alone-max-s", type=float, default=None,
                        help="the batch-alone row ends (the batch is cancelled) after this long")
    parser.add_argument("--concurrent-lines", type=int, default=None,
                        help="batches.max_concurrent_lines (default: the shipped value)")
    args = parser.parse_args()
    warmup, measure, lines, alone_max = (12, 80, 120, 20.0) if args.quick else (40, 480, 600, 90.0)
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.measure = args.measure if args.measure is not None else measure
    args.batch_lines = args.batch_lines if args.batch_lines is not None else lines
    args.batch_alone_max_s = args.batch_alone_max_s if args.batch_alone_max_s is not None else alone_max

    variant = []
    for flag, value, default in (
        ("--clients", args.clients, CLIENTS),
        ("--size", args.size, SIZE),
        ("--steps", args.steps, STEPS),
        ("--concurrent-lines", args.concurrent_lines, None),
    ):
        if value != default:
            variant.append((flag, value))
    command = " ".join(["python bench/batch_lane.py", *(f"{flag} {value}" for flag, value in variant)])
    name = NAME + "".join(f"_{flag.strip('-').replace('-', '_')}{value}" for flag, value in variant)

    doc: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "model": MODEL,
            "clients": args.clients,
            "size": args.size,
            "steps": args.steps,
            "warmup": args.warmup,
            "measure": args.measure,
            "batch_lines": args.batch_lines,
            "batch_alone_max_s": args.batch_alone_max_s,
            "max_batch_images": MAX_BATCH_IMAGES,
            "batch_wait_s": BATCH_WAIT_S,
        },
    }
    started = time.perf_counter()
    doc.update(served_run(args))
    doc["targets"] = targets(doc)
    doc["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = markdown(doc, command)
    print(text)
    print(f"elapsed {doc['elapsed_s']} s")
    if not args.quick:
        write_json(RESULTS / f"{name}.json", doc)
        update_doc_section(name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
