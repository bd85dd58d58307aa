"""The HTTP ingress deployment: thin FastAPI routes over ``ImageGenerationService``.

No ``from __future__ import annotations``: FastAPI reads the route annotations (``Request``)
at runtime in the replica, where string annotations would not resolve.
"""

import base64
import functools
import hashlib
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from serve_app.accounts import build_accounts
from serve_app.batches.openapi import (
    BATCH_ERRORS,
    CREATE_BATCH,
    CREATE_BATCH_ERRORS,
    FILE_CONTENT_OK,
    LIST_BATCHES,
    LIST_FILES,
    UPLOAD,
    UPLOAD_ERRORS,
)
from serve_app.batches.protocol import BatchList, BatchObject, FileDeleted, FileList, FileObject
from serve_app.batches.runner import BatchMetrics, BatchRunner
from serve_app.batches.service import BatchService
from serve_app.batches.store import BatchStore
from serve_app.charge import ServedResponse, hand_over
from serve_app.config import AppConfig
from serve_app.enhancer import build_enhancer
from serve_app.errors import (
    APIError,
    InvalidRequest,
    NotFound,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedMediaType,
)
from serve_app.http_errors import REQUEST_ID_HEADER, SAFE_REQUEST_ID, error_response
from serve_app.metrics import ServeMetrics
from serve_app.multipart import FormPart, parse_form
from serve_app.openapi import (
    EDIT_FORM,
    IDEMPOTENCY_KEY,
    IMAGE_ERRORS,
    IMAGE_REASONS,
    KEY_ONLY_ERRORS,
    NO_MODEL_503,
    SECURED,
    SIGNED_IMAGE_OK,
    SIGNED_IMAGE_PARAMETERS,
    USAGE_OK,
    VARIATION_FORM,
    errors,
    images_ok,
    install_openapi,
    json_body,
    merged_bodies,
    ok,
    operation,
)
from serve_app.protocol import ImageEditJSONRequest, ImageGenerationRequest, ModelCard, ModelList
from serve_app.routing import ModelRoute, ModelRouter, ServeReplicaCounter, live_replica_owners, replica_owner
from serve_app.serving import EditUpload, ImageGenerationService
from serve_app.storage import LocalImageStore, build_file_store, build_image_store

logger = logging.getLogger("ray.serve")

SAFE_REQUEST_ID_RE = re.compile(SAFE_REQUEST_ID)
# Bounds of an edits form: OpenAI's image[] takes up to 16 files, plus the mask.
EDIT_MAX_FILES = 17
EDIT_MAX_FIELDS = 64
# The parts of the image forms that are files, with or without a filename.
EDIT_FILE_PARTS = ("image", "image[]", "mask")
VARIATION_FILE_PARTS = ("image",)
# What a text value sent as an image part looks like: a data URI, or base64 (an image file's
# own bytes never are: PNG, JPEG and WEBP start with bytes outside that alphabet).
_TEXT_IMAGE = re.compile(rb"data:.*|[A-Za-z0-9+/=_\s-]+", re.DOTALL)

# The playground page (serve_app/playground/): static, read once. Its policy lets it load
# nothing but itself, talk to nothing but this server, and be framed by no page (the key
# field must not be overlaid by another site).
PLAYGROUND = Path(__file__).parent / "playground"
PLAYGROUND_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}

# /docs and /redoc are FastAPI's pages, which load Swagger UI / ReDoc from a CDN: off unless
# the config's ``api_docs`` is true (the routes are the ingress's, below), and then served
# with a policy that admits that CDN and the page's own inline script, nothing else.
# /openapi.json is always served.
API_DOCS_CDN = "https://cdn.jsdelivr.net"
api = FastAPI(title="imagegen", summary="OpenAI-compatible image generation", docs_url=None, redoc_url=None)
# The document: FastAPI's, from what each route declares on its decorator (serve_app/openapi.py).
# The image routes read their bodies themselves, after authentication and bounded in size and
# time (``_respond``, ``read_body``): a body parameter would make FastAPI read and parse the
# whole body before any dependency or handler ran. So their request models are declared with
# ``openapi_extra`` (schemas generated from serve_app.protocol) and validated by our parsers,
# which answer the documented 400 naming the field instead of FastAPI's 422.
install_openapi(api)


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or _new_request_id(request)


def _new_request_id(request: Request) -> str:
    # Serve's proxy puts the client's x-request-id, or one it generates, on every request
    # and echoes it on the response; use exactly that id so body and header agree. But the
    # id also goes into logs, the ledger and storage names: one that is not a short plain
    # token (8 KB, control characters, undecodable bytes) is replaced by our own.
    offered = request.headers.get(REQUEST_ID_HEADER) or ""
    request_id = offered if SAFE_REQUEST_ID_RE.fullmatch(offered) else f"req_{uuid.uuid4().hex}"
    request.state.request_id = request_id
    return request_id


def error_for(exc: BaseException, request: Request) -> JSONResponse:
    """``exc`` on the wire, for this request."""
    return error_response(exc, request_id_of(request))


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        error: APIError = NotFound(f"No route for {request.method} {request.url.path[:200]}.")
    else:
        # Starlette's own answers (405 with its Allow header, ...) keep their headers.
        error = InvalidRequest(str(exc.detail), headers=dict(exc.headers or {}))
        error.status_code = exc.status_code
    return error_for(error, request)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_for(exc, request)


def _loopback_base_url(request: Request) -> str | None:
    """The request's base URL when its Host names this machine's loopback, else None: image
    URLs are never built from a Host a client could set to anything (configure
    storage.local.public_base_url for other addresses)."""
    host = (request.url.hostname or "").strip("[]").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return str(request.base_url).rstrip("/") if loopback else None


def _has_body(request: Request) -> bool:
    """Whether the request says a body follows (HTTP/1.1: a non-zero Content-Length, or chunks)."""
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() != "0"
    return "transfer-encoding" in request.headers


def _require_media_type(request: Request, media_type: str) -> None:
    """A POST must carry a body of ``media_type``; anything else is the documented 400 (a body
    that fails validation), with a message that says what was sent and what is expected."""
    declared = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if declared == media_type:
        return
    if not _has_body(request):
        raise UnsupportedMediaType(f"The request has no body: send a {media_type} body (Content-Type: {media_type}).")
    if not declared:
        raise UnsupportedMediaType(f"The request body has no Content-Type: send it as {media_type}.")
    shown = "".join(c for c in declared[:64] if c.isprintable())
    raise UnsupportedMediaType(f"The request body must be {media_type} (Content-Type: {media_type}), not {shown}.")


def _csp_hashes(html: str) -> str:
    """CSP source expressions for the inline scripts of ``html`` (FastAPI's docs pages)."""
    inline = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline)


def api_docs_page(enabled: bool, page: str, request: Request) -> Response:
    """``/docs`` (Swagger UI) or ``/redoc`` for ``/openapi.json``: a 404 like any unknown route
    unless the config's ``api_docs`` is true; then with a policy that admits the CDN the
    page's scripts come from, its own inline script, and no framing."""
    if not enabled:
        return error_for(NotFound(f"No route for {request.method} {request.url.path[:200]}."), request)
    openapi_url = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
    if page == "redoc":
        response = get_redoc_html(
            openapi_url=openapi_url, title="imagegen - ReDoc", redoc_favicon_url="data:,", with_google_fonts=False
        )
    else:
        response = get_swagger_ui_html(
            openapi_url=openapi_url, title="imagegen - Swagger UI", swagger_favicon_url="data:,"
        )
    html = bytes(response.body).decode()
    policy = (
        f"default-src 'none'; script-src {API_DOCS_CDN} {_csp_hashes(html)}; style-src {API_DOCS_CDN} 'unsafe-inline'; "
        f"font-src {API_DOCS_CDN} data:; img-src 'self' data: {API_DOCS_CDN}; connect-src 'self'; worker-src blob:; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {
        "content-security-policy": policy,
        "x-frame-options": "DENY",
        "referrer-policy": "no-referrer",
        "x-content-type-options": "nosniff",
    }
    return HTMLResponse(html, headers=headers)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """``request``'s body: a 413 past ``limit`` bytes, a 408 when it has not all arrived
    ``timeout_s`` after the first read (a client that sent its headers, then nothing or a
    byte now and then). Neither uvicorn nor Serve's proxy bounds a body read."""
    close = {"connection": "close"}
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"The request body is larger than {limit} bytes.", headers=close)
    body = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise RequestTooLarge(f"The request body is larger than {limit} bytes.", headers=close)
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g} s; send it at once, or retry.", headers=close
        ) from None
    return bytes(body)


# Defined before the class: Serve pickles the deployment class when it is decorated.
def _scales_from_zero(autoscaling_config: dict[str, Any] | None) -> bool:
    return autoscaling_config is not None and int(autoscaling_config.get("min_replicas", 1)) == 0


def _image_part(part: FormPart) -> bytes:
    """An image file part's bytes; a 400 that says how to send it when they are text (base64 or
    a data URI), which a form's image part never carries."""
    if part.filename is None and _TEXT_IMAGE.fullmatch(part.data[:4096]) and _TEXT_IMAGE.fullmatch(part.data):
        raise InvalidRequest(
            "Invalid 'image': a form's image part carries the image file's bytes (curl: -F image=@photo.png), "
            "not base64 or a data URI.",
            param="image",
        )
    return part.data


def _text_part(part: FormPart) -> str:
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"Invalid '{part.name}': a form field must be UTF-8 text.", param=part.name) from None


class ChargedResponse(StreamingResponse):
    """A served answer, JSON or events, sent by ``hand_over``: the one place a charged
    response leaves, counting what was sent and settling once however the response ends
    (also when the client left before the first chunk, or the task was cancelled)."""

    def __init__(self, served: ServedResponse, **kwargs: Any) -> None:
        super().__init__(_never_iterated(), media_type=served.media_type, headers=served.headers, **kwargs)
        self._served = served

    @property
    def _events(self) -> bool:
        return self._served.media_type == "text/event-stream"

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # A JSON answer is one chunk: sent as the whole body in one message (each message is
        # one more hop from the ingress replica to Serve's proxy). Events go out one by one.
        more = self._events

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await hand_over(self._served, body)
        if more:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self._events:  # Starlette's: listens for the client leaving between events
                await super().__call__(scope, receive, send)
            else:  # one message: nothing to listen for meanwhile (a cancellation ends it)
                try:
                    await self.stream_response(send)
                except OSError:
                    raise ClientDisconnect() from None
        finally:
            # A response cancelled before ``stream_response`` ran (the client left at once)
            # never reached ``hand_over``: settle it here (a no-op when it did).
            charge = self._served.charge
            if charge is not None and not charge.settled:
                with anyio.CancelScope(shield=True):
                    await charge.settle()


async def _never_iterated() -> AsyncGenerator[bytes, None]:
    return
    yield b""  # pragma: no cover - makes this an async generator


@serve.deployment
@serve.ingress(api)
class ImageGenerationIngress:
    def __init__(
        self, config: AppConfig | dict[str, Any], handles: dict[str, Any], enhancer_handle: Any = None
    ) -> None:
        self._config = AppConfig.model_validate(config)
        self._playground_page = (PLAYGROUND / "index.html").read_text()
        self._playground_script = (PLAYGROUND / "playground.js").read_text()
        replicas = ServeReplicaCounter(app_name=lambda: serve.get_replica_context().app_name)
        routes = {
            model.id: ModelRoute(
                model_id=model.id,
                deployment_name=model.deployment_name,
                handle=handles[model.id],
                timeout_s=model.timeout_s,
                scales_from_zero=_scales_from_zero(model.deployment.autoscaling_config),
            )
            for model in self._config.models
        }
        self._store = build_image_store(self._config.storage)
        # Reservations name the replica that holds them: if it dies, the others refund them.
        context = serve.get_replica_context()
        app_name, deployment_name = context.app_name, context.replica_id.deployment_id.name
        owner = replica_owner(app_name, deployment_name, context.replica_id.unique_id)
        self._accounts = build_accounts(self._config, owner=owner)
        self._live_owners = functools.partial(live_replica_owners, app_name, deployment_name)
        self._metrics = ServeMetrics()
        # The Batch API: files and batches in the accounts database, bytes in the file store,
        # and this replica's runner of batch lines (serve_app/batches/). Edits read their
        # file_id inputs through the same files.
        self._files = build_file_store(self._config.storage)
        batch_store = BatchStore(self._accounts.store)
        self._batches = BatchService(self._config, batch_store, self._files)
        self._service = ImageGenerationService(
            config=self._config,
            router=ModelRouter(routes, replicas),
            accounts=self._accounts,
            store=self._store,
            metrics=self._metrics,
            enhancer=build_enhancer(self._config.prompt_enhancer, enhancer_handle),
            files=self._batches,
        )
        self._batch_runner = BatchRunner(
            self._config, self._service, self._accounts.store, batch_store, self._files, owner, BatchMetrics(True)
        )

    async def check_health(self) -> None:
        """Serve's periodic health check, on the replica's event loop: it starts the
        background work of a replica that no request has reached yet (one Serve restarted
        must resume the batches it was running without waiting for traffic)."""
        self._start_background_work()

    def _start_background_work(self) -> None:
        """Retention sweeps, started once on the replica's event loop by the first request
        that needs them (the constructor may not run on that loop)."""
        self._store.start_sweeper()
        accounts = self._config.accounts
        self._accounts.start_stale_sweeper(
            self._config.stale_reservation_after_s,
            accounts.release_stale_every_s,
            self._config.idempotency_replay_window_s,
        )
        self._accounts.start_orphan_sweeper(self._live_owners, accounts.orphan_check_every_s)
        if self._config.batches.enabled:
            self._batch_runner.start()

    @api.get("/health", responses={200: ok(description="The ingress is up."), **errors(500, 503, reasons=NO_MODEL_503)})
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/playground", include_in_schema=False)
    async def playground(self) -> Response:
        """A page to try the service in a browser (the key stays in the browser tab)."""
        return HTMLResponse(self._playground_page, headers=PLAYGROUND_HEADERS)

    @api.get("/playground/playground.js", include_in_schema=False)
    async def playground_script(self) -> Response:
        return Response(self._playground_script, media_type="text/javascript", headers=PLAYGROUND_HEADERS)

    @api.get("/docs", include_in_schema=False)
    async def swagger_ui(self, request: Request) -> Response:
        return api_docs_page(self._config.api_docs, "swagger", request)

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> Response:
        return api_docs_page(self._config.api_docs, "redoc", request)

    @api.get(
        "/v1/models",
        dependencies=SECURED,
        responses={200: ok(ModelList), **errors(*KEY_ONLY_ERRORS, reasons=NO_MODEL_503)},
    )
    async def list_models(self, request: Request) -> Response:
        try:
            models = await self._service.list_models(request.headers.get("authorization"))
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        return JSONResponse(models.model_dump(exclude_none=True))

    @api.get(
        "/v1/models/{model_id:path}",
        dependencies=SECURED,
        responses={200: ok(ModelCard), **errors(401, 403, 404, 500, 503, reasons=NO_MODEL_503)},
    )
    async def retrieve_model(self, model_id: str, request: Request) -> Response:
        try:
            model = await self._service.retrieve_model(request.headers.get("authorization"), model_id)
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        return JSONResponse(model.model_dump(exclude_none=True))

    @api.get(
        "/v1/usage", dependencies=SECURED, responses={200: USAGE_OK, **errors(*KEY_ONLY_ERRORS, reasons=NO_MODEL_503)}
    )
    async def usage(self, request: Request) -> Response:
        self._start_background_work()
        try:
            usage = await self._service.usage(request.headers.get("authorization"))
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        return JSONResponse(usage)

    # One route per method: a route serving GET and HEAD has one operation id for both.
    @api.head(
        "/v1/files/images/{name:path}",
        responses={200: SIGNED_IMAGE_OK, **errors(403, 404, 500, 503, reasons=IMAGE_REASONS)},
        openapi_extra=operation(parameters=SIGNED_IMAGE_PARAMETERS),
        description="A stored image's headers (`response_format: url`), as GET would send them.",
    )
    @api.get(
        "/v1/files/images/{name:path}",
        responses={200: SIGNED_IMAGE_OK, **errors(403, 404, 500, 503, reasons=IMAGE_REASONS)},
        openapi_extra=operation(parameters=SIGNED_IMAGE_PARAMETERS),
        description="A stored image (`response_format: url`). The URL's signature is the authorization, not a key.",
    )
    async def get_image(self, name: str, request: Request) -> Response:
        """A stored image; the URL's signature is the authorization, not an API key."""
        expires = request.query_params.get("expires")
        try:
            if not isinstance(self._store, LocalImageStore):
                raise NotFound("Images are served by the configured object store, not here.")
            path, content_type = self._store.resolve(name, expires, request.query_params.get("signature"))
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        max_age = max(0, int(expires or 0) - int(time.time()))
        return FileResponse(
            path,
            media_type=content_type,
            headers={"cache-control": f"private, max-age={max_age}", "x-content-type-options": "nosniff"},
        )

    # -- the Batch API: /v1/files and /v1/batches (serve_app/batches/service.py) -----------
    @api.post(
        "/v1/files",
        dependencies=SECURED,
        responses={200: ok(FileObject), **UPLOAD_ERRORS},
        openapi_extra=UPLOAD,
        description="Upload a Batch API input file (JSONL, purpose batch), validated line by line, or an image "
        "for edits' file_id (purpose vision or user_data).",
    )
    async def upload_file(self, request: Request) -> Response:
        async def work(key: Any) -> Any:
            _require_media_type(request, "multipart/form-data")
            limit = self._config.files.max_bytes + 64 * 1024  # the form's own parts around the file
            body = await read_body(request, limit, self._config.body_read_timeout_s)
            parts = parse_form(
                body, request.headers.get("content-type", ""), file_names=("file",), max_files=1, max_fields=4
            )
            form = {part.name: part for part in parts}
            if "file" not in form:
                raise InvalidRequest("Missing required parameter: 'file'.", param="file")
            if "purpose" not in form:
                raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
            upload = form["file"]
            purpose = _text_part(form["purpose"])
            return await self._batches.upload_file(key, upload.filename or "", purpose, upload.data)

        return await self._keyed(request, work)

    @api.get("/v1/files", dependencies=SECURED, responses={200: ok(FileList), **BATCH_ERRORS}, openapi_extra=LIST_FILES)
    async def list_files(self, request: Request) -> Response:
        query = request.query_params
        return await self._keyed(
            request,
            lambda key: self._batches.list_files(
                key,
                after=query.get("after"),
                limit=query.get("limit"),
                order=query.get("order"),
                purpose=query.get("purpose"),
            ),
        )

    @api.get("/v1/files/{file_id}", dependencies=SECURED, responses={200: ok(FileObject), **BATCH_ERRORS})
    async def retrieve_file(self, file_id: str, request: Request) -> Response:
        return await self._keyed(request, lambda key: self._batches.retrieve_file(key, file_id))

    @api.get("/v1/files/{file_id}/content", dependencies=SECURED, responses={200: FILE_CONTENT_OK, **BATCH_ERRORS})
    async def file_content(self, file_id: str, request: Request) -> Response:
        async def work(key: Any) -> Response:
            data = await self._batches.file_content(key, file_id)
            return Response(data, media_type="application/octet-stream", headers={"x-content-type-options": "nosniff"})

        return await self._keyed(request, work)

    @api.delete("/v1/files/{file_id}", dependencies=SECURED, responses={200: ok(FileDeleted), **BATCH_ERRORS})
    async def delete_file(self, file_id: str, request: Request) -> Response:
        return await self._keyed(request, lambda key: self._batches.delete_file(key, file_id))

    @api.post(
        "/v1/batches",
        dependencies=SECURED,
        responses={200: ok(BatchObject), **CREATE_BATCH_ERRORS},
        openapi_extra=CREATE_BATCH,
        description="Run every request of an uploaded file in the batch lane, at the batch price.",
    )
    async def create_batch(self, request: Request) -> Response:
        async def work(key: Any) -> Any:
            return await self._batches.create_batch(key, await self._read_json(request))

        return await self._keyed(request, work)

    @api.get(
        "/v1/batches", dependencies=SECURED, responses={200: ok(BatchList), **BATCH_ERRORS}, openapi_extra=LIST_BATCHES
    )
    async def list_batches(self, request: Request) -> Response:
        query = request.query_params
        return await self._keyed(
            request, lambda key: self._batches.list_batches(key, after=query.get("after"), limit=query.get("limit"))
        )

    @api.get("/v1/batches/{batch_id}", dependencies=SECURED, responses={200: ok(BatchObject), **BATCH_ERRORS})
    async def retrieve_batch(self, batch_id: str, request: Request) -> Response:
        return await self._keyed(request, lambda key: self._batches.retrieve_batch(key, batch_id))

    @api.post("/v1/batches/{batch_id}/cancel", dependencies=SECURED, responses={200: ok(BatchObject), **BATCH_ERRORS})
    async def cancel_batch(self, batch_id: str, request: Request) -> Response:
        return await self._keyed(request, lambda key: self._batches.cancel_batch(key, batch_id))

    async def _keyed(self, request: Request, work: Callable[[Any], Awaitable[Any]]) -> Response:
        """Authenticate, then do ``work(key)``: its model as JSON (or its own response), or
        the error on the wire."""
        self._start_background_work()
        try:
            key = await self._service.authenticate(request.headers.get("authorization"))
            result = await work(key)
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        return result if isinstance(result, Response) else JSONResponse(result.model_dump(mode="json"))

    @api.post(
        "/v1/images/generations",
        dependencies=SECURED,
        responses={200: images_ok("image_generation"), **errors(*IMAGE_ERRORS)},
        openapi_extra=operation(json_body(ImageGenerationRequest), [IDEMPOTENCY_KEY]),
        description="Text-to-image, or image-to-image with `image` (OpenAI's images API plus extensions).",
    )
    async def generate_images(self, request: Request) -> Response:
        return await self._respond(request, "generations", self._read_json, self._service.generate)

    @api.post(
        "/v1/images/edits",
        dependencies=SECURED,
        responses={200: images_ok("image_edit"), **errors(*IMAGE_ERRORS)},
        openapi_extra=operation(merged_bodies(EDIT_FORM, json_body(ImageEditJSONRequest)), [IDEMPOTENCY_KEY]),
        description="Image-to-image, or inpainting with a `mask`: OpenAI's multipart edits form, or its JSON form "
        "with images by reference (`images: [{image_url | file_id}]`).",
    )
    async def edit_images(self, request: Request) -> Response:
        return await self._respond(request, "edits", self._read_edit, self._service.edit)

    @api.post(
        "/v1/images/variations",
        dependencies=SECURED,
        responses={200: images_ok(None), **errors(*IMAGE_ERRORS)},
        openapi_extra=operation(VARIATION_FORM, [IDEMPOTENCY_KEY]),
        description="Variations of an image: image-to-image with an empty prompt at the model's "
        "`defaults.variation_strength` (OpenAI's multipart variations form).",
    )
    async def create_variations(self, request: Request) -> Response:
        return await self._respond(request, "variations", self._read_variation_form, self._service.variation)

    async def _respond(
        self, request: Request, endpoint: str, read: Callable[[Request], Awaitable[Any]], serve: Callable[..., Any]
    ) -> Response:
        """Authenticate, then read the body (bounded), serve it, and answer: the served
        response, or the error on the wire. Nothing of the body is read for a caller
        without a valid key."""
        request_id = request_id_of(request)
        self._start_background_work()
        payload: Any = None
        try:
            key = await self._service.authenticate(request.headers.get("authorization"))
            payload = await read(request)
            served = await serve(
                key,
                payload,
                request_id=request_id,
                base_url=_loopback_base_url(request),
                idempotency_key=request.headers.get("idempotency-key"),
            )
            response: Response = ChargedResponse(served)
            if served.media_type == "text/event-stream":
                response.headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            response = error_for(exc, request)
        self._metrics.answered(endpoint, self._model_tag(payload), response.status_code)
        return response

    def _model_tag(self, payload: Any) -> str:
        """The request's model for a metric tag: a configured id, never a client's free text."""
        fields = payload.fields if isinstance(payload, EditUpload) else payload
        model = fields.get("model", None) if isinstance(fields, dict) else "unknown"
        if model is None:  # absent or null: the default model
            return self._config.default_model_id
        return model if isinstance(model, str) and self._config.model(model) is not None else "unknown"

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, at most ``max_body_bytes`` of it, within ``body_read_timeout_s`` of
        the first read. Both errors close the connection: the rest of the body is never read,
        so a client trickling it cannot hold the socket (or the server's parser) any longer."""
        return await read_body(request, self._config.max_body_bytes, self._config.body_read_timeout_s)

    async def _read_json(self, request: Request) -> object:
        _require_media_type(request, "application/json")
        body = await self._read_body(request)
        if not body.strip():
            raise UnsupportedMediaType("The request has no body: send a JSON object (Content-Type: application/json).")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidRequest("The request body is not valid JSON.") from None
        except RecursionError:  # the parser's stack: no request of ours nests beyond a few levels
            raise InvalidRequest("The request body is nested too deeply.") from None

    async def _read_edit(self, request: Request) -> Any:
        """An edit in either of OpenAI's forms: JSON (``images: [{image_url | file_id}]``,
        decoded here, its images read by the service after the reservation) or multipart."""
        declared = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if declared == "application/json":
            return await self._read_json(request)
        return await self._read_edit_form(request)

    async def _read_edit_form(self, request: Request) -> EditUpload:
        """OpenAI's edits form: text fields once each, ``image`` / ``image[]`` files, a ``mask`` file."""
        return await self._read_image_form(request, EDIT_FILE_PARTS)

    async def _read_variation_form(self, request: Request) -> EditUpload:
        """OpenAI's variations form: text fields once each, one ``image`` file."""
        return await self._read_image_form(request, VARIATION_FILE_PARTS)

    async def _read_image_form(self, request: Request, file_names: tuple[str, ...]) -> EditUpload:
        """A multipart image form: the parts named in ``file_names`` are files (their bytes,
        whether or not the part has a filename: curl's ``-F image=<x.png`` sends none), a
        ``name[]`` text part is one item of a list field, any other part a text field."""
        _require_media_type(request, "multipart/form-data")
        body = await self._read_body(request)  # bounded before the parser sees it
        parts = parse_form(
            body,
            request.headers.get("content-type", ""),
            file_names=file_names,
            max_files=EDIT_MAX_FILES,
            max_fields=EDIT_MAX_FIELDS,
        )
        fields: dict[str, str | list[str]] = {}
        images: list[bytes] = []
        mask: bytes | None = None
        for part in parts:
            name = part.name
            if name in ("image", "image[]") and name in file_names:
                images.append(_image_part(part))
            elif name == "mask" and name in file_names:
                if mask is not None:
                    raise InvalidRequest("Invalid 'mask': send it once.", param="mask")
                mask = part.data
            elif part.filename is not None:
                raise InvalidRequest(f"Invalid '{name}': unexpected file part.", param=name)
            else:
                value = _text_part(part)
                if name.endswith("[]"):
                    # A list field, one part per item, as the OpenAI SDKs send arrays in a form
                    # (`extra_lora_weights[]`); bounded by the form's field count and the model.
                    items = fields.setdefault(name[:-2], [])
                    if not isinstance(items, list):
                        raise InvalidRequest(f"Invalid '{name[:-2]}': send it once.", param=name[:-2])
                    items.append(value)
                elif name in fields:
                    raise InvalidRequest(f"Invalid '{name}': send it once.", param=name)
                else:
                    fields[name] = value
        return EditUpload(fields=fields, images=images, mask=mask)
