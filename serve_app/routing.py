"""Send jobs to model deployments and turn every way that can fail into an APIError.

A deployment with no running replica (still loading, or asking for a GPU the cluster does
not have) would make a handle call wait forever, so the router consults the Serve
controller's replica states first and answers 503 at once instead, and keeps consulting
them while a request waits: if the last replica goes away under it (a node lost), the
request ends in a 503 too. The states are cached and refreshed in the background while
replicas are known to be up, so the hot path does not pay for them.

``ModelRouter.stream`` is the one way to generate: a streamed response forwards its items, a
JSON response drains it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from serve_app.errors import APIError, GenerationTimeout, ModelUnavailable, UpstreamError
from serve_app.work import GenerationJob, PreviewImage, StreamedImage, StreamItem

logger = logging.getLogger("ray.serve")

STATUS_MAX_AGE_S = 1.0
UNAVAILABLE_RETRY_AFTER_S = 10.0


class ReplicaCounter(Protocol):
    async def running_replicas(self) -> dict[str, int]:
        """Running replicas per deployment name of this application."""


@dataclass(frozen=True)
class ModelRoute:
    model_id: str
    deployment_name: str
    handle: Any  # a DeploymentHandle; Any so that tests can pass a fake
    timeout_s: float
    scales_from_zero: bool


class ServeReplicaCounter:
    """Running replica counts from the Serve controller, cached for ``max_age_s``."""

    def __init__(self, app_name: Callable[[], str], max_age_s: float = STATUS_MAX_AGE_S) -> None:
        self._app_name = app_name
        self._max_age_s = max_age_s
        self._counts: dict[str, int] | None = None
        self._fetched_at = 0.0
        self._refreshing: asyncio.Task[dict[str, int]] | None = None

    async def running_replicas(self) -> dict[str, int]:
        fresh = time.monotonic() - self._fetched_at < self._max_age_s
        if self._counts is not None and (fresh or all(self._counts.values())):
            if not fresh:
                self._refresh()  # stale but all up: answer now, refresh behind
            return self._counts
        # Shielded: the refresh is shared by every request waiting on it, and one of them
        # being cancelled (its client left, or its watch ended) must not cancel it for the
        # others. Unshielded, it did: they failed with a CancelledError nobody sent, which
        # Serve's proxy logs as a client disconnect (issue 20, finding 9).
        return await asyncio.shield(self._refresh())

    def _refresh(self) -> asyncio.Task[dict[str, int]]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._fetch())
        return self._refreshing

    async def _fetch(self) -> dict[str, int]:
        counts = await asyncio.to_thread(_running_replicas_of, self._app_name())
        self._counts, self._fetched_at = counts, time.monotonic()
        return counts


def _running_replicas_of(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of ``app_name``, from the controller's instance
    details: the dict that ``serve.status()`` and the dashboard's REST API are built from.

    Not ``serve.status()`` itself: it rebuilds every deployment's full config as pydantic
    models, cloudpickling each request router class on the way, which took 25-55 ms of CPU
    per call with the GIL held (py-spy, 2026-11-22): once a second under load, a stall of
    the ingress's event loop. Reading the dict costs under 1 ms.
    """
    application = _application_details(app_name)
    return {
        name: sum(1 for replica in deployment.get("replicas") or () if _state_name(replica.get("state")) == "RUNNING")
        for name, deployment in (application.get("deployments") or {}).items()
    }


def replica_owner(app_name: str, deployment_name: str, replica_id: str) -> str:
    """How a reservation names the ingress replica that holds it."""
    return f"{app_name}:{deployment_name}:{replica_id}"


def live_replica_owners(app_name: str, deployment_name: str) -> set[str]:
    """``replica_owner`` of every replica of a deployment that Serve still lists, in any
    state: one that is stopping may still be finishing requests. One that died is gone."""
    deployment = (_application_details(app_name).get("deployments") or {}).get(deployment_name) or {}
    return {
        replica_owner(app_name, deployment_name, str(replica.get("replica_id")))
        for replica in deployment.get("replicas") or ()
    }


def _application_details(app_name: str) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return (details.get("applications") or {}).get(app_name) or {}


def _state_name(state: Any) -> str:
    return str(getattr(state, "value", state))  # a ReplicaState enum, or its name once serialized


class ModelRouter:
    def __init__(
        self, routes: Mapping[str, ModelRoute], replicas: ReplicaCounter, watch_every_s: float = STATUS_MAX_AGE_S
    ) -> None:
        self._routes = dict(routes)
        self._replicas = replicas
        self._watch_every_s = watch_every_s

    async def _until_unavailable(self, route: ModelRoute) -> None:
        """Raise ModelUnavailable once the deployment has no running replica left.

        A job sent to a deployment whose last replica died (its node went away) waits in the
        handle for a replica that may never come, until the request's deadline: better a
        503 with Retry-After within a couple of seconds, which the SDKs retry.
        """
        while True:
            await asyncio.sleep(self._watch_every_s)
            await self._ensure_available(route)

    async def ensure_available(self, model_id: str) -> None:
        """503 now if the model has no running replica (checked before reserving credits;
        ``stream`` checks again before it sends anything)."""
        await self._ensure_available(self._routes[model_id])

    async def stream(self, model_id: str, jobs: list[GenerationJob]) -> AsyncIterator[StreamItem]:
        """Run every job of one request: the one generation API, for JSON and streamed
        responses alike (a JSON response drains it; its jobs ask for no previews, so it gets
        only ``StreamedImage`` items, one per image).

        Yields previews and final images as the replicas produce them, image indexes counted
        across the request. Each job is one call of the deployment's ``generate_stream``
        through a streaming handle (which yields chunks of items: they are flattened here).
        An async generator: nothing is sent before the first ``__anext__``, which first
        checks that the model has a running replica (``ModelUnavailable``, 503).

        Fails with ``GenerationTimeout`` past the model's deadline, ``ModelUnavailable`` if
        the last replica goes away meanwhile, the replica's own ``APIError`` as it is, and
        ``UpstreamError`` (502) for any other failure. However it ends before the last item
        (a failure, the deadline, or the consumer closing or cancelling it: close it, e.g.
        with ``contextlib.aclosing``, rather than dropping it), every replica call is
        cancelled, and the replicas abandon the work: queued parts never run and running
        pipeline calls stop at their next denoising step."""
        route = self._routes[model_id]
        await self._ensure_available(route)
        handle = route.handle.options(stream=True)
        generators = [handle.generate_stream.remote(job) for job in jobs]
        offsets = [sum(job.num_images for job in jobs[:i]) for i in range(len(jobs))]
        merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(generator: Any, offset: int) -> None:
            try:
                async for chunk in generator:
                    merged.put_nowait((offset, chunk))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                merged.put_nowait((offset, exc))
                return
            merged.put_nowait((offset, None))

        pumps = [asyncio.ensure_future(pump(g, offset)) for g, offset in zip(generators, offsets)]
        watch = asyncio.create_task(self._until_unavailable(route))
        deadline = asyncio.get_running_loop().time() + route.timeout_s
        open_streams = len(pumps)
        finished = False
        getter: asyncio.Future[tuple[int, Any]] | None = None
        try:
            while open_streams:
                remaining = deadline - asyncio.get_running_loop().time()
                getter = asyncio.ensure_future(merged.get())
                done, _ = await asyncio.wait(
                    {getter, watch}, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    if watch in done:
                        watch.result()  # raises ModelUnavailable: the last replica went away
                    raise GenerationTimeout(
                        f"Generation with model '{model_id}' did not finish within {route.timeout_s:g} s."
                    )
                offset, chunk = getter.result()
                if chunk is None:
                    open_streams -= 1
                elif isinstance(chunk, APIError):
                    raise chunk
                elif isinstance(chunk, BaseException):
                    logger.warning("model %s failed a request: %s", model_id, _short(chunk))
                    raise UpstreamError(f"The model '{model_id}' failed to generate the image.") from chunk
                else:
                    for item in _items_of(chunk, model_id):
                        yield replace(item, image_index=item.image_index + offset)
            finished = True
        finally:
            # Failure, deadline or a consumer that went away: stop the replicas' work too.
            # Not after success: every stream has ended, and each cancel is a wasted Ray call.
            watch.cancel()
            if getter is not None:
                getter.cancel()
            for task in pumps:
                task.cancel()
            if not finished:
                for generator in generators:
                    generator.cancel()

    async def _ensure_available(self, route: ModelRoute) -> None:
        if route.scales_from_zero:
            return  # the queued request is what makes Serve scale up from zero
        try:
            running = (await self._replicas.running_replicas()).get(route.deployment_name, 0)
        except Exception as exc:  # noqa: BLE001 - if Serve can't say, try the handle anyway
            logger.warning("could not read Serve status: %s", _short(exc))
            return
        if running == 0:
            raise ModelUnavailable(
                f"The model '{route.model_id}' has no ready replica right now; retry shortly.",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            )


def _items_of(chunk: Any, model_id: str) -> tuple[StreamItem, ...]:
    """The items of one chunk a replica yielded (a single item is accepted as well)."""
    items = chunk if isinstance(chunk, (tuple, list)) else (chunk,)
    if not all(isinstance(item, (PreviewImage, StreamedImage)) for item in items):
        raise UpstreamError(f"The model '{model_id}' returned an inconsistent result.")
    return tuple(items)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]
