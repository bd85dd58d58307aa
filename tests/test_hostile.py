"""What a hostile client found (issue "Hardening"), each driven as that client drove it."""

from __future__ import annotations

import socket

import httpx
import pytest

pytestmark = pytest.mark.serve


def post(served, key, body=None, *, headers=None, content=None):
    return httpx.post(
        f"{served.base_url}/v1/images/generations",
        json=body,
        content=content,
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=60,
    )


def balance(served, key) -> float:
    response = httpx.get(f"{served.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"})
    return float(response.json()["balance"])


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["request_id"] and error["request_id"] == response.headers["x-request-id"].split(",")[-1].strip()
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def key(served):
    return served.create_key("100")


def test_a_huge_negative_prompt_is_a_400_not_38_seconds_of_replica(served, key):
    assert_error(post(served, key, {"model": "tiny-sdxl", "prompt": "x", "negative_prompt": "n" * 5000}), 400,
                 "negative_prompt")
    huge = post(served, key, {"model": "tiny-sdxl", "prompt": "x", "negative_prompt": "n" * 7_000_000})
    assert_error(huge, 400, "negative_prompt")
    assert huge.elapsed.total_seconds() < 5


def test_deeply_nested_json_is_a_400(served, key):
    body = '{"model": "tiny-sdxl", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = post(served, key, content=body, headers={"content-type": "application/json"})
    assert_error(response, 400)


@pytest.mark.parametrize(
    "field, value",
    [
        ("size", "64x64\n"),
        ("size", "６４x６４"),  # full-width digits
        ("aspect_ratio", "1:1\n"),
        ("prompt", 7),  # an empty or blank prompt is a prompt, as OpenAI takes it; a number is not
        ("extra_lora_scale", [1.0] * 200_000),
    ],
)
def test_sloppy_values_are_400s_and_charge_nothing(served, field, value):
    key = served.create_key("5")
    body = {"model": "tiny-sdxl", "prompt": "x", field: value}
    error = assert_error(post(served, key, body), 400)
    assert error["param"].split(".")[0] == field
    assert balance(served, key) == 5


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400s(served, key, literal):
    for field in ("lora_scale", "guidance", "strength"):
        content = f'{{"model": "tiny-sdxl", "prompt": "x", "{field}": {literal}}}'
        assert_error(post(served, key, content=content, headers={"content-type": "application/json"}), 400, field)
    content = f'{{"model": "tiny-sdxl", "prompt": "x", "extra_lora_scale": [1, {literal}]}}'
    response = post(served, key, content=content, headers={"content-type": "application/json"})
    assert assert_error(response, 400)["param"].startswith("extra_lora_scale")


def test_a_body_that_is_not_json_or_no_body_is_the_documented_400(served, key):
    # The qubrid document's table: a body that fails validation is a 400 invalid_request
    # (it lists no 415); the message says what is expected.
    content = '{"model": "tiny-sdxl", "prompt": "x"}'
    for content_type, body in [("text/plain", content), ("application/x-www-form-urlencoded", content),
                               (None, content), (None, None), ("application/json", None)]:
        headers = {"content-type": content_type} if content_type else {}
        client = httpx.Client()
        request = client.build_request(
            "POST", f"{served.base_url}/v1/images/generations", content=body,
            headers={"authorization": f"Bearer {key}", **headers},
        )
        if content_type is None:
            request.headers.pop("content-type", None)
        error = assert_error(client.send(request), 400)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request"), error
        assert "application/json" in error["message"], error
        if body is None:
            assert "no body" in error["message"], error


def _raw_request(served, request_id: bytes, path: bytes = b"/health") -> bytes:
    host, port = served.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nx-request-id: " + request_id
                     + b"\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_undecodable_request_ids_do_not_break_any_route(served):
    for path in (b"/health", b"/v1/models"):
        raw = _raw_request(served, b"\xff\xfe\xc3(bad", path)
        status = raw.split(b"\r\n", 1)[0]
        assert b" 500 " not in status, raw[:300]
        assert b"text/plain" not in raw.split(b"\r\n\r\n", 1)[0].lower(), raw[:300]


def test_an_oversized_request_id_is_replaced_in_the_body_ledger_and_storage(served, key):
    long_id = "a" * 8192
    response = post(served, key, {"model": "tiny-sdxl", "prompt": "x", "response_format": "url"},
                    headers={"x-request-id": long_id})
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert long_id not in url and len(url) < 400
    bad = post(served, key, {"model": "nope", "prompt": "x"}, headers={"x-request-id": long_id})
    assert bad.json()["error"]["request_id"].startswith("req_")
    # A short plain id is the client's to choose, and is used as is.
    mine = post(served, key, {"model": "nope", "prompt": "x"}, headers={"x-request-id": "my-trace-1"})
    assert mine.json()["error"]["request_id"] == "my-trace-1" == mine.headers["x-request-id"]


def test_the_host_header_does_not_flow_into_image_urls(served, key):
    body = {"model": "tiny-sdxl", "prompt": "x", "response_format": "url"}
    evil = post(served, key, body, headers={"host": "evil.example"})
    error = assert_error(evil, 400, "response_format")
    assert "public_base_url" in error["message"]
    local = post(served, key, body)
    assert local.json()["data"][0]["url"].startswith(served.base_url)


def test_method_not_allowed_says_what_is_allowed_and_head_works_on_image_urls(served, key):
    response = httpx.delete(f"{served.base_url}/v1/images/generations")
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"
    url = post(served, key, {"model": "tiny-sdxl", "prompt": "x", "response_format": "url"}).json()["data"][0]["url"]
    head = httpx.head(url)
    assert head.status_code == 200 and head.headers["content-type"] == "image/png"
    assert int(head.headers["content-length"]) == len(httpx.get(url).content) and head.content == b""
