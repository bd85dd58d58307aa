"""Soak with faults: does the embedded default keep serving, and keep its books, while
replicas die? (issue "Hardening")

The embedded default (serve_config.yaml's ``args:``: tiny-sdxl, tiny-qwen-image and
tiny-flux with their autoscaling, one ingress replica) served as ``serve run`` serves it
(Serve's HTTP proxy in front), in a Ray instance of its own (2 CPUs) with its own SQLite
database and image folder. Several API keys with plenty of credits (and per-key rate
limits high enough that no 429 muddles the counts); ``--clients`` closed-loop HTTP clients
spread over the keys and the models send, for ``--duration-s``, a mix of requests: n=1..3
text-to-image, image-to-image (a small PNG data URI as ``image``, ``strength`` 0.5),
``response_format: url`` for some, and now and then an invalid request (an unknown field,
which must be a 400 and cost nothing). Every outcome is recorded as the client saw it:
status, error code, images delivered, ``x-credits-charged``. Nothing is retried.

Faults: every ``--kill-every-s`` one running model replica is killed (``ray.kill``, no
restart; the models in turn), and once, at about the middle, the ingress replica. Serve
replaces them; the run records when each fault hit, what was killed, when the deployment
had a running replica again, and what the clients saw meanwhile.

After the load stops and in-flight requests return, the script waits for every credit
reservation to be settled (the requests a killed ingress held stay open until an ingress
replica releases them as stale: ``accounts.release_stale_after_s``) and then checks the
books: no reservation open; every key's balance equals its ledger (the store's
``inconsistencies()``); credits charged in the ledger == images delivered to clients x
price == the sum of the ``x-credits-charged`` headers of the 200s; each key's balance ==
its initial credits minus what it was told it was charged. Also: refunds (count, images,
credits; how many were stale releases), and the resident memory of every process of the
Ray instance (raylet, GCS, controller, proxy, ingress, each model's replicas, ...) by kind
at the start and at the end of the load, with a timeline.

    python bench/soak.py            # 10 minutes; bench/results/soak.json + docs/benchmarks.md
    python bench/soak.py --quick    # 60 s, a kill every 20 s, stale release after 90 s; writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODEL_CACHE,
    RESULTS,
    ROOT,
    CpuMeter,
    HttpConnection,
    HttpResponse,
    _descendants,
    _process_table,
    free_port,
    http_port_of_app,
    latency_summary,
    machine_info,
    ray_instance,
    serve_graph,
    temp_dir,
    update_doc_section,
    write_json,
)

NAME = "soak"
APP = "imagegen"
SERVE_NAMESPACE = "serve"  # where Serve names its replica actors (ray.serve._private.constants)
INGRESS_DEPLOYMENT = "ImageGenerationIngress"  # serve_app.app.INGRESS_DEPLOYMENT_NAME
HOST = "127.0.0.1"

# The request mix (per request, from each client's own seeded generator).
INVALID_SHARE = 0.03  # an unknown field: must be 400 invalid_request, nothing charged
IMAGE_TO_IMAGE_SHARE = 0.25  # `image` (64x64 PNG data URI) + strength 0.5
URL_SHARE = 0.2  # response_format: url
MAX_N = 3  # n uniform in 1..MAX_N
# Abandon-and-retry (--abandon-share of the valid requests): the client sends with an
# Idempotency-Key, closes its socket at a random moment within --abandon-within-s, then
# retries with the same key (as the README advises) until it gets its answer; now and then
# it abandons a retry too. Each key must end with its images delivered once and charged once.
RETRY_ABANDON_SHARE = 0.3
MAX_RETRIES = 60
STRENGTH = 0.5
INPUT_SIZE = 64

READY_TIMEOUT_S = 300.0  # first 200 from every model before the load starts
RECOVERY_WAIT_MAX_S = 180.0  # how long to watch a killed deployment come back
FAULT_IMPACT_WINDOW_S = 60.0  # errors "after a fault": completed within this long after it


# -- the request mix -------------------------------------------------------------------------
def input_images(count: int) -> list[str]:
    """Distinct small PNG inputs as data URIs (a shifted gradient with a square)."""
    from PIL import Image, ImageDraw

    uris = []
    for i in range(count):
        image = Image.new("RGB", (INPUT_SIZE, INPUT_SIZE))
        image.putdata([((x * 4 + i * 13) % 256, (y * 4 + i * 29) % 256, (i * 37) % 256)
                       for y in range(INPUT_SIZE) for x in range(INPUT_SIZE)])
        ImageDraw.Draw(image).rectangle((8, 16 + i % 16, 32, 40 + i % 16), fill=(20 + i * 7 % 200, 40, 60))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


@dataclass(frozen=True)
class PlannedRequest:
    kind: str  # "text", "image", "invalid"
    response_format: str  # "b64_json" or "url"
    n: int
    payload: dict[str, Any]


def plan_request(rng: random.Random, model: str, client: int, seq: int, images: list[str]) -> PlannedRequest:
    """The next request of a client: mostly valid generations, some image-to-image, some
    URL delivery, rarely an invalid one."""
    if rng.random() < INVALID_SHARE:
        payload = {"model": model, "prompt": f"soak client {client} request {seq}", "soak_unknown_field": True}
        return PlannedRequest("invalid", "b64_json", 1, payload)
    n = rng.randint(1, MAX_N)
    payload: dict[str, Any] = {"model": model, "prompt": f"soak client {client} request {seq}", "n": n,
                               "seed": rng.randrange(1_000_000)}
    kind = "text"
    if images and rng.random() < IMAGE_TO_IMAGE_SHARE:
        payload["image"] = images[(client + seq) % len(images)]
        payload["strength"] = STRENGTH
        kind = "image"
    response_format = "url" if rng.random() < URL_SHARE else "b64_json"
    if response_format == "url":
        payload["response_format"] = "url"
    return PlannedRequest(kind, response_format, n, payload)


# -- one request, as the client saw it -------------------------------------------------------
@dataclass
class Record:
    phase: str  # "warmup" or "load"
    client: int
    seq: int
    key: int
    model: str
    kind: str
    response_format: str
    n: int
    request_id: str
    start: float  # seconds since the load started (negative during the warm-up)
    end: float
    status: int  # 0: no HTTP response (connection error, client timeout)
    code: str | None  # the JSON error code; "connection_error", "client_timeout", "no_json_error"
    images: int  # images in a 200's data
    charged_units: int | None  # x-credits-charged, in micro-credits; None: no header
    idem_key: str | None = None  # the Idempotency-Key of an abandon-and-retry request
    final: bool = True  # the answer the client kept (False: an abandoned or refused attempt)
    replayed: bool = False  # a 200 with idempotent-replayed: true


def request_bytes(port: int, payload: dict[str, Any], api_key: str, request_id: str,
                  idem_key: str | None = None) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    idempotency = f"Idempotency-Key: {idem_key}\r\n" if idem_key else ""
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: Bearer {api_key}\r\nX-Request-Id: {request_id}\r\n"
        f"{idempotency}\r\n"
    )
    return head.encode() + body


def credits_header_units(value: str | None) -> int | None:
    if value is None:
        return None
    from serve_app.accounts.units import parse_credits

    try:
        return parse_credits(value)
    except ValueError:
        return None


def read_outcome(response: HttpResponse) -> tuple[str | None, int, int | None]:
    """(error code, images delivered, credits charged in units) of a response."""
    charged = credits_header_units(response.headers.get("x-credits-charged"))
    try:
        document = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if response.status == 200:
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            return "bad_200_body", 0, charged
        return None, len(data), charged
    error = document.get("error") if isinstance(document, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return (str(code) if code else "no_json_error"), 0, charged


class OneShotConnection(HttpConnection):
    """A keep-alive connection that never re-sends a request: a failure is an outcome."""

    async def send_once(self, raw: bytes) -> HttpResponse:
        if self._reader is not None and self._reader.at_eof():
            await self.close()  # the server closed it while idle: a new one, nothing was sent
        if self._writer is None:
            await self._connect()
        try:
            self._writer.write(raw)
            return await self._read_response()
        except BaseException:
            await self.close()
            raise


async def send(connection: OneShotConnection, raw: bytes, timeout_s: float,
               abandon_after_s: float | None = None) -> tuple[int, str | None, int, int | None, bool]:
    """(status, code, images, charged units, replayed); status 0 when no response came.
    ``abandon_after_s``: the client closes its socket then, whatever the server is doing."""
    try:
        response = await asyncio.wait_for(connection.send_once(raw), abandon_after_s or timeout_s)
    except asyncio.TimeoutError:
        return 0, ("abandoned" if abandon_after_s else "client_timeout"), 0, None, False
    except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
        return 0, "connection_error", 0, None, False
    code, images, charged = read_outcome(response)
    return response.status, code, images, charged, response.headers.get("idempotent-replayed") == "true"


# -- processes and their memory --------------------------------------------------------------
PROCESS_KINDS = (
    ("ray::ServeController", "serve_controller"),
    ("ray::ProxyActor", "proxy"),
    (f"ray::ServeReplica:{APP}:{INGRESS_DEPLOYMENT}", "ingress"),
    ("ray::RateLimiterActor", "rate_limiter"),
    ("ray::IDLE", "idle_worker"),
)


def process_kind(cmdline: str, *, driver: bool = False) -> str:
    """What a process of the Ray instance is, from its command line (Ray workers rename
    themselves ``ray::<ActorClass>[.<method>]``)."""
    if driver:
        return "driver (load generator)"
    for prefix, kind in PROCESS_KINDS:
        if cmdline.startswith(prefix):
            return kind
    match = re.match(rf"ray::ServeReplica:{APP}:(model-[A-Za-z0-9_-]+)", cmdline)
    if match:
        return f"replica {match.group(1)}"
    first = cmdline.split(" ", 1)[0]
    base = os.path.basename(first)
    if base == "raylet":
        return "raylet"
    if base == "gcs_server":
        return "gcs"
    for marker, kind in (("dashboard/agent.py", "dashboard_agent"), ("runtime_env/agent", "runtime_env_agent"),
                         ("log_monitor.py", "log_monitor"), ("dashboard/dashboard.py", "dashboard"),
                         ("monitor.py", "monitor")):
        if marker in cmdline:
            return kind
    if cmdline.startswith("ray::"):
        return "other_ray_worker"
    return "other"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part).strip()


def _rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - gone meanwhile
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def instance_pids(session_name: str | None) -> set[int]:
    """This benchmark's process tree (the driver started GCS and the raylet, the raylet the
    workers), plus any process naming this instance's session (in case one was re-parented).
    Another Ray instance on the machine is in neither."""
    table = _process_table()
    pids = _descendants(table, os.getpid())
    if session_name:
        for pid in table:
            if pid not in pids and session_name in _cmdline(pid):
                pids.add(pid)
    return pids


def sample_memory(session_name: str | None) -> list[dict[str, Any]]:
    """Every process of the instance: pid, kind, resident memory."""
    me = os.getpid()
    samples = []
    for pid in sorted(instance_pids(session_name)):
        cmdline = _cmdline(pid)
        rss = _rss_bytes(pid)
        if rss is None or (not cmdline and pid != me):
            continue  # gone, or a kernel-less zombie
        samples.append({"pid": pid, "kind": process_kind(cmdline, driver=pid == me), "rss_mib": round(rss / 2**20, 1),
                        "cmd": cmdline[:120]})
    return samples


def memory_by_kind(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """kind -> {processes, rss_mib (sum), max_rss_mib}, kinds sorted by name."""
    out: dict[str, dict[str, float]] = {}
    for sample in samples:
        entry = out.setdefault(sample["kind"], {"processes": 0, "rss_mib": 0.0, "max_rss_mib": 0.0})
        entry["processes"] += 1
        entry["rss_mib"] = round(entry["rss_mib"] + sample["rss_mib"], 1)
        entry["max_rss_mib"] = max(entry["max_rss_mib"], sample["rss_mib"])
    return dict(sorted(out.items()))


# -- Serve: find and kill replicas -----------------------------------------------------------
def _state_name(state: Any) -> str:
    return str(getattr(state, "value", state))


def running_replicas(details: dict[str, Any], app: str = APP) -> dict[str, list[dict[str, Any]]]:
    """deployment -> its RUNNING replicas (replica_id, actor_name, pid), from the
    controller's instance details (the dict serve.status() is built from)."""
    application = (details.get("applications") or {}).get(app) or {}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, deployment in (application.get("deployments") or {}).items():
        out[name] = [
            {"replica_id": r.get("replica_id"), "pid": r.get("pid"),
             "actor_name": r.get("actor_name") or f"SERVE_REPLICA::{app}#{name}#{r.get('replica_id')}"}
            for r in deployment.get("replicas") or ()
            if _state_name(r.get("state")) == "RUNNING"
        ]
    return out


def serve_details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def kill_replica(deployments: list[str], start_index: int) -> dict[str, Any]:
    """Kill one RUNNING replica of the first deployment, from ``start_index`` on (cyclic),
    that has one. Returns what was killed, and how many replicas that deployment ran."""
    import ray

    running = running_replicas(serve_details())
    for offset in range(len(deployments)):
        deployment = deployments[(start_index + offset) % len(deployments)]
        replicas = sorted(running.get(deployment) or [], key=lambda r: str(r["replica_id"]))
        if not replicas:
            continue
        victim = replicas[0]
        ray.kill(ray.get_actor(victim["actor_name"], namespace=SERVE_NAMESPACE), no_restart=True)
        return {"deployment": deployment, "replica_id": victim["replica_id"], "actor_name": victim["actor_name"],
                "pid": victim["pid"], "running_before": len(replicas), "killed": True}
    return {"deployment": None, "killed": False, "error": f"no RUNNING replica among {deployments}"}


def recovered(details: dict[str, Any], deployment: str, killed_replica: str, running_before: int) -> bool:
    """The deployment runs as many replicas as before the kill, none of them the killed one."""
    replicas = running_replicas(details).get(deployment) or []
    return sum(1 for r in replicas if r["replica_id"] != killed_replica) >= running_before


def fault_schedule(duration_s: float, kill_every_s: float, ingress_at_s: float | None) -> list[tuple[float, str]]:
    """(seconds after the load started, "model" or "ingress"), in time order; none in the
    last 5 s of the load."""
    faults: list[tuple[float, str]] = []
    if kill_every_s > 0:
        t = kill_every_s
        while t < duration_s - 5 and len(faults) < 10_000:
            faults.append((t, "model"))
            t += kill_every_s
    if ingress_at_s is not None and 0 < ingress_at_s < duration_s - 5:
        faults.append((ingress_at_s, "ingress"))
    return sorted(faults)


# -- the books -------------------------------------------------------------------------------
def open_reservations(db_path: Path) -> int:
    with sqlite3.connect(db_path, timeout=10) as conn:
        return conn.execute("SELECT COUNT(*) FROM reservations WHERE settled_at IS NULL").fetchone()[0]


def read_ledger(db_path: Path, stale_after_s: float) -> dict[str, Any]:
    """Per key: initial credits, balance, charged (credits and images), refunds; and the
    totals. Ledger conventions (serve_app/accounts/schema.py): reserve -(images x price),
    charge 0 with images = delivered, refund +(undelivered x price), credit +units."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        conn.execute("BEGIN")  # one snapshot
        keys = {}
        for key_id, name, balance in conn.execute("SELECT id, name, balance_units FROM keys ORDER BY id"):
            keys[key_id] = {"name": name, "balance_units": balance, "credited_units": 0, "reserved_units": 0,
                            "refunded_units": 0, "refunds": 0, "charged_images": 0, "ledger_sum_units": 0}
        for key_id, kind, rows, images, amount in conn.execute(
            "SELECT key_id, kind, COUNT(*), SUM(images), SUM(amount_units) FROM ledger GROUP BY key_id, kind"
        ):
            key = keys[key_id]
            key["ledger_sum_units"] += amount
            if kind == "credit":
                key["credited_units"] += amount
            elif kind == "reserve":
                key["reserved_units"] += -amount
            elif kind == "refund":
                key["refunded_units"] += amount
                key["refunds"] += rows
            elif kind == "charge":
                key["charged_images"] += images
        charged_by_model: dict[str, dict[str, int]] = {}
        for key_id, model, delivered, units in conn.execute(
            "SELECT key_id, model, SUM(delivered), SUM(delivered * price_units) FROM reservations"
            " WHERE settled_at IS NOT NULL GROUP BY key_id, model"
        ):
            keys[key_id].setdefault("charged_units_by_reservations", 0)
            keys[key_id]["charged_units_by_reservations"] += units
            entry = charged_by_model.setdefault(model, {"images": 0, "units": 0})
            entry["images"] += delivered
            entry["units"] += units
        total, open_count, stale = conn.execute(
            "SELECT COUNT(*), SUM(settled_at IS NULL),"
            " SUM(settled_at IS NOT NULL AND delivered = 0 AND settled_at - created >= ?) FROM reservations",
            (stale_after_s * 0.99,),
        ).fetchone()
        refund_rows, refund_images, refund_units = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(images), 0), COALESCE(SUM(amount_units), 0) FROM ledger WHERE kind = 'refund'"
        ).fetchone()
        settlements = {
            request_id: {"model": model, "images": images, "delivered": delivered, "price_units": price,
                         "settled": settled_at is not None}
            for request_id, model, images, delivered, price, settled_at in conn.execute(
                "SELECT request_id, model, images, delivered, price_units, settled_at FROM reservations"
            )
        }
    finally:
        conn.rollback()
        conn.close()
    for key in keys.values():
        # Money that left the balance for good: held, minus what came back.
        key["charged_units"] = key["reserved_units"] - key["refunded_units"]
        key.setdefault("charged_units_by_reservations", 0)
    return {
        "keys": list(keys.values()),
        "reservations": total or 0,
        "open_reservations": open_count or 0,
        "charged_units": sum(k["charged_units"] for k in keys.values()),
        "charged_units_by_reservations": sum(k["charged_units_by_reservations"] for k in keys.values()),
        "charged_images": sum(k["charged_images"] for k in keys.values()),
        "charged_by_model": dict(sorted(charged_by_model.items())),
        "refunds": {"count": refund_rows, "images": refund_images, "units": refund_units,
                    "stale_releases": stale or 0},
        "settlements": settlements,
    }


def client_totals(records: list[Record], price_units: dict[str, int], key_names: list[str]) -> dict[str, Any]:
    """What the clients were given and told: images of the answers they kept x price, and the
    sum of their x-credits-charged headers (of the 200s, and of anything else that carried
    one). An Idempotency-Key's answer counts once: a replay repeats the first one's charge."""
    per_key = {name: {"images": 0, "expected_units": 0, "header_units": 0} for name in key_names}
    images = expected = header_200 = header_other = missing_header = 0
    for r in records:
        if r.status == 200 and r.final:
            images += r.images
            expected += r.images * price_units[r.model]
            header_200 += r.charged_units or 0
            missing_header += r.charged_units is None
            entry = per_key[key_names[r.key]]
            entry["images"] += r.images
            entry["expected_units"] += r.images * price_units[r.model]
            entry["header_units"] += r.charged_units or 0
        elif r.status != 200 and r.charged_units:
            header_other += r.charged_units
    keyed = [r for r in records if r.idem_key is not None]
    retried = {
        "keys": len({r.idem_key for r in keyed}),
        "attempts": len(keyed),
        "abandoned_attempts": sum(r.code == "abandoned" for r in keyed),
        "in_use_409s": sum(r.code == "idempotency_key_in_use" for r in keyed),
        "replayed_200s": sum(r.replayed for r in keyed),
        "keys_without_an_answer": len({r.idem_key for r in keyed} - {r.idem_key for r in keyed if r.final}),
    }
    return {"images": images, "expected_units": expected, "header_units_200": header_200,
            "header_units_not_200": header_other, "200s_without_header": missing_header, "per_key": per_key,
            "abandon_and_retry": retried}


def reconcile(records: list[Record], settlements: dict[str, dict[str, Any]], limit: int = 20) -> dict[str, Any]:
    """Request by request (the client sends its own x-request-id, which the ingress uses for
    the reservation): where the ledger and the client disagree. The attempts of one
    Idempotency-Key are one request: what all their reservations charged must be the images
    of the answer the client kept."""
    seen = {r.request_id for r in records}
    mismatches = []
    counts: Counter[str] = Counter()

    def charged(request_ids: list[str]) -> int:
        return sum((settlements.get(rid) or {}).get("delivered") or 0 for rid in request_ids)

    for r in records:
        if r.idem_key is not None:
            continue
        settlement = settlements.get(r.request_id)
        if settlement is None:
            if r.status == 200:
                counts["200 without a reservation"] += 1
                mismatches.append({"request_id": r.request_id, "what": "200 without a reservation", "status": 200})
            continue
        delivered = settlement["delivered"] or 0
        if r.status == 200 and delivered != r.images:
            counts["200 with other images than charged"] += 1
            mismatches.append({"request_id": r.request_id, "what": "200 with other images than charged",
                               "client_images": r.images, "charged_images": delivered})
        elif r.status != 200 and delivered > 0:
            counts["charged but no 200"] += 1
            mismatches.append({"request_id": r.request_id, "what": "charged but no 200", "status": r.status,
                               "code": r.code, "charged_images": delivered, "t_s": round(r.end, 1)})
    by_key: dict[str, list[Record]] = {}
    for r in records:
        if r.idem_key is not None:
            by_key.setdefault(r.idem_key, []).append(r)
    for idem_key, attempts in by_key.items():
        kept = [r for r in attempts if r.final and r.status == 200]
        got = sum(r.images for r in kept)
        paid = charged([r.request_id for r in attempts])
        if len(kept) > 1 or paid != got:
            counts["idempotency key charged other images than delivered"] += 1
            mismatches.append({"idempotency_key": idem_key, "what": "charged != delivered", "client_images": got,
                               "charged_images": paid, "attempts": [(r.status, r.code) for r in attempts]})
    for request_id in settlements:
        if request_id not in seen:
            counts["reservation no client sent"] += 1
            mismatches.append({"request_id": request_id, "what": "reservation no client sent"})
    return {"counts": dict(counts), "examples": mismatches[:limit]}


def ledger_checks(ledger: dict[str, Any], clients: dict[str, Any], initial_units: int,
                  inconsistencies: list[str]) -> list[dict[str, Any]]:
    """The pass/fail checks of the books."""
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    check("no reservation left open", ledger["open_reservations"] == 0, f"{ledger['open_reservations']} open")
    check("every balance equals its ledger (store.inconsistencies())", not inconsistencies,
          "; ".join(inconsistencies[:5]) or "none")
    check("ledger: held - refunded == delivered x price of each reservation",
          ledger["charged_units"] == ledger["charged_units_by_reservations"],
          f"{fmt_units(ledger['charged_units'])} vs {fmt_units(ledger['charged_units_by_reservations'])} credits")
    check("credits charged == images delivered to clients x price",
          ledger["charged_units"] == clients["expected_units"],
          f"ledger {fmt_units(ledger['charged_units'])} vs clients {fmt_units(clients['expected_units'])}")
    check("credits charged == sum of x-credits-charged of the 200s",
          ledger["charged_units"] == clients["header_units_200"] and clients["200s_without_header"] == 0,
          f"ledger {fmt_units(ledger['charged_units'])} vs headers {fmt_units(clients['header_units_200'])}"
          + (f", {clients['200s_without_header']} 200s without the header" if clients["200s_without_header"] else ""))
    by_name = {k["name"]: k for k in ledger["keys"]}
    wrong = []
    for name, seen in clients["per_key"].items():
        key = by_name.get(name)
        expected = initial_units - seen["header_units"]
        if key is None or key["balance_units"] != expected:
            wrong.append(f"{name}: balance {key and fmt_units(key['balance_units'])} != {fmt_units(expected)}")
    check("each key's balance == its credits - the charges it was told of", not wrong,
          "; ".join(wrong[:5]) or f"{len(clients['per_key'])} keys")
    return checks


def fmt_units(units: int | None) -> str:
    if units is None:
        return "-"
    from serve_app.accounts.units import format_credits

    return ("-" if units < 0 else "") + format_credits(abs(units))


# -- the load --------------------------------------------------------------------------------
def summarize_load(records: list[Record], duration_s: float) -> dict[str, Any]:
    """Counts of the load phase: statuses, error codes, images, per model and kind."""
    load = [r for r in records if r.phase == "load"]
    in_window = [r for r in load if r.end <= duration_s]
    statuses = Counter(str(r.status) for r in load)
    codes = Counter(f"{r.status} {r.code}" for r in load if r.status != 200)
    by_model: dict[str, dict[str, Any]] = {}
    by_kind: dict[str, dict[str, Any]] = {}
    for r in load:
        for table, name in ((by_model, r.model), (by_kind, f"{r.kind}/{r.response_format}")):
            entry = table.setdefault(name, {"requests": 0, "images": 0, "statuses": Counter()})
            entry["requests"] += 1
            entry["images"] += r.images
            entry["statuses"][str(r.status)] += 1
    for table in (by_model, by_kind):
        for entry in table.values():
            entry["statuses"] = dict(sorted(entry["statuses"].items()))
    unexpected = {
        "invalid not 400": sum(1 for r in load if r.kind == "invalid" and r.status not in (400, 0, 500, 502, 503, 504)),
        "invalid with 200": sum(1 for r in load if r.kind == "invalid" and r.status == 200),
        "valid with 400": sum(1 for r in load if r.kind != "invalid" and r.status == 400),
        "200 with fewer images than n": sum(1 for r in load if r.status == 200 and r.images < r.n),
    }
    images = sum(r.images for r in in_window)
    timeline = []
    bucket = 10.0
    for i in range(int(duration_s // bucket) + 1):
        lo, hi = i * bucket, (i + 1) * bucket
        rows = [r for r in load if lo <= r.end < hi]
        if rows or hi <= duration_s:
            timeline.append({"t_s": lo, "ok": sum(r.status == 200 for r in rows),
                             "errors": sum(r.status != 200 for r in rows), "images": sum(r.images for r in rows)})
    return {
        "requests": len(load),
        "last_end_s": round(max((r.end for r in load), default=0.0), 1),
        "requests_in_window": len(in_window),
        "images": sum(r.images for r in load),
        "images_in_window": images,
        "images_per_s": round(images / duration_s, 2) if duration_s > 0 else 0.0,
        "requests_per_s": round(len(in_window) / duration_s, 2) if duration_s > 0 else 0.0,
        "statuses": dict(sorted(statuses.items())),
        "errors_by_code": dict(sorted(codes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "latency_200": latency_summary([r.end - r.start for r in load if r.status == 200]),
        "by_model": dict(sorted(by_model.items())),
        "by_kind": dict(sorted(by_kind.items())),
        "unexpected": unexpected,
        "timeline_10s": timeline,
    }


def fault_impact(faults: list[dict[str, Any]], records: list[Record], window_s: float = FAULT_IMPACT_WINDOW_S) -> None:
    """Per fault: the error responses (by code) completed in the next ``window_s`` (or
    until the next fault), in place."""
    load = [r for r in records if r.phase == "load"]
    times = [f["t_s"] for f in faults]
    for i, fault in enumerate(faults):
        until = min(fault["t_s"] + window_s, times[i + 1] if i + 1 < len(times) else float("inf"))
        rows = [r for r in load if fault["t_s"] <= r.end < until]
        fault["window_s"] = round(until - fault["t_s"], 1) if until != float("inf") else window_s
        fault["errors_after"] = dict(Counter(f"{r.status} {r.code}" for r in rows if r.status != 200))
        fault["ok_after"] = sum(r.status == 200 for r in rows)


async def run_load(port: int, keys: list[str], models: list[str], args, on_start, faults_task_factory,
                   memory_task_factory) -> tuple[list[Record], float]:
    """``args.clients`` closed-loop clients for ``args.duration_s``; returns every record
    and the load's start (perf_counter)."""
    images = input_images(8)
    records: list[Record] = []
    t0 = time.perf_counter()
    end_at = t0 + args.duration_s
    run_tag = f"{int(time.time()):x}"

    async def client(index: int) -> None:
        rng = random.Random(args.seed * 1_000_003 + index)
        connection = OneShotConnection(HOST, port)
        key_index = index % len(keys)
        seq = 0

        async def attempt(planned: PlannedRequest, model: str, request_id: str, idem_key: str | None,
                          abandon_after_s: float | None) -> Record:
            """One attempt; its answer is the one the client keeps unless it was abandoned
            before the answer came (or told the key is in use)."""
            nonlocal connection
            raw = request_bytes(port, planned.payload, keys[key_index], request_id, idem_key)
            start = time.perf_counter()
            status, code, got, charged, replayed = await send(connection, raw, args.client_timeout_s,
                                                              abandon_after_s)
            if code == "abandoned":
                connection = OneShotConnection(HOST, port)  # the old socket was closed mid-request
            record = Record("load", index, seq, key_index, model, planned.kind, planned.response_format,
                            planned.n, request_id, start - t0, time.perf_counter() - t0, status, code, got, charged,
                            idem_key, status != 0 and code != "idempotency_key_in_use", replayed)
            records.append(record)
            return record

        try:
            while time.perf_counter() < end_at and seq < 1_000_000:
                model = models[(index + seq) % len(models)]
                planned = plan_request(rng, model, index, seq, images)
                request_id = f"soak-{run_tag}-{index}-{seq}"
                if planned.kind != "invalid" and rng.random() < args.abandon_share:
                    # Abandon, then retry with the same key until the answer comes.
                    idem_key = request_id
                    record = await attempt(planned, model, request_id, idem_key,
                                           rng.uniform(0.0, args.abandon_within_s))
                    for retry in range(1, MAX_RETRIES + 1):
                        if record.status not in (0, 409) or time.perf_counter() > end_at + args.client_timeout_s:
                            break
                        if record.code == "idempotency_key_in_use":
                            await asyncio.sleep(rng.uniform(0.05, 0.5))  # Retry-After, shortened
                        abandon = rng.uniform(0.0, args.abandon_within_s) if rng.random() < RETRY_ABANDON_SHARE else None
                        record = await attempt(planned, model, f"{request_id}-r{retry}", idem_key, abandon)
                else:
                    record = await attempt(planned, model, request_id, None, None)
                seq += 1
                if record.status == 0 and record.code != "abandoned":
                    await asyncio.sleep(0.2)  # no server to talk to: don't spin
        finally:
            await connection.close()

    on_start()
    side_tasks = [asyncio.create_task(faults_task_factory(t0)), asyncio.create_task(memory_task_factory(t0, end_at))]
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    for task in side_tasks:  # each is bounded in time; wait for the last recovery to be seen
        try:
            await asyncio.wait_for(task, RECOVERY_WAIT_MAX_S + 30)
        except asyncio.TimeoutError:
            print(f"  side task {task.get_name()} did not finish in time", file=sys.stderr, flush=True)
    return records, t0


async def inject_faults(t0: float, schedule: list[tuple[float, str]], model_deployments: list[str],
                        duration_s: float, log: list[dict[str, Any]]) -> None:
    """Kill as scheduled; after each kill, watch the deployment until it runs as many
    replicas as before (bounded by the next fault and RECOVERY_WAIT_MAX_S)."""
    model_turn = 0
    for i, (at, what) in enumerate(schedule):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t_kill = time.perf_counter() - t0
        entry: dict[str, Any] = {"t_s": round(t_kill, 1), "fault": what,
                                 "wall_time": time.strftime("%H:%M:%S")}
        try:
            if what == "model":
                entry.update(await asyncio.to_thread(kill_replica, model_deployments, model_turn))
                model_turn += 1
            else:
                entry.update(await asyncio.to_thread(kill_replica, [INGRESS_DEPLOYMENT], 0))
        except Exception as exc:  # noqa: BLE001 - a failed injection is a finding, not a crash
            entry.update({"killed": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(f"  t={entry['t_s']:6.1f}s kill {what}: {entry.get('deployment')} {entry.get('replica_id')} "
              f"pid {entry.get('pid')} {'' if entry.get('killed') else entry.get('error')}", flush=True)
        log.append(entry)
        if not entry.get("killed"):
            continue
        next_at = schedule[i + 1][0] if i + 1 < len(schedule) else duration_s + RECOVERY_WAIT_MAX_S
        deadline = t0 + min(t_kill + RECOVERY_WAIT_MAX_S, next_at)
        entry["recovered_after_s"] = None
        while time.perf_counter() < deadline:
            await asyncio.sleep(1.0)
            try:
                details = await asyncio.to_thread(serve_details)
            except Exception as exc:  # noqa: BLE001 - the controller is busy; ask again
                print(f"  serve details: {type(exc).__name__}: {exc}"[:200], file=sys.stderr, flush=True)
                continue
            if recovered(details, entry["deployment"], entry["replica_id"], entry["running_before"]):
                entry["recovered_after_s"] = round(time.perf_counter() - t0 - t_kill, 1)
                break
        print(f"  {entry['deployment']} running again after {entry['recovered_after_s']} s", flush=True)


async def sample_memory_every(t0: float, end_at: float, every_s: float, session: str | None,
                              timeline: list[dict[str, Any]]) -> None:
    for _ in range(100_000):
        await asyncio.sleep(min(every_s, max(end_at - time.perf_counter(), 0)))
        if time.perf_counter() >= end_at:
            return
        samples = await asyncio.to_thread(sample_memory, session)
        timeline.append({"t_s": round(time.perf_counter() - t0, 1),
                         "rss_mib": {k: v["rss_mib"] for k, v in memory_by_kind(samples).items()}})


async def wait_until_ready(port: int, key: str, models: list[str], records: list[Record]) -> dict[str, float]:
    """One n=1 request per model until each gives a 200 (503 while a replica loads)."""
    ready: dict[str, float] = {}
    connection = OneShotConnection(HOST, port)
    started = time.perf_counter()
    try:
        for model in models:
            for attempt in range(10_000):
                if time.perf_counter() - started > READY_TIMEOUT_S:
                    raise RuntimeError(f"model {model} gave no 200 within {READY_TIMEOUT_S:g} s: {records[-1:]}")
                request_id = f"soak-warmup-{model}-{attempt}-{int(time.time())}"
                payload = {"model": model, "prompt": "warm-up", "n": 1, "seed": attempt}
                t = time.perf_counter()
                status, code, got, charged, _ = await send(connection, request_bytes(port, payload, key, request_id), 120)
                records.append(Record("warmup", -1, attempt, 0, model, "text", "b64_json", 1, request_id,
                                      t - started, time.perf_counter() - started, status, code, got, charged))
                if status == 200:
                    ready[model] = round(time.perf_counter() - started, 1)
                    break
                await asyncio.sleep(2.0)
    finally:
        await connection.close()
    return ready


# -- the served graph ------------------------------------------------------------------------
def soak_config(data_dir: Path, *, release_stale_after_s: float | None, release_stale_every_s: float | None):
    """The embedded default (serve_config.yaml's args: every model that generates, with its
    autoscaling; the request mix has no edits, so edit-only models are left out), with its own
    database and image folder under ``data_dir`` and the tests' model cache."""
    from serve_app.config import AppConfig, load_app_config
    from serve_app.work import Mode

    base = load_app_config(ROOT / "serve_config.yaml")
    base = base.model_copy(update={"models": [m for m in base.models if m.rules.base_mode is Mode.TEXT_TO_IMAGE]})
    accounts: dict[str, Any] = {"database_url": f"sqlite:///{data_dir}/imagegen.db"}
    if release_stale_after_s is not None:
        accounts["release_stale_after_s"] = release_stale_after_s
    if release_stale_every_s is not None:
        accounts["release_stale_every_s"] = release_stale_every_s
    config = base.model_copy(update={
        "cache_dir": MODEL_CACHE,
        "accounts": base.accounts.model_copy(update=accounts),
        "storage": base.storage.model_copy(
            update={"local": base.storage.local.model_copy(update={"root": data_dir / "images"})}),
    })
    return AppConfig.model_validate(config.model_dump())  # re-run the validators on the changes


def create_keys(database_url: str, count: int, credits: str, rpm: int, ipm: int, tag: str) -> list[tuple[str, str]]:
    """(name, secret) of ``count`` keys, made through the accounts store API."""
    from serve_app.accounts import issue_key, open_store, parse_credits

    store = open_store(database_url)
    try:
        return [(f"soak-{tag}-{i}", issue_key(store, f"soak-{tag}-{i}", credits_units=parse_credits(credits),
                                              rpm=rpm, ipm=ipm).secret)
                for i in range(count)]
    finally:
        store.close()


def settle_wait(db_path: Path, timeout_s: float) -> dict[str, Any]:
    """Poll until no reservation is open (a killed ingress's are released as stale by the
    surviving ingress's sweeper), at most ``timeout_s``."""
    started = time.perf_counter()
    open_now = open_reservations(db_path)
    first = open_now
    while open_now and time.perf_counter() - started < timeout_s:
        time.sleep(2.0)
        open_now = open_reservations(db_path)
    return {"open_at_load_end": first, "open_left": open_now, "waited_s": round(time.perf_counter() - started, 1),
            "timeout_s": round(timeout_s, 1)}


def run(args) -> dict[str, Any]:
    import ray

    from serve_app.accounts import open_store, parse_credits

    os.environ.pop("IMAGEGEN_DATABASE_URL", None)  # our own database, whatever the shell says
    started_wall = time.time()
    doc: dict[str, Any] = {"benchmark": NAME, "quick": args.quick,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_wall)),
                           "machine": machine_info()}
    with temp_dir("imagegen-soak-") as tmp, ray_instance(num_cpus=2):
        data = Path(tmp)
        config = soak_config(data, release_stale_after_s=args.release_stale_after_s,
                             release_stale_every_s=args.release_stale_every_s)
        models = [m.id for m in config.models]
        deployments = [m.deployment_name for m in config.models]
        prices = {m.id: m.price_units for m in config.models}
        stale_after = config.stale_reservation_after_s
        stale_every = config.accounts.release_stale_every_s
        session = None
        try:
            session = ray._private.worker.global_worker.node.session_name
        except Exception as exc:  # noqa: BLE001 - only a fallback for finding processes
            print(f"  no Ray session name ({type(exc).__name__}): processes found by ancestry only", flush=True)
        print(f"serving {', '.join(models)} (Ray session {session}) ...", flush=True)
        proxy_port = free_port()
        t = time.perf_counter()
        serve_graph(config, proxy_port, first=True)
        port = http_port_of_app(proxy_port)
        deploy_s = round(time.perf_counter() - t, 1)
        db_path = Path(config.accounts.database_url[len("sqlite:///"):])
        tag = f"{int(started_wall):x}"
        keys = create_keys(config.accounts.database_url, args.keys, args.credits, args.key_rpm, args.key_ipm, tag)
        warm_key = create_keys(config.accounts.database_url, 1, args.credits, args.key_rpm, args.key_ipm,
                               tag + "-warmup")[0]
        key_names = [name for name, _ in keys] + [warm_key[0]]
        records: list[Record] = []
        ready = asyncio.run(wait_until_ready(port, warm_key[1], models, records))
        for r in records:
            r.key = len(keys)  # the warm-up key, last in key_names
        print(f"  deployed in {deploy_s} s; first 200 per model at {ready} s", flush=True)

        memory_start = sample_memory(session)
        schedule = fault_schedule(args.duration_s, args.kill_every_s, args.ingress_kill_at_s)
        print(f"load: {args.clients} clients, {args.keys} keys, {args.duration_s:g} s; faults at "
              f"{[(round(at), what) for at, what in schedule]}", flush=True)
        fault_log: list[dict[str, Any]] = []
        memory_timeline: list[dict[str, Any]] = []
        meter = CpuMeter()
        load_records, _ = asyncio.run(run_load(
            port, [secret for _, secret in keys], models, args, meter.start,
            lambda t0: inject_faults(t0, schedule, deployments, args.duration_s, fault_log),
            lambda t0, end_at: sample_memory_every(t0, end_at, args.memory_every_s, session, memory_timeline),
        ))
        cpu = meter.stop()
        load_end = max((r.end for r in load_records), default=args.duration_s)
        records += load_records
        print(f"  load done: {len(load_records)} requests; waiting for reservations to settle ...", flush=True)

        # A killed ingress's reservations are released stale_after s after they were made,
        # by a sweep every stale_every s: wait for the last possible one, plus a margin.
        ingress_kills = [f["t_s"] for f in fault_log if f["fault"] == "ingress" and f.get("killed")]
        timeout = args.settle_timeout_s
        if timeout is None:
            timeout = max(60.0, max((at + stale_after + stale_every + 60 - load_end for at in ingress_kills),
                                    default=60.0))
        settle = settle_wait(db_path, timeout)
        memory_end = sample_memory(session)
        print(f"  settle: {settle}", flush=True)

        ledger = read_ledger(db_path, stale_after)
        store = open_store(config.accounts.database_url)
        try:
            inconsistencies = store.inconsistencies()
        finally:
            store.close()
        clients = client_totals(records, prices, key_names)
        doc["checks"] = ledger_checks(ledger, clients, parse_credits(args.credits), inconsistencies)
        doc["reconciliation"] = reconcile(records, ledger.pop("settlements"))
        wrong_keys = doc["reconciliation"]["counts"].get("idempotency key charged other images than delivered", 0)
        retried = clients["abandon_and_retry"]
        doc["checks"].append({
            "check": "every abandoned-and-retried Idempotency-Key: answered once, charged for exactly its images",
            "ok": wrong_keys == 0 and retried["keys_without_an_answer"] == 0,
            "detail": f"{retried['keys']} keys, {retried['attempts']} attempts ({retried['abandoned_attempts']} "
                      f"abandoned, {retried['in_use_409s']} told in use, {retried['replayed_200s']} replayed); "
                      f"{wrong_keys} mischarged, {retried['keys_without_an_answer']} unanswered",
        })
        fault_impact(fault_log, load_records)
        doc.update({
            "config": {
                "duration_s": args.duration_s, "clients": args.clients, "keys": args.keys,
                "credits_per_key": args.credits, "key_rpm": args.key_rpm, "key_ipm": args.key_ipm,
                "kill_every_s": args.kill_every_s, "ingress_kill_at_s": args.ingress_kill_at_s,
                "client_timeout_s": args.client_timeout_s, "seed": args.seed, "ray_num_cpus": 2,
                "abandon_share": args.abandon_share, "abandon_within_s": args.abandon_within_s,
                "release_stale_after_s": stale_after, "release_stale_every_s": stale_every,
                "mix": {"invalid": INVALID_SHARE, "image_to_image": IMAGE_TO_IMAGE_SHARE, "url": URL_SHARE,
                        "n": f"1..{MAX_N}", "strength": STRENGTH, "input": f"{INPUT_SIZE}x{INPUT_SIZE} PNG data URI"},
                "models": [{"id": m.id, "price_per_image": str(m.price_per_image),
                            "autoscaling_config": m.deployment.autoscaling_config,
                            "num_cpus": m.deployment.ray_actor_options.get("num_cpus")} for m in config.models],
                "http": "proxy" if port == proxy_port else "direct ingress",
            },
            "deploy_s": deploy_s,
            "ready_s": ready,
            "load": summarize_load(records, args.duration_s),
            "warmup_requests": sum(r.phase == "warmup" for r in records),
            "cpu": cpu,
            "faults": fault_log,
            "settle": settle,
            "ledger": ledger,
            "clients": clients,
            "inconsistencies": inconsistencies[:50],
            "memory": {"start": memory_by_kind(memory_start), "end": memory_by_kind(memory_end),
                       "timeline": memory_timeline, "start_processes": memory_start, "end_processes": memory_end},
        })
    doc["elapsed_s"] = round(time.time() - started_wall, 1)
    doc["notes"] = auto_notes(doc) + list(args.note)
    return doc


# -- report ----------------------------------------------------------------------------------
def auto_notes(doc: dict[str, Any]) -> list[str]:
    notes = []
    counts = doc.get("reconciliation", {}).get("counts", {})
    if counts.get("charged but no 200"):
        notes.append(f"{counts['charged but no 200']} request(s) were charged although the client got no 200 "
                     "(see reconciliation.examples in the JSON: when, and what the client got).")
    for what, n in doc.get("load", {}).get("unexpected", {}).items():
        if n:
            notes.append(f"Unexpected: {n} x {what}.")
    for fault in doc.get("faults", []):
        if fault.get("killed") and fault.get("recovered_after_s") is None:
            notes.append(f"{fault['deployment']} killed at {fault['t_s']} s did not show its replicas RUNNING again "
                         "before the next fault (or within the watch).")
        if not fault.get("killed"):
            notes.append(f"The {fault['fault']} fault at {fault['t_s']} s was not injected: {fault.get('error')}.")
    settle = doc.get("settle", {})
    if settle.get("open_left"):
        notes.append(f"{settle['open_left']} reservation(s) were still open after waiting {settle['waited_s']} s.")
    foreign = doc.get("cpu", {}).get("foreign_cores", 0)
    if foreign > 0.15:
        notes.append(f"Other processes used {foreign} cores on average during the load: the throughput is disturbed.")
    return notes


def markdown(doc: dict[str, Any]) -> str:
    c, load, m = doc["config"], doc["load"], doc["machine"]
    ledger, clients = doc["ledger"], doc["clients"]
    models = ", ".join(f"{x['id']} ({x['price_per_image']} credit{'s' if x['price_per_image'] != '1' else ''}/image)"
                       for x in c["models"])
    lines = [
        "## Soak with faults (issue \"Hardening\")",
        "",
        f"`python bench/soak.py` — the embedded default ({models}; each 1-2 replicas by autoscaling, "
        f"one ingress replica, Serve's HTTP proxy), its own Ray instance (2 CPUs) and SQLite database. "
        f"{c['clients']} closed-loop clients over {c['keys']} keys and the three models for {c['duration_s']:g} s: "
        f"n=1..{MAX_N}, {IMAGE_TO_IMAGE_SHARE:.0%} image-to-image ({INPUT_SIZE}x{INPUT_SIZE} PNG data URI, strength "
        f"{STRENGTH}), {URL_SHARE:.0%} `response_format: url`, {INVALID_SHARE:.0%} invalid (must be 400); no retries. "
        f"A model replica killed every {c['kill_every_s']:g} s (the models in turn), the ingress replica once. "
        f"Stale reservations released after {c['release_stale_after_s']:g} s. Machine: {m['nproc']} cores "
        f"({m['cpu_model']}), ray {m['versions']['ray']}, torch {m['versions']['torch']}.",
        "",
        "| | |",
        "|---|---|",
        f"| duration | {c['duration_s']:g} s (the last in-flight request returned at {load['last_end_s']:g} s) |",
        f"| requests | {load['requests']} ({load['requests_per_s']:.1f}/s) |",
        f"| images delivered | {load['images']} ({load['images_per_s']:.2f} images/s in the {c['duration_s']:g} s) |",
        f"| statuses | {', '.join(f'{k}: {v}' for k, v in load['statuses'].items())} |",
        f"| errors by code | {', '.join(f'{k}: {v}' for k, v in load['errors_by_code'].items()) or 'none'} |",
        f"| latency of 200s | p50 {load['latency_200']['p50_ms']:.0f} ms, p95 {load['latency_200']['p95_ms']:.0f} ms, "
        f"max {load['latency_200']['max_ms']:.0f} ms |",
        f"| refunds | {ledger['refunds']['count']} ({ledger['refunds']['images']} images, "
        f"{fmt_units(ledger['refunds']['units'])} credits; {ledger['refunds']['stale_releases']} released as stale) |",
        f"| credits charged | {fmt_units(ledger['charged_units'])} for {ledger['charged_images']} images "
        f"(clients got {clients['images']} images in 200s) |",
        f"| reservations open after the load | {doc['settle']['open_at_load_end']}, "
        f"{doc['settle']['open_left']} after waiting {doc['settle']['waited_s']:g} s |",
        "",
        "Faults (seconds after the load started; errors: responses completed in the next "
        f"{FAULT_IMPACT_WINDOW_S:g} s or until the next fault):",
        "",
        "| t | killed | running again after | errors after | 200s after |",
        "|---:|---|---:|---|---:|",
    ]
    for f in doc["faults"]:
        what = f"{f['fault']}: {f.get('deployment')} (pid {f.get('pid')})" if f.get("killed") else \
            f"{f['fault']}: not injected ({f.get('error')})"
        back = "-" if f.get("recovered_after_s") is None else f"{f['recovered_after_s']:g} s"
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(f.get("errors_after", {}).items())) or "none"
        lines.append(f"| {f['t_s']:g} s | {what} | {back} | {errors} | {f.get('ok_after', 0)} |")
    lines += [
        "",
        "Resident memory by process kind (sum over the kind's processes; replicas that were killed are replaced "
        "by new processes):",
        "",
        "| process | start MiB | end MiB |",
        "|---|---:|---:|",
    ]
    start, end = doc["memory"]["start"], doc["memory"]["end"]
    for kind in sorted(set(start) | set(end)):
        def cell(side: dict[str, Any], kind: str = kind) -> str:
            entry = side.get(kind)
            if not entry:
                return "-"
            return f"{entry['rss_mib']:.0f}" + (f" ({entry['processes']})" if entry["processes"] > 1 else "")
        lines.append(f"| {kind} | {cell(start)} | {cell(end)} |")
    lines += ["", "Checks of the books after the load:", "", "| check | result |", "|---|---|"]
    for check in doc["checks"]:
        lines.append(f"| {check['check']} | {'pass' if check['ok'] else '**FAIL**'}: {check['detail']} |")
    lines += [""] + [f"- {note}" for note in doc.get("notes", [])]
    return "\n".join(lines).rstrip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="60 s, a model kill every 20 s, the ingress at 30 s, stale release after 90 s "
                             "(swept every 5 s); prints, writes nothing")
    parser.add_argument("--duration-s", type=float, default=600.0, help="load duration (default 600)")
    parser.add_argument("--clients", type=int, default=12, help="closed-loop HTTP clients (default 12)")
    parser.add_argument("--keys", type=int, default=4, help="API keys the clients share (default 4)")
    parser.add_argument("--credits", default="1000000", help="initial credits per key (default 1000000)")
    parser.add_argument("--key-rpm", type=int, default=1_000_000,
                        help="each key's requests per minute (default: high enough that no 429 happens)")
    parser.add_argument("--key-ipm", type=int, default=1_000_000, help="each key's images per minute")
    parser.add_argument("--kill-every-s", type=float, default=120.0,
                        help="kill a model replica this often (default 120; 0: never)")
    parser.add_argument("--ingress-kill-at-s", type=float, default=None,
                        help="kill the ingress replica this long after the load starts (default: half the "
                             "duration; negative: never)")
    parser.add_argument("--client-timeout-s", type=float, default=180.0,
                        help="a client gives up on a request after this (recorded as client_timeout)")
    parser.add_argument("--release-stale-after-s", type=float, default=None,
                        help="accounts.release_stale_after_s (default: the config's, 2 x 60 s + 300 s); must "
                             "exceed every model's timeout_s")
    parser.add_argument("--release-stale-every-s", type=float, default=None,
                        help="accounts.release_stale_every_s (default: the config's, 60 s)")
    parser.add_argument("--settle-timeout-s", type=float, default=None,
                        help="how long to wait for open reservations after the load (default: until the last "
                             "stale release can have happened, plus 60 s)")
    parser.add_argument("--abandon-share", type=float, default=0.2,
                        help="share of valid requests sent with an Idempotency-Key, abandoned (socket closed) at a "
                             "random moment and retried with the same key until answered (default 0.2)")
    parser.add_argument("--abandon-within-s", type=float, default=1.5,
                        help="an abandoned attempt closes its socket uniformly within this many seconds")
    parser.add_argument("--memory-every-s", type=float, default=60.0, help="memory timeline interval (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--note", action="append", default=[], help="a note for the docs section; repeatable")
    parser.add_argument("--output", type=Path, default=RESULTS / f"{NAME}.json", help="JSON result")
    args = parser.parse_args()
    if args.quick:
        args.duration_s, args.kill_every_s = 60.0, 20.0
        args.memory_every_s = min(args.memory_every_s, 15.0)
        if args.release_stale_after_s is None:
            args.release_stale_after_s = 90.0
        if args.release_stale_every_s is None:
            args.release_stale_every_s = 5.0
    if args.ingress_kill_at_s is None:
        args.ingress_kill_at_s = args.duration_s / 2
    elif args.ingress_kill_at_s < 0:
        args.ingress_kill_at_s = None
    if args.clients < 1 or args.keys < 1 or args.duration_s <= 0:
        parser.error("--clients, --keys and --duration-s must be positive")

    doc = run(args)
    print(markdown(doc))
    print(json.dumps({"checks": doc["checks"], "reconciliation": doc["reconciliation"]["counts"]}, indent=1))
    if not args.quick:
        write_json(args.output, doc)
        update_doc_section(NAME, markdown(doc))
        print(f"wrote {args.output} and docs/benchmarks.md")
    return 0 if all(check["ok"] for check in doc["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
