"""The ingress's edge without Ray (issue 20, findings 4, 7 and 8): a request body has a read
deadline, a POST without a body or of the wrong type is the documented 400, /docs and /redoc
are off unless configured, and the playground cannot be framed and keeps the key to its tab.

The routes are the ingress's FastAPI object (as in tests/test_openapi.py); Serve's
class-based view asks Serve for the replica's instance, which here is a bare ingress object
holding only the config and the playground files."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app.config import AppConfig
from serve_app.errors import APIError, RequestTimeout
from serve_app.http_errors import error_response

CONFIG = AppConfig.model_validate({"models": [{"id": "tiny-sdxl", "family": "sdxl", "weights": "builtin:tiny-sdxl"}]})


def make_request(headers: dict[str, str], receive) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/generations",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
    }
    return Request(scope, receive)


def body_of(*chunks: bytes, then_wait: bool = False, every_s: float = 0.0):
    """A receive() that hands over ``chunks`` (``every_s`` apart), then ends the body, or
    waits forever (a client that stopped sending)."""
    pending = list(chunks)

    async def receive():
        if pending:
            await asyncio.sleep(every_s)
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or then_wait}
        await asyncio.Event().wait()  # never set

    return receive


def trickle(byte: bytes = b"x", every_s: float = 0.05):
    """A receive() of a client sending one byte every ``every_s``, forever."""

    async def receive():
        await asyncio.sleep(every_s)
        return {"type": "http.request", "body": byte, "more_body": True}

    return receive


def read(request: Request, limit: int = 1 << 20, timeout_s: float = 0.3) -> bytes:
    from serve_app.ingress import read_body

    return asyncio.run(read_body(request, limit, timeout_s))


# --- finding 4: the body read deadline ------------------------------------------------------


def test_config_declares_the_deadline_and_the_docs_flag():
    assert CONFIG.body_read_timeout_s == 30.0 and CONFIG.api_docs is False
    with pytest.raises(ValueError):
        AppConfig.model_validate({**CONFIG.model_dump(), "body_read_timeout_s": 0})


def test_a_body_that_arrives_in_time_is_read_whole():
    request = make_request({"content-type": "application/json"}, body_of(b'{"a":', b" 1}", every_s=0.05))
    assert read(request) == b'{"a": 1}'


@pytest.mark.parametrize(
    "receive",
    [body_of(then_wait=True), body_of(b'{"model": "tiny', then_wait=True), trickle()],
    ids=["headers-then-nothing", "half-a-body-then-nothing", "a-byte-at-a-time"],
)
def test_a_body_that_does_not_arrive_in_time_is_a_408_that_closes_the_connection(receive):
    request = make_request({"content-type": "application/json", "content-length": "1000"}, receive)
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as raised:
        read(request, timeout_s=0.3)
    assert 0.25 < time.monotonic() - started < 2
    response = error_response(raised.value, "req-1")
    assert response.status_code == 408 and response.headers["connection"] == "close"
    error = json.loads(response.body)["error"]
    assert (error["type"], error["code"], error["request_id"]) == ("invalid_request_error", "request_timeout", "req-1")
    assert "0.3 s" in error["message"]


def test_too_large_is_still_a_413_and_closes_the_connection():
    declared = make_request({"content-length": str(10_000)}, body_of(b"x"))
    with pytest.raises(APIError) as raised:
        read(declared, limit=1024)
    assert raised.value.status_code == 413 and raised.value.headers == {"connection": "close"}
    streamed = make_request({}, body_of(b"x" * 600, b"x" * 600))
    with pytest.raises(APIError) as raised:
        read(streamed, limit=1024)
    assert raised.value.status_code == 413


def _serve_in_thread(app) -> tuple[str, int, object, threading.Thread]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    # As Serve starts its proxy's server: uvicorn, keep-alive timeout only.
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off", timeout_keep_alive=90))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    return host, port, server, thread


@pytest.fixture(scope="module")
def slow_body_server():
    """uvicorn (which bounds neither headers nor bodies) in front of the ingress's reader."""
    from serve_app.ingress import read_body

    async def echo(request: Request) -> Response:
        try:
            body = await read_body(request, 1 << 20, 0.5)
        except APIError as exc:
            return error_response(exc, "req-slow")
        return JSONResponse({"bytes": len(body)})

    host, port, server, thread = _serve_in_thread(Starlette(routes=[Route("/", echo, methods=["POST"])]))
    yield host, port
    server.should_exit = True
    thread.join(10)


def _answer_then_eof(sock: socket.socket, within_s: float) -> tuple[bytes, bool]:
    """What the server sends, and whether it then closed the connection, within ``within_s``."""
    sock.settimeout(0.1)
    received = b""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"x")  # the client keeps trickling
        except OSError:
            return received, True
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return received, True
        if not data:
            return received, True
        received += data
    return received, False


@pytest.mark.parametrize(
    "sent", [b"", b'{"model": "tiny'], ids=["headers-then-a-trickle", "half-a-body-then-a-trickle"]
)
def test_over_a_socket_a_slow_body_gets_the_408_and_its_connection_is_closed(slow_body_server, sent):
    host, port = slow_body_server
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + sent
        )
        received, closed = _answer_then_eof(sock, within_s=5)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert closed, "the server kept the connection of a body it gave up on"


def test_over_a_socket_a_prompt_body_is_read(slow_body_server):
    host, port = slow_body_server
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        sock.settimeout(5)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b'{"bytes":5}')


# --- finding 8: no body / wrong type is the documented 400 -----------------------------------


def _media_error(headers: dict[str, str], media_type: str = "application/json") -> APIError | None:
    from serve_app.ingress import _require_media_type

    try:
        _require_media_type(make_request(headers, body_of()), media_type)
    except APIError as exc:
        return exc
    return None


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "no body"),
        ({"content-length": "0"}, "no body"),
        ({"content-type": "text/plain", "content-length": "0"}, "no body"),
        ({"content-length": "12"}, "no Content-Type"),
        ({"transfer-encoding": "chunked"}, "no Content-Type"),
        ({"content-type": "text/plain", "content-length": "12"}, "not text/plain"),
        ({"content-type": "application/x-www-form-urlencoded", "content-length": "3"}, "not application/x-www-form"),
    ],
)
def test_no_body_or_the_wrong_type_is_the_documented_400(headers, says):
    error = _media_error(headers)
    assert error is not None and error.status_code == 400
    assert (error.error_type, error.code) == ("invalid_request_error", "invalid_request")
    assert says in error.message and "application/json" in error.message, error.message
    wire = json.loads(error_response(error, "req-2").body)["error"]
    assert set(wire) == {"message", "type", "code", "param", "request_id"}


def test_the_right_type_passes_with_parameters_and_in_any_case():
    assert _media_error({"content-type": "application/json; charset=utf-8", "content-length": "2"}) is None
    assert _media_error({"content-type": "Application/JSON", "content-length": "2"}) is None
    form = {"content-type": "multipart/form-data; boundary=x", "content-length": "9"}
    assert _media_error(form, "multipart/form-data") is None
    error = _media_error({"content-type": "application/json", "content-length": "2"}, "multipart/form-data")
    assert error is not None and "must be multipart/form-data" in error.message


def test_an_empty_json_body_says_it_has_none():
    from serve_app.ingress import ImageGenerationIngress

    ingress = bare_ingress(ImageGenerationIngress)
    request = make_request({"content-type": "application/json", "content-length": "0"}, body_of(b""))
    with pytest.raises(APIError) as raised:
        asyncio.run(ingress._read_json(request))
    assert raised.value.status_code == 400 and "no body" in raised.value.message


# --- finding 7: /docs, /redoc and the playground's headers -----------------------------------


def bare_ingress(deployment, config: AppConfig = CONFIG):
    """The ingress class Serve would instantiate, without its constructor (no Ray, no
    database): only what the routes tested here read."""
    wrapper = deployment.func_or_class
    cls = next(base for base in wrapper.__mro__[1:] if base.__name__ == wrapper.__name__)  # not Serve's wrapper
    ingress = object.__new__(cls)
    ingress._config = config
    from serve_app.ingress import PLAYGROUND

    ingress._playground_page = (PLAYGROUND / "index.html").read_text()
    ingress._playground_script = (PLAYGROUND / "playground.js").read_text()
    return ingress


@pytest.fixture
def client(monkeypatch):
    """A client of the ingress's routes; ``client.use(config)`` picks the config."""
    from ray import serve

    from serve_app.ingress import ImageGenerationIngress, api

    current = SimpleNamespace(servable_object=bare_ingress(ImageGenerationIngress))
    monkeypatch.setattr(serve, "get_replica_context", lambda: current)
    test_client = TestClient(api)
    test_client.use = lambda config: setattr(current, "servable_object", bare_ingress(ImageGenerationIngress, config))
    return test_client


def test_docs_and_redoc_are_off_by_default_and_openapi_json_stays(client):
    for path in ("/docs", "/redoc"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "not_found"
        assert "cdn" not in response.text.lower()
    assert client.get("/openapi.json").status_code == 200


def test_docs_when_enabled_admit_only_their_cdn_and_their_own_inline_script(client):
    client.use(CONFIG.model_copy(update={"api_docs": True}))
    for path, marker in (("/docs", "SwaggerUIBundle"), ("/redoc", "redoc.standalone.js")):
        response = client.get(path)
        assert response.status_code == 200 and marker in response.text, path
        assert "/openapi.json" in response.text
        assert "fastapi.tiangolo.com" not in response.text and "fonts.googleapis.com" not in response.text
        policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
        assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
        assert policy["connect-src"] == "'self'"
        script_sources = policy["script-src"].split()
        assert "'unsafe-inline'" not in script_sources and "'unsafe-eval'" not in script_sources
        assert {s for s in script_sources if not s.startswith("'sha256-")} == {"https://cdn.jsdelivr.net"}
        for inline in re.findall(r"<script>(.*?)</script>", response.text, flags=re.DOTALL):
            digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in script_sources
        assert response.headers["x-frame-options"] == "DENY"


def test_the_playground_cannot_be_framed_and_loads_nothing_from_elsewhere(client):
    for path in ("/playground", "/playground/playground.js"):
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
        assert "http" not in policy  # no other origin
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"


# --- finding 7: where the playground keeps the key (a real browser) --------------------------

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
KEY = "qbt_test_key"


@pytest.fixture(scope="module")
def playground_server():
    """The playground's files with the ingress's headers, and a /v1/models for KEY only."""
    from serve_app.ingress import PLAYGROUND, PLAYGROUND_HEADERS

    async def page(request: Request) -> Response:
        return Response((PLAYGROUND / "index.html").read_text(), media_type="text/html", headers=PLAYGROUND_HEADERS)

    async def script(request: Request) -> Response:
        js = (PLAYGROUND / "playground.js").read_text()
        return Response(js, media_type="text/javascript", headers=PLAYGROUND_HEADERS)

    async def models(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return JSONResponse({"object": "list", "data": [{"id": "tiny-sdxl", "object": "model"}]})

    app = Starlette(
        routes=[Route("/playground", page), Route("/playground/playground.js", script), Route("/v1/models", models)]
    )
    host, port, server, thread = _serve_in_thread(app)
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs `pip install playwright` (.ci/run)")
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (`apt-get install chromium`, done by .ci/run)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_the_playground_keeps_the_key_in_the_tab_unless_asked_to_remember_it(playground_server, browser):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    stored = "[sessionStorage.getItem('imagegen.apiKey'), localStorage.getItem('imagegen.apiKey')]"

    page.goto(f"{playground_server}/playground")
    assert page.is_checked("#remember-key") is False
    page.fill("#api-key", KEY)
    page.click("#save-key")
    page.wait_for_selector("#model option[value='tiny-sdxl']", state="attached")
    assert page.evaluate(stored) == [KEY, None]  # this tab only
    # Another tab of the same origin (a fresh sessionStorage) does not get it.
    other = context.new_page()
    other.goto(f"{playground_server}/playground")
    assert other.evaluate(stored) == [None, None]
    other.close()

    page.click("#forget-key")
    assert page.evaluate(stored) == [None, None]

    page.check("#remember-key")
    page.fill("#api-key", KEY)
    page.click("#save-key")
    page.wait_for_selector("#model option[value='tiny-sdxl']", state="attached")
    assert page.evaluate(stored) == [None, KEY]  # opted in: this device
    page.reload()
    page.wait_for_selector("#model option[value='tiny-sdxl']", state="attached")
    assert page.is_checked("#remember-key") is True

    # Saving again without the box moves it back to the tab: no remembered copy stays behind.
    page.uncheck("#remember-key")
    page.fill("#api-key", KEY)
    page.click("#save-key")
    assert page.evaluate(stored) == [KEY, None]
    page.click("#forget-key")
    assert page.evaluate(stored) == [None, None]
    assert errors == []
    context.close()
