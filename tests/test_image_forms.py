"""The multipart image forms (edits, variations) as the ingress reads them: image parts are
files by their name, with or without a filename; the rest are text fields."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve_app.errors import InvalidRequest
from serve_app.multipart import parse_form
from tests.test_edge import bare_ingress, body_of, make_request

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # not valid UTF-8, as an image file never is


def encoded(files=(), data=None) -> tuple[bytes, str]:
    """A form as httpx (the OpenAI SDK's transport) encodes it: body and Content-Type."""
    request = httpx.Request("POST", "http://h/", files=list(files), data=data)
    return request.read(), request.headers["content-type"]


def raw_form(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A form as curl sends it, each part ``(name, filename or None, bytes)``."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def read(endpoint: str, body: bytes, content_type: str):
    from serve_app.ingress import ImageGenerationIngress

    ingress = bare_ingress(ImageGenerationIngress)
    request = make_request({"content-type": content_type, "content-length": str(len(body))}, body_of(body))
    reader = ingress._read_edit_form if endpoint == "edits" else ingress._read_variation_form
    return asyncio.run(reader(request))


def test_parts_in_order_with_their_filenames():
    body, content_type = encoded(files=[("image", ("a.png", PNG, "image/png"))], data={"prompt": "é", "n": "2"})
    parts = parse_form(body, content_type, file_names=("image",), max_files=2, max_fields=4)
    assert {(p.name, p.filename, p.data) for p in parts} == {
        ("prompt", None, "é".encode()),
        ("n", None, b"2"),
        ("image", "a.png", PNG),
    }


@pytest.mark.parametrize(
    "body, content_type, why",
    [
        (b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n", "multipart/form-data; boundary=x", "name"),
        (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nv", "multipart/form-data; boundary=x", "closing"),
        (b"", "multipart/form-data; boundary=x", "closing"),
        (b"--x--\r\n", "multipart/form-data", "boundary"),
        (b"garbage", "multipart/form-data; boundary=x", "multipart"),
    ],
)
def test_malformed_forms_are_a_400(body, content_type, why):
    with pytest.raises(InvalidRequest) as caught:
        parse_form(body, content_type, file_names=("image",), max_files=2, max_fields=4)
    assert caught.value.status_code == 400 and "multipart form could not be read" in caught.value.message
    assert why in caught.value.message


def test_part_counts_are_bounded_while_parsing():
    body, content_type = raw_form(*[("image[]", "x.png", PNG)] * 3)
    with pytest.raises(InvalidRequest, match="too many file parts"):
        parse_form(body, content_type, file_names=("image[]",), max_files=2, max_fields=4)
    body, content_type = raw_form(*[(f"f{i}", None, b"v") for i in range(5)])
    with pytest.raises(InvalidRequest, match="too many fields"):
        parse_form(body, content_type, file_names=("image",), max_files=2, max_fields=4)


def test_image_and_mask_parts_without_a_filename_are_files():
    """curl -F image=<in.png -F mask=<mask.png sends the files' bytes without filenames."""
    body, content_type = raw_form(("image", None, PNG), ("mask", None, PNG[::-1]), ("prompt", None, b"a cat"))
    upload = read("edits", body, content_type)
    assert upload.images == [PNG] and upload.mask == PNG[::-1] and upload.fields == {"prompt": "a cat"}
    body, content_type = raw_form(("image[]", None, PNG), ("image[]", "b.png", PNG), ("model", None, b"m"))
    upload = read("edits", body, content_type)
    assert upload.images == [PNG, PNG] and upload.fields == {"model": "m"}


def test_the_sdks_form_reads_the_same():
    body, content_type = encoded(
        files=[("image", ("in.png", PNG, "image/png")), ("mask", ("m.png", PNG, "image/png"))],
        data={"prompt": "a cat", "extra_lora_weights[]": ["a", "b"]},
    )
    upload = read("edits", body, content_type)
    assert upload.images == [PNG] and upload.mask == PNG
    assert upload.fields == {"prompt": "a cat", "extra_lora_weights": ["a", "b"]}


@pytest.mark.parametrize(
    "parts, param, words",
    [
        ([("image", None, b"iVBORw0KGgoAAAANSUhEUg=="), ("prompt", None, b"x")], "image", "not base64"),
        ([("image", None, b"data:image/png;base64,iVBORw0K"), ("prompt", None, b"x")], "image", "not base64"),
        ([("image", "a.png", PNG), ("mask", None, PNG), ("mask", "m.png", PNG)], "mask", "send it once"),
        ([("image", "a.png", PNG), ("prompt", None, b"x"), ("prompt", None, b"y")], "prompt", "send it once"),
        ([("image", "a.png", PNG), ("prompt", "p.txt", b"x")], "prompt", "unexpected file part"),
        ([("image", "a.png", PNG), ("prompt", None, b"\xff\xfe")], "prompt", "UTF-8"),
    ],
)
def test_edit_form_refusals_name_their_part(parts, param, words):
    with pytest.raises(InvalidRequest) as caught:
        read("edits", *raw_form(*parts))
    assert caught.value.param == param and words in caught.value.message


def test_the_variations_form_takes_image_files_only():
    upload = read("variations", *raw_form(("image", None, PNG), ("n", None, b"2")))
    assert upload.images == [PNG] and upload.mask is None and upload.fields == {"n": "2"}
    with pytest.raises(InvalidRequest) as caught:
        read("variations", *raw_form(("image", "a.png", PNG), ("mask", "m.png", PNG)))
    assert caught.value.param == "mask" and "unexpected file part" in caught.value.message
