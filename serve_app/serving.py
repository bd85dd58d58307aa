"""The image generation use case, free of HTTP: testable against fakes.

Order matters and is the contract with billing: authenticate, validate, authorize, rate
limit, reserve credits, generate, deliver, then settle exactly what was delivered. The
settlement runs even when the client disconnects or generation fails, so a reservation
is never left hanging and nothing undelivered is charged: the charge is settled once the
response has been handed over.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.accounts import Settlement
from serve_app.accounts.units import format_credits
from serve_app.config import AppConfig, ModelConfig
from serve_app.enhancer import ENHANCE_HEADER, PromptEnhancer, enhance_prompt
from serve_app.errors import (
    ContentFlagged,
    IdempotencyConflict,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    UpstreamError,
)
from serve_app.image_input import ImageInputPolicy, decode_image, image_from_field, mask_from_png
from serve_app.metrics import NoMetrics, ServiceMetrics
from serve_app.planning import GenerationPlan, plan_generation
from serve_app.protocol import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    parse_edit_request,
    parse_generation_request,
)
from serve_app.routing import ModelRouter
from serve_app.storage import CONTENT_TYPES
from serve_app.streaming import CompletedEvent, EventPrefix, PartialImageEvent, error_event, sse
from serve_app.work import GeneratedImage, PreviewImage

logger = logging.getLogger("ray.serve")


class AccountsPort(Protocol):
    """What the service needs from accounts (``serve_app.accounts.Accounts``)."""

    async def authenticate(self, authorization: str | None) -> Any: ...

    def check_model(self, key: Any, model_id: str) -> None: ...

    async def admit(self, key: Any, images: int) -> dict[str, str]: ...

    async def reserve(self, key: Any, request_id: str, model_id: str, images: int, price_units: int) -> Any: ...

    async def settle(self, reservation: Any, delivered: int) -> Settlement: ...

    async def usage(self, key: Any) -> Any: ...

    async def claim_idempotency(self, key: Any, idem_key: str, fingerprint: str, stale_after_s: float) -> Any: ...

    async def complete_idempotency(self, key: Any, idem_key: str, outcome: bytes) -> None: ...

    async def release_idempotency(self, key: Any, idem_key: str) -> None: ...


class ImageStorePort(Protocol):
    needs_request_base_url: bool

    async def put(self, name: str, data: bytes, content_type: str, base_url: str | None) -> str: ...


@dataclass
class ServedResponse:
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    # Run once the response is handed to the client: settles the charge.
    after_sent: Callable[[], Awaitable[None]] | None = None
    # ``stream: true``: the server-sent events to answer with (``body`` is then None). The
    # stream settles the charge as it ends; ``after_sent`` settles it too (a no-op then), for
    # a response that ends before the stream ever started.
    events: AsyncGenerator[bytes, None] | None = None


@dataclass
class _StreamDelivery:
    """The ``completed`` events a stream handed over, and whether its charge is settled:
    the stream and its response both settle as they end, and only the first one counts."""

    delivered: int = 0
    settled: bool = False


@dataclass(frozen=True)
class EditUpload:
    """The parts of an edits form: its text fields, its image files, its mask file."""

    fields: dict[str, str | list[str]]  # a list for `name[]` parts
    images: list[bytes]
    mask: bytes | None = None

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode())
        for part in [*self.images, self.mask or b""]:
            digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()


IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, as Stripe and OpenAI take
# Headers of a first outcome that a replay repeats (the rate-limit headers were of that moment).
# How many images the safety checker withheld (only when it withheld some).
FLAGGED_HEADER = "x-images-flagged"
REPLAYED_HEADERS = ("x-credits-charged", "x-credits-remaining", ENHANCE_HEADER, FLAGGED_HEADER)
IDEMPOTENCY_POLL_S = 0.25


def _outcome(served: ServedResponse) -> bytes:
    headers = {name: served.headers[name] for name in REPLAYED_HEADERS if name in served.headers}
    return json.dumps({"body": served.body.model_dump(exclude_none=True), "headers": headers}).encode()


def _replayed(outcome: bytes | None) -> ServedResponse:
    stored = json.loads(outcome or b"{}")
    return ServedResponse(
        body=ImagesResponse.model_validate(stored["body"]), headers={**stored["headers"], "idempotent-replayed": "true"}
    )


def _check_streamable(idempotency_key: str | None) -> None:
    # A replay would have to store and resend every event; a stream is not repeatable.
    if idempotency_key is not None:
        raise InvalidRequest(
            "Invalid 'Idempotency-Key': not supported with stream: true; retry a stream without it.",
            param="Idempotency-Key",
        )


class ImageGenerationService:
    def __init__(
        self,
        config: AppConfig,
        router: ModelRouter,
        accounts: AccountsPort,
        store: ImageStorePort | None = None,
        clock: Callable[[], float] = time.time,
        metrics: ServiceMetrics | None = None,
        enhancer: PromptEnhancer | None = None,
    ) -> None:
        self._config = config
        self._enhancer = enhancer
        self._router = router
        self._accounts = accounts
        self._store = store
        self._clock = clock
        self._metrics = metrics or NoMetrics()

    async def list_models(self, authorization: str | None) -> ModelList:
        """The models this key may use."""
        key = await self._accounts.authenticate(authorization)
        created = int(self._clock())
        return ModelList(
            data=[ModelCard(id=model.id, created=created) for model in self._config.models if key.may_use(model.id)]
        )

    async def retrieve_model(self, authorization: str | None, model_id: str) -> ModelCard:
        key = await self._accounts.authenticate(authorization)
        model = self._permitted_model(key, model_id)
        return ModelCard(
            id=model.id,
            created=int(self._clock()),
            adapters=sorted(model.loras),
            safety_checker=model.safety_checker is not None,
        )

    async def usage(self, authorization: str | None) -> dict[str, Any]:
        """Balance, and images and credits by model, for the calling key."""
        key = await self._accounts.authenticate(authorization)
        return (await self._accounts.usage(key)).as_json()

    async def generate(
        self,
        payload: object,
        *,
        authorization: str | None,
        request_id: str,
        base_url: str | None,
        idempotency_key: str | None = None,
    ) -> ServedResponse:
        """``POST /v1/images/generations``: text-to-image, or image-to-image with ``image``."""
        key = await self._accounts.authenticate(authorization)

        def fingerprint() -> str:
            return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

        async def run() -> ServedResponse:
            request = parse_generation_request(payload)
            model = self._permitted_model(key, request.model)
            if request.image is None:
                plan = plan_generation(request, model)
            else:
                # Decoding (and fetching a URL) and fitting the image are blocking: off the loop.
                policy = self._policy(model)
                image = await asyncio.to_thread(image_from_field, request.image, param="image", policy=policy)
                plan = await asyncio.to_thread(plan_generation, request, model, image)
            if request.stream:
                _check_streamable(idempotency_key)
                return await self._serve_stream(key, request, model, plan, request_id, "image_generation")
            return await self._serve(key, request, model, plan, request_id, base_url)

        return await self._once(key, idempotency_key, fingerprint, run)

    async def edit(
        self,
        upload: EditUpload,
        *,
        authorization: str | None,
        request_id: str,
        base_url: str | None,
        idempotency_key: str | None = None,
    ) -> ServedResponse:
        """``POST /v1/images/edits``: image-to-image, or inpainting with a mask."""
        key = await self._accounts.authenticate(authorization)

        async def run() -> ServedResponse:
            request = parse_edit_request(upload.fields)
            model = self._permitted_model(key, request.model)
            if not upload.images:
                raise InvalidRequest("Missing required parameter: 'image'.", param="image")
            if len(upload.images) > model.rules.max_reference_images:
                raise InvalidRequest(
                    f"Invalid 'image': model '{model.id}' uses at most {model.rules.max_reference_images} input "
                    f"image(s), got {len(upload.images)}.",
                    param="image",
                )
            plan = await asyncio.to_thread(self._plan_edit, request, model, upload)
            if request.stream:
                _check_streamable(idempotency_key)
                return await self._serve_stream(key, request, model, plan, request_id, "image_edit")
            return await self._serve(key, request, model, plan, request_id, base_url)

        return await self._once(key, idempotency_key, upload.fingerprint, run)

    async def _once(
        self,
        key: Any,
        idem_key: str | None,
        fingerprint: Callable[[], str],
        run: Callable[[], Awaitable[ServedResponse]],
    ) -> ServedResponse:
        """Run the request, or with an ``Idempotency-Key`` return its first successful outcome:
        the same images and charge, nothing generated or charged again. A repeat while the
        first attempt runs waits for it (across ingress replicas: the claim is in the
        database). A failed attempt charged nothing and is forgotten, so its retry runs anew."""
        if idem_key is None:
            return await run()
        if not IDEMPOTENCY_KEY.fullmatch(idem_key):
            raise InvalidRequest(
                "Invalid 'Idempotency-Key': 1 to 255 printable ASCII characters.", param="Idempotency-Key"
            )
        stale_after_s = self._config.stale_reservation_after_s
        digest = fingerprint()  # what the request asks, so a reuse for another request is caught
        deadline = time.monotonic() + self._config.longest_request_s + 30
        while True:
            state, outcome = await self._accounts.claim_idempotency(key, idem_key, digest, stale_after_s)
            if state == "claimed":
                break
            if state == "done":
                return _replayed(outcome)
            if state == "conflict":
                raise IdempotencyConflict(
                    "This Idempotency-Key was already used for a different request; use a new key for a new request.",
                    param="Idempotency-Key",
                )
            if time.monotonic() > deadline:
                raise IdempotencyConflict(
                    "A request with this Idempotency-Key is still running; retry later.",
                    param="Idempotency-Key",
                    code="idempotency_key_in_use",
                    retry_after_s=10,
                )
            await asyncio.sleep(IDEMPOTENCY_POLL_S)
        try:
            served = await run()
        except BaseException:
            await self._accounts.release_idempotency(key, idem_key)
            raise
        await self._accounts.complete_idempotency(key, idem_key, _outcome(served))
        return served

    def _permitted_model(self, key: Any, model_id: str) -> ModelConfig:
        model = self._config.model(model_id)
        if model is None:
            raise ModelNotFound(model_id)
        self._accounts.check_model(key, model.id)
        return model

    def _policy(self, model: ModelConfig) -> ImageInputPolicy:
        sources = self._config.image_input
        return ImageInputPolicy(
            max_bytes=model.limits.max_input_image_bytes,
            max_pixels=model.limits.max_input_image_pixels,
            allowed_url_hosts=tuple(sources.allowed_url_hosts),
            allow_private_addresses=sources.allow_private_addresses,
            fetch_timeout_s=sources.fetch_timeout_s,
        )

    def _plan_edit(self, request: ImageGenerationRequest, model: ModelConfig, upload: EditUpload) -> GenerationPlan:
        """Decode the upload and plan it: blocking CPU work, run in a thread."""
        policy = self._policy(model)
        image = decode_image(upload.images[0], param="image", policy=policy)
        mask = None if upload.mask is None else mask_from_png(upload.mask, image_size=image.size, policy=policy)
        return plan_generation(request, model, image, mask)

    async def _serve(
        self,
        key: Any,
        request: ImageGenerationRequest,
        model: ModelConfig,
        plan: GenerationPlan,
        request_id: str,
        base_url: str | None,
    ) -> ServedResponse:
        """Admit, reserve, generate, deliver, and settle exactly what was delivered."""
        self._check_extensions(key, request)
        if plan.response_format == "url":
            if self._store is None:
                raise InvalidRequest(
                    "Invalid 'response_format': url delivery is not configured.", param="response_format"
                )
            if base_url is None and self._store.needs_request_base_url:
                # The Host header is the client's to choose: a URL built from it could point anywhere.
                raise InvalidRequest(
                    "Invalid 'response_format': url delivery through this address needs the operator to set "
                    "storage.local.public_base_url.",
                    param="response_format",
                )

        headers = dict(await self._accounts.admit(key, request.n))
        reservation = await self._accounts.reserve(key, request_id, model.id, request.n, model.price_units)
        try:
            if request.enhance_prompt:
                plan = await self._enhanced(plan, model, headers)
            delivered, flagged = await self._generate_and_deliver(plan, model, request_id, base_url)
        except BaseException:
            # Failure or client disconnect: refund it all. settle() is shielded, so the
            # cancellation that a disconnect brings cannot stop the refund.
            await self._settle(reservation, 0, request_id)
            raise
        # The charge is settled once the response has been handed over (``after_sent``), not
        # before: a replica that dies in between leaves the reservation to be refunded (it
        # cannot know the images arrived), never a charge for images that did not. The
        # headers say what that settlement will be.
        headers.update(reservation.settlement_if(len(delivered)).credit_headers())
        if flagged:
            headers[FLAGGED_HEADER] = str(flagged)
        body = ImagesResponse(
            created=int(self._clock()),
            data=delivered,
            output_format=plan.output_format,
            size=plan.size,
            quality=plan.quality_label,
            background="opaque" if request.background is not None else None,
        )
        return ServedResponse(
            body=body,
            headers=headers,
            after_sent=functools.partial(self._settle, reservation, len(delivered), request_id),
        )

    def _check_extensions(self, key: Any, request: ImageGenerationRequest) -> None:
        if request.disable_safety_checker and not key.may_disable_safety_checker:
            raise PermissionDenied(
                "Invalid 'disable_safety_checker': this API key may not turn the safety checker off.",
                param="disable_safety_checker",
            )
        if request.enhance_prompt and self._enhancer is None:
            raise InvalidRequest(
                "Invalid 'enhance_prompt': no prompt enhancer is configured on this service.", param="enhance_prompt"
            )

    async def _enhanced(self, plan: GenerationPlan, model: ModelConfig, headers: dict[str, str]) -> GenerationPlan:
        """The plan with the enhancer's prompt (the original one if it fails: the header says which)."""
        assert self._enhancer is not None and self._config.prompt_enhancer is not None
        enhancement = await enhance_prompt(
            self._enhancer, plan.prompt, self._config.prompt_enhancer.timeout_s, model.limits.max_prompt_chars
        )
        headers[ENHANCE_HEADER] = "applied" if enhancement.applied else "failed"
        return dataclasses.replace(plan, prompt=enhancement.prompt)

    async def _serve_stream(
        self,
        key: Any,
        request: ImageGenerationRequest,
        model: ModelConfig,
        plan: GenerationPlan,
        request_id: str,
        prefix: EventPrefix,
    ) -> ServedResponse:
        """Check, admit and reserve as ``_serve`` does, and enhance the prompt, all before the
        first byte (so a refusal is still a plain HTTP error), then answer with the events of
        ``_stream_events``."""
        self._check_extensions(key, request)
        await self._router.ensure_available(model.id)
        headers = dict(await self._accounts.admit(key, request.n))
        reservation = await self._accounts.reserve(key, request_id, model.id, request.n, model.price_units)
        headers["x-credits-reserved"] = format_credits(reservation.amount_units)
        if request.enhance_prompt:
            try:
                plan = await self._enhanced(plan, model, headers)
            except BaseException:
                await self._settle(reservation, 0, request_id)
                raise
        delivery = _StreamDelivery()
        events = self._stream_events(reservation, plan, model, request_id, prefix, delivery)
        # A stream that never starts (the client left before its first event) runs no
        # ``finally``: the response settles it as it ends, however it ends.
        settle = functools.partial(self._settle_stream, reservation, delivery, request_id)
        return ServedResponse(body=None, headers=headers, events=events, after_sent=settle)

    async def _stream_events(
        self,
        reservation: Any,
        plan: GenerationPlan,
        model: ModelConfig,
        request_id: str,
        prefix: EventPrefix,
        delivery: _StreamDelivery,
    ) -> AsyncGenerator[bytes, None]:
        """Previews and images as the model yields them; settles, as the stream ends, exactly
        the images whose ``completed`` event was handed over (a client that goes away is
        refunded the rest). A failure after the first byte is an ``error`` event."""
        flagged = 0
        common = {
            "background": "opaque",
            "output_format": plan.output_format,
            "quality": plan.quality_label or "auto",
            "size": plan.size,
        }
        try:
            jobs = plan.jobs(request_id, model.batching.max_batch_images)
            async for item in self._router.stream(model.id, jobs):
                b64 = base64.b64encode(item.data if isinstance(item, PreviewImage) else item.image.data).decode("ascii")
                if isinstance(item, PreviewImage):
                    event: PartialImageEvent | CompletedEvent = PartialImageEvent(
                        type=f"{prefix}.partial_image",
                        b64_json=b64,
                        created_at=int(self._clock()),
                        image_index=item.image_index,
                        partial_image_index=item.partial_image_index,
                        step=item.step,
                        total_steps=item.total_steps,
                        **common,
                    )
                else:
                    if not 0 <= item.image_index < len(plan.seeds) or item.image.seed != plan.seeds[item.image_index]:
                        raise UpstreamError(f"The model '{model.id}' returned an inconsistent result.")
                    if item.image.flagged:  # withheld by the safety checker: no event, no charge
                        flagged += 1
                        continue
                    settlement = reservation.settlement_if(delivery.delivered + 1)
                    event = CompletedEvent(
                        type=f"{prefix}.completed",
                        b64_json=b64,
                        created_at=int(self._clock()),
                        image_index=item.image_index,
                        seed=item.image.seed,
                        revised_prompt=plan.prompt,
                        credits_charged=format_credits(settlement.charged_units),
                        credits_remaining=format_credits(settlement.balance_units),
                        **common,
                    )
                yield sse(event)
                # The consumer asked for the next event: this one was handed over.
                if isinstance(event, CompletedEvent):
                    delivery.delivered += 1
            if flagged and not delivery.delivered:
                raise ContentFlagged(
                    "The safety checker flagged every generated image; nothing was delivered or charged. "
                    "Change the prompt or the seed.",
                )
        except Exception as exc:  # noqa: BLE001 - the stream's last event, in the documented shape
            yield error_event(exc, request_id)
        finally:
            await self._settle_stream(reservation, delivery, request_id)

    async def _settle_stream(self, reservation: Any, delivery: _StreamDelivery, request_id: str) -> None:
        if not delivery.settled:
            delivery.settled = True
            await self._settle(reservation, delivery.delivered, request_id)

    async def _settle(self, reservation: Any, delivered: int, request_id: str) -> None:
        settlement = await self._accounts.settle(reservation, delivered)
        self._metrics.settled(
            reservation.model, settlement.delivered, settlement.charged_units, settlement.refunded_units
        )
        logger.info(
            "request %s settled: model=%s images=%d/%d charged_units=%d refunded_units=%d",
            request_id,
            reservation.model,
            settlement.delivered,
            reservation.images,
            settlement.charged_units,
            settlement.refunded_units,
        )

    async def _generate_and_deliver(
        self, plan: GenerationPlan, model: ModelConfig, request_id: str, base_url: str | None
    ) -> tuple[list[ImageData], int]:
        """The images to deliver, and how many the safety checker withheld."""
        results = await self._router.generate(model.id, plan.jobs(request_id, model.batching.max_batch_images))
        images = [image for result in results for image in result.images]
        if [image.seed for image in images] != list(plan.seeds):
            raise UpstreamError(f"The model '{model.id}' returned an incomplete result.")
        passed = [image for image in images if not image.flagged]
        if not passed:
            raise ContentFlagged(
                "The safety checker flagged every generated image; nothing was delivered or charged. "
                "Change the prompt or the seed.",
            )
        flagged = len(images) - len(passed)
        if plan.response_format == "url":
            return await self._store_all(passed, plan, request_id, base_url), flagged
        data = [
            ImageData(
                b64_json=base64.b64encode(image.data).decode("ascii"), revised_prompt=plan.prompt, seed=image.seed
            )
            for image in passed
        ]
        return data, flagged

    async def _store_all(
        self, images: Sequence[GeneratedImage], plan: GenerationPlan, request_id: str, base_url: str | None
    ) -> list[ImageData]:
        assert self._store is not None
        stored = await asyncio.gather(
            *(
                self._store.put(
                    f"{request_id}/{index}.{image.output_format}",
                    image.data,
                    CONTENT_TYPES[image.output_format],
                    base_url,
                )
                for index, image in enumerate(images)
            ),
            return_exceptions=True,
        )
        data = []
        for image, url in zip(images, stored):
            if isinstance(url, BaseException):
                logger.warning("request %s: could not store image seed %d: %s", request_id, image.seed, url)
                continue
            data.append(ImageData(url=url, revised_prompt=plan.prompt, seed=image.seed))
        if not data:
            raise UpstreamError("The generated images could not be stored; nothing was charged.")
        return data
