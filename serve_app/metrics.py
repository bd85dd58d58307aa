"""The service's own metrics, exported through ``ray.serve.metrics`` to Ray's Prometheus
endpoint (and so the Ray dashboard's Grafana), beside Serve's own.

Names and tags (README, "Watching it run"):

- ``imagegen_requests_total{endpoint, model, status}``: every answer of the POST routes
  (``model`` is a configured id or "unknown": a client's text never becomes a tag value);
- ``imagegen_images_total{model}``: images delivered;
- ``imagegen_credits_charged_total{model}`` / ``imagegen_credits_refunded_total{model}``;
- from the model replicas: ``imagegen_queue_wait_seconds{model}``,
  ``imagegen_generation_seconds{model}`` and ``imagegen_pipeline_batch_images{model}``.
"""

from __future__ import annotations

from typing import Any, Protocol

from serve_app.config import CREDIT_UNITS

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class ServiceMetrics(Protocol):
    def answered(self, endpoint: str, model: str, status: int) -> None: ...

    def settled(self, model: str, images: int, charged_units: int, refunded_units: int) -> None: ...


class NoMetrics:
    """For the service outside Serve (tests, tools)."""

    def answered(self, endpoint: str, model: str, status: int) -> None:
        pass

    def settled(self, model: str, images: int, charged_units: int, refunded_units: int) -> None:
        pass


class ServeMetrics:
    """The ingress's counters; created in a Serve replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter

        self._requests = Counter(
            "imagegen_requests_total", "Answers of the image endpoints.", tag_keys=("endpoint", "model", "status")
        )
        self._images = Counter("imagegen_images_total", "Images delivered.", tag_keys=("model",))
        self._charged = Counter("imagegen_credits_charged_total", "Credits charged.", tag_keys=("model",))
        self._refunded = Counter("imagegen_credits_refunded_total", "Credits refunded.", tag_keys=("model",))

    def answered(self, endpoint: str, model: str, status: int) -> None:
        self._requests.inc(tags={"endpoint": endpoint, "model": model, "status": str(status)})

    def settled(self, model: str, images: int, charged_units: int, refunded_units: int) -> None:
        tags = {"model": model}
        if images:
            self._images.inc(images, tags=tags)
        if charged_units:
            self._charged.inc(charged_units / CREDIT_UNITS, tags=tags)
        if refunded_units:
            self._refunded.inc(refunded_units / CREDIT_UNITS, tags=tags)


def model_histogram(name: str, description: str, model_id: str, boundaries: list[float]) -> Any:
    """A per-model histogram for a model replica, tagged with its model id."""
    from ray.serve.metrics import Histogram

    histogram = Histogram(name, description=description, boundaries=boundaries, tag_keys=("model",))
    histogram.set_default_tags({"model": model_id})
    return histogram
