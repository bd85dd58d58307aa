"""The image generation use case, free of HTTP: testable against fakes.

Every image request, JSON or stream, has one life (``_serve``): authenticate (the ingress,
before reading the body), validate and authorize what is cheap to check, admit (rate
limit), reserve (a ``Charge``, with the Idempotency-Key claim in the same transaction),
then decode the large inputs on their own pool, plan, generate through the model's one
streaming path, and answer with chunks that ``serve_app.charge.hand_over`` sends and
settles exactly once for what was handed over. A JSON answer drains the same generation
that a stream relays.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from serve_app.accounts.records import IdempotencyClaim, Replay, Reservation, Settlement
from serve_app.accounts.units import format_credits
from serve_app.charge import Charge, Chunk, ServedResponse, one_chunk
from serve_app.config import AppConfig, ModelConfig
from serve_app.edit_inputs import FilesPort, decode_edit_inputs, from_json, from_upload
from serve_app.enhancer import ENHANCE_HEADER, PromptEnhancer, enhance_prompt
from serve_app.errors import (
    ContentFlagged,
    IdempotencyConflict,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    UpstreamError,
)
from serve_app.image_input import Decoder, ImageInputPolicy, decode_image
from serve_app.lane import INTERACTIVE, Lane
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
    parse_variation_request,
)
from serve_app.routing import ModelRouter
from serve_app.storage import CONTENT_TYPES, StorageError
from serve_app.streaming import CompletedEvent, EventPrefix, PartialImageEvent, error_event, sse
from serve_app.usage import Usage, count_usage
from serve_app.work import GeneratedImage, PreviewImage, StreamedImage, StreamItem

logger = logging.getLogger("ray.serve")


class AccountsPort(Protocol):
    """What the service needs from accounts (``serve_app.accounts.Accounts``)."""

    async def authenticate(self, authorization: str | None) -> Any: ...

    def check_model(self, key: Any, model_id: str) -> None: ...

    async def admit(self, key: Any, images: int) -> dict[str, str]: ...

    async def reserve(
        self,
        key: Any,
        request_id: str,
        model_id: str,
        images: int,
        price_units: int,
        claim: IdempotencyClaim | None = None,
    ) -> Reservation | Replay: ...

    async def settle(self, reservation: Any, delivered: int, outcome: bytes | None = None) -> Settlement: ...

    async def usage(self, key: Any) -> Any: ...


class ImageStorePort(Protocol):
    """What the service needs from storage (``serve_app.storage.ImageStore``)."""

    needs_request_base_url: bool
    url_ttl_s: int

    async def save(self, name: str, data: bytes, content_type: str) -> str: ...

    async def url(self, stored: str, base_url: str | None, expires_at: int) -> str: ...

    async def load(self, stored: str) -> bytes: ...


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


RequestT = TypeVar("RequestT", bound=ImageGenerationRequest)

# What turns a request's large inputs (an image, a mask) into its plan: awaited after the
# reservation; the decoding runs on the decoder's own bounded pool.
Planner = Callable[[], Awaitable[GenerationPlan]]

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, as Stripe and OpenAI take
# How many images the safety checker withheld (only when it withheld some).
FLAGGED_HEADER = "x-images-flagged"
# Headers of a first outcome that a replay repeats (the rate-limit headers were of that moment).
REPLAYED_HEADERS = ("x-credits-charged", "x-credits-remaining", ENHANCE_HEADER, FLAGGED_HEADER)
ALL_FLAGGED = (
    "The safety checker flagged every generated image; nothing was delivered or charged. Change the prompt or the seed."
)


def _outcome(
    body: ImagesResponse, stored: list[str | None], response_format: str, expires_at: int, headers: dict[str, str]
) -> bytes:
    """What a replay answers: the response without its images (names of their stored
    copies instead), and the headers that describe the charge."""
    bare = body.model_copy(
        update={"data": [item.model_copy(update={"b64_json": None, "url": None}) for item in body.data]}
    )
    replayed = {name: headers[name] for name in REPLAYED_HEADERS if name in headers}
    return json.dumps(
        {
            "body": bare.model_dump(exclude_none=True),
            "stored": stored,
            "format": response_format,
            "expires_at": expires_at,
            "headers": replayed,
        }
    ).encode()


def _usage(plan: GenerationPlan, made: Sequence[GeneratedImage], delivered: Sequence[GeneratedImage]) -> Usage:
    """OpenAI's ``usage`` (units in serve_app/usage.py): the request's input once (the prompt's
    tokens, as the replica counted them for the images it ``made``, and the input image at the
    size the model saw it), and the output of the ``delivered`` images only."""
    inputs = [] if plan.image is None else [(plan.image.width, plan.image.height)]
    inputs += [(image.width, image.height) for image in plan.references]
    text_tokens = max((image.text_tokens for image in made), default=0)
    return count_usage(text_tokens, inputs, [(image.width, image.height) for image in delivered])


def _json_answer(body: ImagesResponse, headers: dict[str, str], charge: Charge | None, images: int) -> ServedResponse:
    data = json.dumps(body.model_dump(exclude_none=True), separators=(",", ":")).encode()
    headers["content-length"] = str(len(data))
    return ServedResponse(
        chunks=one_chunk(Chunk(data, images)), media_type="application/json", headers=headers, charge=charge, body=body
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
        decoder: Decoder | None = None,
        files: FilesPort | None = None,
    ) -> None:
        self._config = config
        self._files = files  # the Files API, where edits' file_id inputs are read
        self._decoder = decoder or Decoder(config.image_input.decode_threads)
        self._enhancer = enhancer
        self._router = router
        self._accounts = accounts
        self._store = store
        self._clock = clock
        self._metrics = metrics or NoMetrics()

    def _claim(
        self, idempotency_key: str | None, fingerprint: Callable[[], str], stream: bool
    ) -> IdempotencyClaim | None:
        if idempotency_key is None:
            return None
        if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise InvalidRequest(
                "Invalid 'Idempotency-Key': 1 to 255 printable ASCII characters.", param="Idempotency-Key"
            )
        if stream:  # a replay would have to store and resend every event; a stream is not repeatable
            raise InvalidRequest(
                "Invalid 'Idempotency-Key': not supported with stream: true; retry a stream without it.",
                param="Idempotency-Key",
            )
        if self._store is None:  # outcomes refer to stored images
            raise InvalidRequest(
                "Invalid 'Idempotency-Key': this service has no image storage to keep outcomes in.",
                param="Idempotency-Key",
            )
        return IdempotencyClaim(idempotency_key, fingerprint(), self._config.idempotency_replay_window_s)

    async def authenticate(self, authorization: str | None) -> Any:
        """The caller's key: first, before any of the request's body is read."""
        return await self._accounts.authenticate(authorization)

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
        key: Any,
        payload: object,
        *,
        request_id: str,
        base_url: str | None,
        idempotency_key: str | None = None,
        lane: Lane = INTERACTIVE,
    ) -> ServedResponse:
        """``POST /v1/images/generations``: text-to-image, or image-to-image with ``image``.
        ``lane``: a Batch API line's price, admission and priority (``serve_app.lane``)."""
        request = parse_generation_request(payload)
        model = self._requested_model(key, request)
        request = self._with_default_response_format(request, model, base_url)
        if request.image is None:
            plan = plan_generation(request, model)  # validated before admission

            async def planner() -> GenerationPlan:
                return plan

        else:
            policy = self._policy(model)
            source = request.image

            async def planner() -> GenerationPlan:
                # Fetching or decoding the image, and fitting it: after the reservation.
                image = await self._decoder.image_from_field(source, param="image", policy=policy)
                return await self._decoder.run(plan_generation, request, model, image)

        def fingerprint() -> str:
            return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

        claim = self._claim(idempotency_key, fingerprint, request.stream)
        return await self._serve(
            key, request, model, planner, claim, request_id, base_url, "image_generation", lane=lane
        )

    async def edit(
        self,
        key: Any,
        upload: EditUpload | object,
        *,
        request_id: str,
        base_url: str | None,
        idempotency_key: str | None = None,
        lane: Lane = INTERACTIVE,
    ) -> ServedResponse:
        """``POST /v1/images/edits``: image-to-image, inpainting with a mask, or a
        multi-reference edit. ``upload`` is the multipart form (``EditUpload``) or the
        decoded JSON body (``images: [{image_url | file_id}]``, ``mask``): both give the same
        plan; their images are fetched, loaded and decoded after the reservation."""
        inputs = from_upload(upload) if isinstance(upload, EditUpload) else from_json(upload)
        request = parse_edit_request(inputs.fields, strict=inputs.json)
        model = self._requested_model(key, request)
        request = self._with_default_response_format(request, model, base_url)
        if not inputs.images:
            raise InvalidRequest(f"Missing required parameter: '{inputs.images_param}'.", param=inputs.images_param)
        if len(inputs.images) > model.rules.max_reference_images:
            raise InvalidRequest(
                f"Invalid '{inputs.images_param}': model '{model.id}' uses at most "
                f"{model.rules.max_reference_images} input image(s), got {len(inputs.images)}.",
                param=inputs.images_param,
            )
        policy = self._policy(model)

        async def planner() -> GenerationPlan:
            images, mask = await decode_edit_inputs(
                inputs, decoder=self._decoder, policy=policy, files=self._files, key=key
            )
            return await self._decoder.run(plan_generation, request, model, images[0], mask, images[1:])

        claim = self._claim(idempotency_key, lambda: inputs.fingerprint, request.stream)
        return await self._serve(key, request, model, planner, claim, request_id, base_url, "image_edit", lane=lane)

    async def variation(
        self,
        key: Any,
        upload: EditUpload,
        *,
        request_id: str,
        base_url: str | None,
        idempotency_key: str | None = None,
        lane: Lane = INTERACTIVE,
    ) -> ServedResponse:
        """``POST /v1/images/variations``: image-to-image from the one ``image`` with an empty
        prompt, at the model's ``defaults.variation_strength`` (or the ``strength`` sent),
        billed like a generation."""
        request = parse_variation_request(upload.fields)
        model = self._requested_model(key, request)
        if not upload.images:
            raise InvalidRequest("Missing required parameter: 'image'.", param="image")
        if len(upload.images) > 1:
            raise InvalidRequest(
                f"Invalid 'image': a variation is made from one image, got {len(upload.images)}.", param="image"
            )
        if request.strength is None:
            request = request.model_copy(update={"strength": model.defaults.variation_strength})
        request = self._with_default_response_format(request, model, base_url)
        policy = self._policy(model)

        def decode_and_plan() -> GenerationPlan:
            return plan_generation(request, model, decode_image(upload.images[0], param="image", policy=policy))

        async def planner() -> GenerationPlan:
            return await self._decoder.run(decode_and_plan)

        claim = self._claim(idempotency_key, upload.fingerprint, request.stream)
        # Never streamed (the request refuses stream: true), so the event prefix is unused.
        return await self._serve(key, request, model, planner, claim, request_id, base_url, "image_edit", lane=lane)

    def _requested_model(self, key: Any, request: ImageGenerationRequest) -> ModelConfig:
        """The request's model, or the config's default model when it names none (absent or null)."""
        return self._permitted_model(key, request.model if request.model is not None else self._config.default_model_id)

    def _with_default_response_format(self, request: RequestT, model: ModelConfig, base_url: str | None) -> RequestT:
        """``request`` with its ``response_format`` decided when it sends none: the model's
        ``defaults.response_format``, but b64_json where this request cannot be given a URL
        (no storage, or local files without public_base_url reached through a non-loopback
        address). A stream always carries base64."""
        if request.response_format is not None or request.stream:
            return request
        chosen = model.defaults.response_format
        if chosen == "url" and (self._store is None or (base_url is None and self._store.needs_request_base_url)):
            chosen = "b64_json"
        return request.model_copy(update={"response_format": chosen})

    async def _serve(
        self,
        key: Any,
        request: ImageGenerationRequest,
        model: ModelConfig,
        planner: Planner,
        claim: IdempotencyClaim | None,
        request_id: str,
        base_url: str | None,
        prefix: EventPrefix,
        *,
        lane: Lane = INTERACTIVE,
    ) -> ServedResponse:
        """The one lifecycle of every image request, JSON or stream: check what is cheap to
        check, admit (rate limit), reserve (the Charge), then decode, plan, enhance, and
        answer with the chunks that ``hand_over`` sends and settles. A replay of an
        Idempotency-Key is admitted and permission-checked like any request, and served
        from its stored outcome without a charge."""
        self._check_extensions(key, request)
        if not request.stream:
            self._check_url_delivery(request, base_url)
        await self._router.ensure_available(model.id)  # a 503 before anything is held
        headers = dict(await self._accounts.admit(key, request.n)) if lane.rate_limited else {}
        price_units = lane.price_units(model.price_units)
        held = await self._accounts.reserve(key, request_id, model.id, request.n, price_units, claim)
        if isinstance(held, Replay):
            return await self._replayed(held, base_url)
        charge = Charge(self._accounts, held, request_id, self._metrics)
        try:
            plan = await planner()
            if lane.priority != plan.priority:
                plan = dataclasses.replace(plan, priority=lane.priority)
            if request.enhance_prompt:
                plan = await self._enhanced(plan, model, headers)
            if request.stream:
                headers["x-credits-reserved"] = format_credits(held.amount_units)
                events = self._events(charge, plan, model, request_id, prefix)
                return ServedResponse(chunks=events, media_type="text/event-stream", headers=headers, charge=charge)
            return await self._answer(charge, plan, model, request, request_id, base_url, headers, claim is not None)
        except BaseException:
            # Failed before the answer existed, or the client left (cancelled): nothing was
            # handed over. Shielded inside, so the cancellation cannot stop the refund.
            await charge.refund()
            raise

    def _check_url_delivery(self, request: ImageGenerationRequest, base_url: str | None) -> None:
        if (request.response_format or "b64_json") != "url":
            return
        if self._store is None:
            raise InvalidRequest("Invalid 'response_format': url delivery is not configured.", param="response_format")
        if base_url is None and self._store.needs_request_base_url:
            # The Host header is the client's to choose: a URL built from it could point anywhere.
            raise InvalidRequest(
                "Invalid 'response_format': url delivery through this address needs the operator to set "
                "storage.local.public_base_url.",
                param="response_format",
            )

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
            max_jpeg_scans=sources.max_jpeg_scans,
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

    async def _answer(
        self,
        charge: Charge,
        plan: GenerationPlan,
        model: ModelConfig,
        request: ImageGenerationRequest,
        request_id: str,
        base_url: str | None,
        headers: dict[str, str],
        replayable: bool,
    ) -> ServedResponse:
        """The JSON answer: the generation drained, the images delivered (base64 or stored
        behind URLs). The headers say what the settlement will charge once it is handed over.
        With an Idempotency-Key, the images are stored too and the charge carries the
        outcome that refers to them."""
        images = [image async for image in self._images(plan, model, request_id)]
        passed = [image for image in images if not image.flagged]
        if not passed:
            raise ContentFlagged(ALL_FLAGGED)
        expires_at = int(self._clock()) + (self._store.url_ttl_s if self._store is not None else 0)
        stored: list[str | None] = [None] * len(passed)
        if plan.response_format == "url" or replayable:
            stored = await self._save_all(passed, request_id)
        if plan.response_format == "url":
            kept = [(image, name) for image, name in zip(passed, stored) if name is not None]
            if not kept:
                raise UpstreamError("The generated images could not be stored; nothing was charged.")
            passed, stored = [image for image, _ in kept], [name for _, name in kept]
            urls = await asyncio.gather(*(self._store.url(name, base_url, expires_at) for name in stored))
            data = [ImageData(url=url, revised_prompt=plan.prompt, seed=i.seed) for i, url in zip(passed, urls)]
        else:
            data = [
                ImageData(b64_json=base64.b64encode(i.data).decode("ascii"), revised_prompt=plan.prompt, seed=i.seed)
                for i in passed
            ]
        headers.update(charge.settlement_if(len(data)).credit_headers())
        if len(images) > len(passed):
            headers[FLAGGED_HEADER] = str(len(images) - len(passed))
        body = ImagesResponse(
            created=int(self._clock()),
            data=data,
            output_format=plan.output_format,
            size=plan.size,
            quality=plan.quality_label,
            background="opaque" if request.background is not None else None,
            usage=_usage(plan, images, passed),
        )
        if replayable and None not in stored:
            charge.outcome = _outcome(body, stored, plan.response_format, expires_at, headers)
        return _json_answer(body, headers, charge, len(data))

    async def _save_all(self, images: Sequence[GeneratedImage], request_id: str) -> list[str | None]:
        """Each image's stored name, None where storing failed (logged)."""
        assert self._store is not None
        saved = await asyncio.gather(
            *(
                self._store.save(
                    f"{request_id}/{index}.{image.output_format}", image.data, CONTENT_TYPES[image.output_format]
                )
                for index, image in enumerate(images)
            ),
            return_exceptions=True,
        )
        names: list[str | None] = []
        for image, name in zip(images, saved):
            if isinstance(name, BaseException):
                logger.warning("request %s: could not store image seed %d: %s", request_id, image.seed, name)
                names.append(None)
            else:
                names.append(name)
        return names

    async def _replayed(self, replay: Replay, base_url: str | None) -> ServedResponse:
        """A charged first outcome, answered again: its images loaded back from storage (or
        fresh URLs signed for them), its headers as they were, no charge."""
        assert self._store is not None
        outcome = json.loads(replay.outcome)
        body = ImagesResponse.model_validate(outcome["body"])
        names = outcome["stored"]
        try:
            if outcome["format"] == "url":
                found = await asyncio.gather(*(self._store.url(n, base_url, outcome["expires_at"]) for n in names))
                data = [item.model_copy(update={"url": url}) for item, url in zip(body.data, found)]
            else:
                found = await asyncio.gather(*(self._store.load(name) for name in names))
                data = [
                    item.model_copy(update={"b64_json": base64.b64encode(image).decode("ascii")})
                    for item, image in zip(body.data, found)
                ]
        except StorageError:
            raise IdempotencyConflict(
                "The first outcome of this Idempotency-Key is no longer stored; use a new key for a new request.",
                param="Idempotency-Key",
                code="idempotency_key_expired",
            ) from None
        headers = {**outcome["headers"], "idempotent-replayed": "true"}
        return _json_answer(body.model_copy(update={"data": data}), headers, None, 0)

    async def _generation(self, plan: GenerationPlan, model: ModelConfig, request_id: str) -> AsyncIterator[StreamItem]:
        """The model's stream for the plan, every final image checked against the plan's seeds."""
        seen: set[int] = set()
        jobs = plan.jobs(request_id, model.batching.max_batch_images)
        # aclosing: leaving early (a failure, the client gone) cancels the replicas' work now,
        # not when the generator is collected.
        async with contextlib.aclosing(self._router.stream(model.id, jobs)) as generation:
            async for item in generation:
                if isinstance(item, StreamedImage):
                    index = item.image_index
                    if not 0 <= index < len(plan.seeds) or item.image.seed != plan.seeds[index] or index in seen:
                        raise UpstreamError(f"The model '{model.id}' returned an inconsistent result.")
                    seen.add(index)
                yield item
        if len(seen) != len(plan.seeds):
            raise UpstreamError(f"The model '{model.id}' returned an incomplete result.")

    async def _images(self, plan: GenerationPlan, model: ModelConfig, request_id: str) -> AsyncIterator[GeneratedImage]:
        """The final images of the generation, in the request's order (a JSON answer has no previews)."""
        images: dict[int, GeneratedImage] = {}
        async with contextlib.aclosing(self._generation(plan, model, request_id)) as generation:
            async for item in generation:
                if isinstance(item, StreamedImage):
                    images[item.image_index] = item.image
        for index in sorted(images):
            yield images[index]

    async def _events(
        self, charge: Charge, plan: GenerationPlan, model: ModelConfig, request_id: str, prefix: EventPrefix
    ) -> AsyncIterator[Chunk]:
        """Previews and images as the model yields them, each ``completed`` event a chunk
        that hands over one image (``hand_over`` counts it once sent; a client that goes
        away pays for the ones it got). A failure after the first byte is an ``error`` event."""
        flagged = delivered = 0
        common = {
            "background": "opaque",
            "output_format": plan.output_format,
            "quality": plan.quality_label or "auto",
            "size": plan.size,
        }
        try:
            async with contextlib.aclosing(self._generation(plan, model, request_id)) as generation:
                async for item in generation:
                    if isinstance(item, PreviewImage):
                        event: PartialImageEvent | CompletedEvent = PartialImageEvent(
                            type=f"{prefix}.partial_image",
                            b64_json=base64.b64encode(item.data).decode("ascii"),
                            created_at=int(self._clock()),
                            image_index=item.image_index,
                            partial_image_index=item.partial_image_index,
                            step=item.step,
                            total_steps=item.total_steps,
                            **common,
                        )
                        yield Chunk(sse(event))
                        continue
                    if item.image.flagged:  # withheld by the safety checker: no event, no charge
                        flagged += 1
                        continue
                    delivered += 1
                    settlement = charge.settlement_if(delivered)
                    event = CompletedEvent(
                        type=f"{prefix}.completed",
                        b64_json=base64.b64encode(item.image.data).decode("ascii"),
                        created_at=int(self._clock()),
                        image_index=item.image_index,
                        seed=item.image.seed,
                        revised_prompt=plan.prompt,
                        usage=_usage(plan, [item.image], [item.image]),
                        credits_charged=format_credits(settlement.charged_units),
                        credits_remaining=format_credits(settlement.balance_units),
                        **common,
                    )
                    yield Chunk(sse(event), images=1)
            if flagged and not delivered:
                raise ContentFlagged(ALL_FLAGGED)
        except Exception as exc:  # noqa: BLE001 - the stream's last event, in the documented shape
            yield Chunk(error_event(exc, request_id))
