"""Autoscaling shown: a model going from 1 to N replicas under load and back, and from 0 to 1.

    flock /tmp/ray.lock python bench/autoscaling.py [--quick]

On its own local Ray instance (loopback only, never an existing cluster), the embedded
default's tiny-sdxl is served twice:

- ``tiny-sdxl`` with ``autoscaling_config: {min_replicas: 1, max_replicas: N, ...}``;
- ``tiny-sdxl-cold``, the same model with ``min_replicas: 0``: no replica until asked.

Phases, each bounded in time, each followed by a ledger check:

1. ``one replica``: light load (2 clients) on tiny-sdxl at 1 replica.
2. ``scale up``: heavy load (16 clients) until Serve runs N replicas; the time from the load
   starting to N replicas RUNNING is the time to scale up.
3. ``N replicas``: the same heavy load, measured with N replicas running.
4. ``scale down``: light load again until Serve is back at 1 replica (requests keep flowing
   while replicas are stopped).
5. ``from zero``: one request to tiny-sdxl-cold, at 0 replicas: the time to its first image.

Images/s are counted per phase from the responses. The ledger check after each phase: no
request lost (every request sent got a 200), none charged twice (the key's charged images
and credits in the database equal the images received and the ``x-credits-charged``
headers summed), no credits left held, and every balance equal to its ledger.

On a 2-core machine replicas beyond two only share the same cores (the Ray CPU count is
raised so that N replicas can be scheduled at all): what this shows is that scaling
happens, how long it takes, and that nothing is lost or double-charged while it does. Writes bench/results/autoscaling.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    HttpConnection,
    bench_config,
    create_key,
    free_port,
    machine_info,
    post_json_bytes,
    ray_instance,
    serve_graph,
    temp_dir,
    update_doc_section,
    write_json,
)

MODEL, COLD = "tiny-sdxl", "tiny-sdxl-cold"
HOST = "127.0.0.1"


# -- the served graph ----------------------------------------------------------------------
def autoscaling_config(data_dir: Path, max_replicas: int):
    from serve_app.config import AppConfig, DeploymentOptions

    base = bench_config(data_dir, max_batch_images=4, batch_wait_timeout_s=0.0, max_ongoing_requests=4)
    sdxl = base.models[0]
    hot = DeploymentOptions(
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=4,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": max_replicas,
            # 16 clients / 2 per replica asks for 8: capped at max_replicas.
            "target_ongoing_requests": 2,
            "upscale_delay_s": 2,
            "downscale_delay_s": 8,
            "metrics_interval_s": 1,
            "look_back_period_s": 3,
        },
    )
    cold = hot.model_copy(
        update={
            "autoscaling_config": {
                "min_replicas": 0,
                "max_replicas": 1,
                "target_ongoing_requests": 2,
                "upscale_delay_s": 0,
                "downscale_delay_s": 600,
            }
        }
    )
    models = [
        sdxl.model_copy(update={"deployment": hot}).model_dump(),
        sdxl.model_copy(update={"id": COLD, "deployment": cold}).model_dump(),
    ]
    # One ingress replica and CPU models: the SQLite ledger is fine (no single_machine needed).
    return AppConfig.model_validate({**base.model_dump(), "models": models, "single_machine": False})


def running_replicas(deployment: str) -> int:
    from ray import serve

    application = serve.status().applications.get("imagegen")
    if application is None or deployment not in application.deployments:
        return 0
    return application.deployments[deployment].replica_states.get("RUNNING", 0)


class ReplicaWatch:
    """Samples a deployment's RUNNING replica count in a thread, every ``every_s``."""

    def __init__(self, deployment: str, every_s: float = 0.5) -> None:
        self.deployment = deployment
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), running_replicas(self.deployment)))
            self._stop.wait(self.every_s)

    @property
    def now(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    async def until(self, predicate, timeout_s: float) -> float | None:
        """Seconds until ``predicate(count)`` held; None if it did not within the timeout."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.samples and predicate(self.samples[-1][1]):
                return time.monotonic() - start
            await asyncio.sleep(0.1)
        return None


# -- load ------------------------------------------------------------------------------------
class Tally:
    """What the clients saw: every request, its status, images and credits charged."""

    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.images = 0
        self.charged_units = 0
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.done_at: list[tuple[float, int]] = []  # (monotonic end, images)

    def images_per_s(self, start: float, end: float) -> float:
        images = sum(n for t, n in self.done_at if start <= t <= end)
        return round(images / (end - start), 2) if end > start else 0.0


async def load(port: int, key: str, model: str, clients: int, stop: asyncio.Event, tally: Tally) -> None:
    """``clients`` closed-loop clients on ``model`` until ``stop`` is set; every request
    they start is finished (and counted) before this returns."""
    from serve_app.accounts import parse_credits

    async def client(index: int) -> None:
        connection = HttpConnection(HOST, port)
        seq = 0
        try:
            while not stop.is_set():
                seq += 1
                payload = {"model": model, "prompt": f"scale {index}-{seq}", "n": 1, "size": "64x64"}
                tally.sent += 1
                response = await connection.request(post_json_bytes(HOST, port, "/v1/images/generations", payload, key))
                tally.statuses[response.status] = tally.statuses.get(response.status, 0) + 1
                if response.status == 200:
                    images = len(json.loads(response.body)["data"])
                    tally.ok += 1
                    tally.images += images
                    tally.charged_units += parse_credits(response.headers["x-credits-charged"])
                    tally.done_at.append((time.monotonic(), images))
                elif len(tally.errors) < 3:
                    tally.errors.append(response.body[:300].decode("utf-8", "replace"))
        finally:
            await connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))


def check_ledger(database_url: str, tally: Tally) -> dict[str, Any]:
    """The database against what the clients saw. Raises if anything is off."""
    from serve_app.accounts import open_store

    store = open_store(database_url)
    try:
        (key,) = store.list_keys()
        usage = store.usage(key.id)
        problems = store.inconsistencies()
        check = {
            "requests_sent": tally.sent,
            "requests_ok": tally.ok,
            "images_received": tally.images,
            "images_charged": usage.images,
            "credits_charged_headers": tally.charged_units,
            "credits_charged_ledger": usage.credits_units,
            "credits_held": usage.reserved_units,
            "inconsistencies": problems,
        }
    finally:
        store.close()
    sound = (
        tally.ok == tally.sent
        and usage.images == tally.images
        and usage.credits_units == tally.charged_units
        and usage.reserved_units == 0
        and not problems
    )
    check["sound"] = sound
    if not sound:
        raise AssertionError(f"ledger check failed: {check}, statuses {tally.statuses}, errors {tally.errors}")
    return check


# -- the run ---------------------------------------------------------------------------------
async def run_phases(port: int, key: str, database_url: str, args: argparse.Namespace) -> dict[str, Any]:
    hot, cold = f"model-{MODEL}", f"model-{COLD}"  # ModelConfig.deployment_name
    tally = Tally()
    phases: dict[str, Any] = {}

    async def phase(name: str, clients: int, until, timeout_s: float, watch: ReplicaWatch) -> dict[str, Any]:
        stop = asyncio.Event()
        start = time.monotonic()
        replicas_before = watch.now
        sent_before = tally.sent
        runner = asyncio.create_task(load(port, key, MODEL, clients, stop, tally))
        reached = await until(timeout_s) if until else (await asyncio.sleep(timeout_s)) or None
        end = time.monotonic()
        stop.set()
        await runner
        result = {
            "clients": clients,
            "seconds": round(end - start, 2),
            "replicas_before": replicas_before,
            "replicas_after": watch.now,
            "requests": tally.sent - sent_before,
            "images_per_s": tally.images_per_s(start, end),
            "ledger": check_ledger(database_url, tally),
        }
        # Under the same load, before the first added replica ran: the 1-replica baseline.
        grown = next((t for t, n in watch.samples if t >= start and n > replicas_before), None)
        if grown is not None and replicas_before == 1 and grown - start > 1:
            result["images_per_s_before_the_second_replica"] = tally.images_per_s(start, grown)
        if reached is not None:
            result["condition_met_after_s"] = round(reached, 2)
        phases[name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
        return result

    with ReplicaWatch(hot) as watch:
        await watch.until(lambda n: n == 1, 60)
        await phase("one replica", args.light_clients, None, args.phase_s, watch)
        up = await phase(
            "scale up",
            args.heavy_clients,
            lambda t: watch.until(lambda n: n >= args.max_replicas, t),
            args.scale_timeout_s,
            watch,
        )
        if "condition_met_after_s" not in up:
            raise AssertionError(f"never reached {args.max_replicas} replicas in {args.scale_timeout_s} s")
        await phase(f"{args.max_replicas} replicas", args.heavy_clients, None, args.phase_s, watch)
        down = await phase(
            "scale down",
            args.light_clients,
            lambda t: watch.until(lambda n: n == 1, t),
            args.scale_timeout_s,
            watch,
        )
        phases["scale down"]["replica_timeline"] = [(round(t - watch.samples[0][0], 1), n) for t, n in watch.samples]
        if "condition_met_after_s" not in down:
            raise AssertionError(f"never back to 1 replica in {args.scale_timeout_s} s")

    # From zero: tiny-sdxl-cold has no replica until this request asks for one.
    with ReplicaWatch(cold) as watch:
        await asyncio.sleep(1.0)
        before = watch.now
        if before != 0:
            raise AssertionError(f"{COLD} should start with 0 replicas, has {before}")
        start = time.monotonic()
        first = Tally()
        await load_one(port, key, first)
        first_image_s = time.monotonic() - start
        tally.sent += first.sent
        tally.ok += first.ok
        tally.images += first.images
        tally.charged_units += first.charged_units
        for status, count in first.statuses.items():
            tally.statuses[status] = tally.statuses.get(status, 0) + count
        phases["from zero"] = {
            "replicas_before": before,
            "replicas_after": running_replicas(cold),
            "time_to_first_image_s": round(first_image_s, 2),
            "statuses": {str(k): v for k, v in first.statuses.items()},
            "ledger": check_ledger(database_url, tally),
        }
        print(f"from zero: {json.dumps(phases['from zero'])}", flush=True)
    return phases


async def load_one(port: int, key: str, tally: Tally) -> None:
    """One request to the cold model, with a client timeout long enough for a cold start."""
    from serve_app.accounts import parse_credits

    connection = HttpConnection(HOST, port)
    try:
        payload = {"model": COLD, "prompt": "from zero", "n": 1, "size": "64x64"}
        tally.sent += 1
        response = await asyncio.wait_for(
            connection.request(post_json_bytes(HOST, port, "/v1/images/generations", payload, key)), 120
        )
        tally.statuses[response.status] = tally.statuses.get(response.status, 0) + 1
        if response.status == 200:
            tally.ok += 1
            tally.images += len(json.loads(response.body)["data"])
            tally.charged_units += parse_credits(response.headers["x-credits-charged"])
        else:
            tally.errors.append(response.body[:300].decode("utf-8", "replace"))
    finally:
        await connection.close()


def markdown(document: dict[str, Any]) -> str:
    p = document["phases"]
    n = document["parameters"]["max_replicas"]
    rows = [
        "| phase | clients | replicas before → after | time | images/s | ledger |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("one replica", "scale up", f"{n} replicas", "scale down"):
        r = p[name]
        when = f"{r['condition_met_after_s']} s to reach it" if "condition_met_after_s" in r else f"{r['seconds']} s"
        ledger = r["ledger"]
        rate = str(r["images_per_s"])
        if "images_per_s_before_the_second_replica" in r:
            rate += f" ({r['images_per_s_before_the_second_replica']} before the 2nd replica ran)"
        rows.append(
            f"| {name} | {r['clients']} | {r['replicas_before']} → {r['replicas_after']} | {when} | "
            f"{rate} | {ledger['requests_ok']}/{ledger['requests_sent']} ok, "
            f"{ledger['images_charged']} charged = {ledger['images_received']} received |"
        )
    z = p["from zero"]
    rows.append(
        f"| from zero ({COLD}, `min_replicas: 0`) | 1 | {z['replicas_before']} → {z['replicas_after']} | "
        f"{z['time_to_first_image_s']} s to the first image | - | {z['ledger']['requests_ok']}/"
        f"{z['ledger']['requests_sent']} ok, {z['ledger']['images_charged']} charged = "
        f"{z['ledger']['images_received']} received |"
    )
    params = document["parameters"]
    return "\n".join(
        [
            "## Autoscaling (`bench/autoscaling.py`)",
            "",
            (
                f"tiny-sdxl at 64x64 under closed-loop load on its own Ray instance ({params['ray_cpus']} logical CPUs on "
                f"{document['machine']['nproc']} cores), `autoscaling_config` min 1 / max {n}, "
                f"`target_ongoing_requests` {params['target_ongoing_requests']}, upscale delay "
                f"{params['upscale_delay_s']} s, downscale delay {params['downscale_delay_s']} s. "
                f"Time to scale up: **{p['scale up'].get('condition_met_after_s')} s** from the load starting to {n} "
                f"replicas RUNNING; back to 1 replica **{p['scale down'].get('condition_met_after_s')} s** after the "
                f"load dropped; first image from zero replicas **{z['time_to_first_image_s']} s**."
            ),
            "",
            *rows,
            "",
            (
                "Ledger after every phase (cumulative): every request sent got its 200 (none lost while replicas started or "
                "stopped), the images and credits charged in the database equal the images received and the "
                "`x-credits-charged` headers summed (none charged twice), no credits held, every balance equal "
                "to its ledger. Each replica runs one torch thread (`num_cpus: 0.5`) and takes at most 4 "
                "requests at a time, so one replica leaves one of the two cores idle and its batches small; "
                "the rate before the second replica ran was also measured while the new replicas were "
                "loading their pipelines on the same cores. On GPUs each replica brings its own device."
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases; leaves the committed figures alone")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--heavy-clients", type=int, default=16)
    parser.add_argument("--light-clients", type=int, default=2)
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--scale-timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    if args.quick:
        args.phase_s = 5.0
    ray_cpus = 4
    started = time.monotonic()
    with temp_dir("bench-autoscaling-") as tmp, ray_instance(num_cpus=ray_cpus):
        data = Path(tmp)
        config = autoscaling_config(data, args.max_replicas)
        database_url = config.accounts.database_url
        key = create_key(database_url, "bench", "1000000", rpm=1_000_000, ipm=1_000_000)
        port = free_port()
        serve_graph(config, port, first=True)
        phases = asyncio.run(run_phases(port, key, database_url, args))
    hot = config.model(MODEL).deployment.autoscaling_config
    document = {
        "benchmark": "autoscaling",
        "machine": machine_info(),
        "parameters": {
            "max_replicas": args.max_replicas,
            "heavy_clients": args.heavy_clients,
            "light_clients": args.light_clients,
            "phase_s": args.phase_s,
            "ray_cpus": ray_cpus,
            "target_ongoing_requests": hot["target_ongoing_requests"],
            "upscale_delay_s": hot["upscale_delay_s"],
            "downscale_delay_s": hot["downscale_delay_s"],
            "size": "64x64",
        },
        "phases": phases,
        "total_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(document, indent=2))
    if not args.quick:
        write_json(RESULTS / "autoscaling.json", document)
        update_doc_section("autoscaling", markdown(document))


if __name__ == "__main__":
    main()
