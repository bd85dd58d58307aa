"""response_format=url on the embedded default (local backend), end to end."""

from __future__ import annotations

import io
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from PIL import Image

from serve_app.storage import LocalImageStore

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def url_result(served):
    client = served.client()
    return client.images.generate(
        model="tiny-sdxl", prompt="a red kite", n=2, size="96x64", response_format="url", output_format="jpeg"
    )


def test_urls_serve_the_images(url_result):
    assert len(url_result.data) == 2
    for item in url_result.data:
        assert item.b64_json is None
        response = httpx.get(item.url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and image.size == (96, 64)
    assert url_result.data[0].url != url_result.data[1].url


def test_urls_expire_after_the_configured_ttl(served, url_result):
    query = parse_qs(urlsplit(url_result.data[0].url).query)
    expires = int(query["expires"][0])
    assert abs(expires - (time.time() + served.config.storage.url_ttl_s)) < 60


def with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


def test_tampered_urls_are_403(url_result):
    url = url_result.data[0].url
    signature = parse_qs(urlsplit(url).query)["signature"][0]
    forged = "0" * len(signature) if signature[0] != "0" else "1" * len(signature)
    for bad in (
        with_query(url, signature=forged),
        with_query(url, expires=str(int(time.time()) + 10 * 3600)),
        url.split("?")[0],
    ):
        response = httpx.get(bad)
        assert response.status_code == 403, bad
        assert response.json()["error"]["type"] == "permission_error"


def test_expired_url_is_403(served, url_result):
    """A correctly signed URL whose time is up, signed as the ingress would have signed it."""
    path = urlsplit(url_result.data[0].url).path
    name = path.split("/v1/files/images/", 1)[1]
    store = LocalImageStore(served.config.storage.local, served.config.storage.url_ttl_s)
    expired = store.url_for(name, int(time.time()) - 5, served.base_url)
    assert httpx.get(expired).status_code == 403
    fresh = store.url_for(name, int(time.time()) + 60, served.base_url)
    assert httpx.get(fresh).status_code == 200


def test_url_delivery_charges_per_delivered_image(served):
    client = served.client(served.create_key("10"))
    raw = client.images.with_raw_response.generate(model="tiny-sdxl", prompt="x", n=3, response_format="url")
    assert len(raw.parse().data) == 3
    assert raw.headers["x-credits-charged"] == "3"
