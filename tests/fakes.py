"""Fakes of the model side for serving tests, and the ingress's way of answering."""

from __future__ import annotations

import asyncio

from serve_app.charge import ServedResponse, hand_over
from serve_app.errors import UpstreamError
from serve_app.storage import StorageError
from serve_app.work import GeneratedImage, PreviewImage, StreamedImage


class FakeRouter:
    """The router's one generation API (``stream``): per image, ``job.partial_images``
    previews, then the image. Can fail at a job (``fail_job``) or after ``fail_after``
    items, hang, wait ``delay_s`` first, or flag seeds as the safety checker would."""

    def __init__(self, fail_job=None, failure=None, hang=False, delay_s=0.0, fail_after=None, flag_seeds=()):
        self.fail_job = fail_job
        self.failure = failure or UpstreamError("The model 'm' failed to generate the image.")
        self.hang = hang
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.flag_seeds = set(flag_seeds)
        self.calls = []
        self.closed = 0  # generations whose consumer went away before the end

    @property
    def jobs(self):
        return [job for call in self.calls for job in call]

    async def ensure_available(self, model_id):
        return None

    async def stream(self, model_id, jobs):
        self.calls.append(jobs)
        finished = False
        try:
            if self.hang:
                await asyncio.sleep(3600)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            sent = offset = 0
            for number, job in enumerate(jobs):
                if number == self.fail_job:
                    raise self.failure
                for index, seed in enumerate(job.seeds):
                    for partial in range(job.partial_images):
                        if sent == self.fail_after:
                            raise self.failure
                        yield PreviewImage(offset + index, partial, b"preview", partial + 1, job.shape.steps)
                        sent += 1
                    if sent == self.fail_after:
                        raise self.failure
                    flagged = seed in self.flag_seeds
                    data = b"" if flagged else b"img%d" % seed
                    # Text tokens as a replica counts them for usage; here one per word.
                    tokens = len(job.prompt.split()) + len((job.negative_prompt or "").split())
                    image = GeneratedImage(data, seed, job.output_format, 64, 64, flagged, text_tokens=tokens)
                    yield StreamedImage(offset + index, image)
                    sent += 1
                offset += job.num_images
            finished = True
        finally:
            if not finished:
                self.closed += 1


class FakeStore:
    """Storage in a dict; saving the images of ``fail_seeds`` fails (fake images are b"img<seed>")."""

    needs_request_base_url = False
    url_ttl_s = 3600

    def __init__(self, fail_seeds=()):
        self.fail_seeds = set(fail_seeds)
        self.stored = {}

    async def save(self, name, data, content_type):
        if data.startswith(b"img") and int(data[3:]) in self.fail_seeds:
            raise StorageError("disk full")
        self.stored[name] = (data, content_type)
        return name

    async def url(self, stored, base_url, expires_at):
        return f"{base_url}/files/{stored}?expires={expires_at}"

    async def load(self, stored):
        if stored not in self.stored:
            raise StorageError("gone")
        return self.stored[stored][0]


async def answer(served: ServedResponse) -> list[bytes]:
    """As the ingress answers: every chunk handed over, then the charge settled."""
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    await hand_over(served, send)
    return sent


async def serve(svc, secret, fields, *, endpoint="generate", request_id="req_test_1", base_url="http://h", **options):
    """Authenticate as the ingress does, then serve ``fields`` (a JSON body, or an EditUpload)
    at ``endpoint``: ``generate``, ``edit`` or ``variation``."""
    key = await svc.authenticate(f"Bearer {secret}")
    method = getattr(svc, endpoint)
    return await method(key, fields, request_id=request_id, base_url=base_url, **options)
