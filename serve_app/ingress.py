"""The HTTP ingress deployment: thin FastAPI routes over ``ImageGenerationService``.

No ``from __future__ import annotations``: FastAPI reads the route annotations (``Request``)
at runtime in the replica, where string annotations would not resolve.
"""

import functools
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
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from serve_app.accounts import build_accounts
from serve_app.config import AppConfig
from serve_app.enhancer import build_enhancer
from serve_app.errors import APIError, InvalidRequest, NotFound, RequestTooLarge, UnsupportedMediaType
from serve_app.http_errors import REQUEST_ID_HEADER, SAFE_REQUEST_ID, error_response
from serve_app.metrics import ServeMetrics
from serve_app.openapi import install_openapi
from serve_app.routing import ModelRoute, ModelRouter, ServeReplicaCounter, live_replica_owners, replica_owner
from serve_app.serving import EditUpload, ImageGenerationService
from serve_app.storage import LocalImageStore, build_image_store

logger = logging.getLogger("ray.serve")

SAFE_REQUEST_ID_RE = re.compile(SAFE_REQUEST_ID)
# Bounds of an edits form: OpenAI's image[] takes up to 16 files, plus the mask.
EDIT_MAX_FILES = 17
EDIT_MAX_FIELDS = 64

# The playground page (serve_app/playground/): static, read once. Its policy lets it load
# nothing but itself, and talk to nothing but this server.
PLAYGROUND = Path(__file__).parent / "playground"
PLAYGROUND_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}

api = FastAPI(title="imagegen", summary="OpenAI-compatible image generation", docs_url="/docs")
install_openapi(api)  # the document from the protocol models (serve_app/openapi.py)


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


def _require_media_type(request: Request, media_type: str) -> None:
    declared = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if declared != media_type:
        raise UnsupportedMediaType(f"The request body must be {media_type}, not {declared[:64] or 'untyped'}.")


# Defined before the class: Serve pickles the deployment class when it is decorated.
def _scales_from_zero(autoscaling_config: dict[str, Any] | None) -> bool:
    return autoscaling_config is not None and int(autoscaling_config.get("min_replicas", 1)) == 0


class SettledStreamingResponse(StreamingResponse):
    """A stream of events whose charge is settled when the response ends, however it ends:
    also when the client left before the first event, so the stream never started and its
    own ``finally`` never ran (the credits would stay held until the stale sweeper)."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], settle: Callable[[], Awaitable[None]] | None, **kwargs: Any
    ) -> None:
        super().__init__(events, **kwargs)
        self._events = events
        self._settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: a cancelled response (the client left) still settles. Closing a
            # started stream settles what it handed over; ``settle`` is then a no-op.
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                if self._settle is not None:
                    await self._settle()


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
        self._service = ImageGenerationService(
            config=self._config,
            router=ModelRouter(routes, replicas),
            accounts=self._accounts,
            store=self._store,
            metrics=self._metrics,
            enhancer=build_enhancer(self._config.prompt_enhancer, enhancer_handle),
        )

    def _start_background_work(self) -> None:
        """Retention sweeps, started once on the replica's event loop by the first request
        that needs them (the constructor may not run on that loop)."""
        self._store.start_sweeper()
        accounts = self._config.accounts
        self._accounts.start_stale_sweeper(
            self._config.stale_reservation_after_s, accounts.release_stale_every_s, accounts.idempotency_window_s
        )
        self._accounts.start_orphan_sweeper(self._live_owners, accounts.orphan_check_every_s)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/playground", include_in_schema=False)
    async def playground(self) -> Response:
        """A page to try the service in a browser (the key stays in the browser)."""
        return HTMLResponse(self._playground_page, headers=PLAYGROUND_HEADERS)

    @api.get("/playground/playground.js", include_in_schema=False)
    async def playground_script(self) -> Response:
        return Response(self._playground_script, media_type="text/javascript", headers=PLAYGROUND_HEADERS)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        try:
            models = await self._service.list_models(request.headers.get("authorization"))
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        return JSONResponse(models.model_dump(exclude_none=True))

    @api.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str, request: Request) -> Response:
        try:
            model = await self._service.retrieve_model(request.headers.get("authorization"), model_id)
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        return JSONResponse(model.model_dump(exclude_none=True))

    @api.get("/v1/usage")
    async def usage(self, request: Request) -> Response:
        self._start_background_work()
        try:
            usage = await self._service.usage(request.headers.get("authorization"))
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            return error_for(exc, request)
        return JSONResponse(usage)

    @api.api_route("/v1/files/images/{name:path}", methods=["GET", "HEAD"])
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

    @api.post("/v1/images/generations")
    async def generate_images(self, request: Request) -> Response:
        return await self._respond(request, "generations", self._read_json(request), self._service.generate)

    @api.post("/v1/images/edits")
    async def edit_images(self, request: Request) -> Response:
        return await self._respond(request, "edits", self._read_edit_form(request), self._service.edit)

    async def _respond(
        self, request: Request, endpoint: str, body: Awaitable[Any], serve: Callable[..., Awaitable[Any]]
    ) -> Response:
        """Read the body, serve it, and answer: the served response, or the error on the wire."""
        request_id = request_id_of(request)
        self._start_background_work()
        payload: Any = None
        try:
            payload = await body
            served = await serve(
                payload,
                authorization=request.headers.get("authorization"),
                request_id=request_id,
                base_url=_loopback_base_url(request),
                idempotency_key=request.headers.get("idempotency-key"),
            )
            response: Response
            if served.events is not None:  # stream: true
                headers = {**served.headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
                response = SettledStreamingResponse(
                    served.events, served.after_sent, media_type="text/event-stream", headers=headers
                )
            else:
                settle = None if served.after_sent is None else BackgroundTask(served.after_sent)
                response = JSONResponse(
                    served.body.model_dump(exclude_none=True), headers=served.headers, background=settle
                )
        except Exception as exc:  # noqa: BLE001 - mapped to the wire in one place
            response = error_for(exc, request)
        self._metrics.answered(endpoint, self._model_tag(payload), response.status_code)
        return response

    def _model_tag(self, payload: Any) -> str:
        """The request's model for a metric tag: a configured id, never a client's free text."""
        fields = payload.fields if isinstance(payload, EditUpload) else payload
        model = fields.get("model") if isinstance(fields, dict) else None
        return model if isinstance(model, str) and self._config.model(model) is not None else "unknown"

    async def _read_body(self, request: Request) -> bytes:
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
        return bytes(body)

    async def _read_json(self, request: Request) -> object:
        _require_media_type(request, "application/json")
        body = await self._read_body(request)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidRequest("The request body is not valid JSON.") from None
        except RecursionError:  # the parser's stack: no request of ours nests beyond a few levels
            raise InvalidRequest("The request body is nested too deeply.") from None

    async def _read_edit_form(self, request: Request) -> EditUpload:
        """OpenAI's edits form: text fields once each, ``image`` / ``image[]`` files, a ``mask`` file."""
        _require_media_type(request, "multipart/form-data")
        body = await self._read_body(request)  # bounded before the parser sees it

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=EDIT_MAX_FILES, max_fields=EDIT_MAX_FIELDS)
        except StarletteHTTPException as exc:  # too many parts, malformed multipart
            raise InvalidRequest(f"The multipart form could not be read: {exc.detail}") from None
        fields: dict[str, str | list[str]] = {}
        images: list[bytes] = []
        mask: bytes | None = None
        for name, value in form.multi_items():
            if isinstance(value, str) and name.endswith("[]"):
                # A list field, one part per item, as the OpenAI SDKs send arrays in a form
                # (`extra_lora_weights[]`); bounded by the form's field count and the model.
                items = fields.setdefault(name[:-2], [])
                if not isinstance(items, list):
                    raise InvalidRequest(f"Invalid '{name[:-2]}': send it once.", param=name[:-2])
                items.append(value)
            elif isinstance(value, str):
                if name in fields:
                    raise InvalidRequest(f"Invalid '{name}': send it once.", param=name)
                fields[name] = value
            elif name in ("image", "image[]"):
                images.append(await value.read())
            elif name == "mask" and mask is None:
                mask = await value.read()
            else:
                raise InvalidRequest(f"Invalid '{name}': unexpected file part.", param=name)
        return EditUpload(fields=fields, images=images, mask=mask)
