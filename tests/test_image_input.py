"""Input images: decoding, the JSON ``image`` field (base64, data URI, URL) and edit masks.

No Ray and no network beyond loopback servers started here.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.server
import io
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app import image_input
from serve_app.errors import InvalidRequest
from serve_app.config import ImageInputConfig
from serve_app.image_input import (
    MAX_EXIF_BYTES,
    Decoder,
    ImageInputPolicy,
    decode_image,
    image_from_field,
    is_public_address,
    mask_from_png,
)

POLICY = ImageInputPolicy(max_bytes=2_000_000, max_pixels=4_000_000)


# --- helpers --------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def two_colour(size=(16, 12), mode="RGB") -> Image.Image:
    """Left half red, right half blue: shows orientation and exact pixels."""
    image = Image.new(mode, size, "blue")
    image.paste("red", (0, 0, size[0] // 2, size[1]))
    return image


def refused(call, *, param: str, says: tuple[str, ...] = (), not_echoing: tuple[str, ...] = ()) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        call()
    exc = caught.value
    assert exc.param == param
    assert exc.status_code == 400
    assert exc.message.startswith(f"Invalid '{param}': ")
    for phrase in says:
        assert phrase in exc.message, exc.message
    for raw in not_echoing:
        assert raw not in exc.message, exc.message
    assert "Traceback" not in exc.message and "<" not in exc.message  # no reprs
    return exc


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, idat: bytes = zlib.compress(b"\0" * 16)) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with whatever IDAT we give it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def all_zero_png(width: int, height: int) -> bytes:
    """A complete, valid greyscale PNG of zeros, compressed row by row (small memory)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --- decode_image ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, options, exact",
    [("PNG", {}, True), ("WEBP", {"lossless": True}, True), ("JPEG", {"quality": 95}, False)],
)
def test_png_jpeg_and_webp_base64_decode_to_rgb(fmt, options, exact):
    original = two_colour()
    image = image_from_field(b64(encode(original, fmt, **options)), param="image", policy=POLICY)
    assert image.mode == "RGB"
    assert image.size == (16, 12)
    left, right = image.getpixel((2, 6)), image.getpixel((13, 6))
    if exact:
        assert (left, right) == ((255, 0, 0), (0, 0, 255))
    else:
        assert left[0] > 200 and left[2] < 60 and right[2] > 200 and right[0] < 60


@pytest.mark.parametrize(
    "media_type, fmt", [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("IMAGE/JPG", "JPEG"), ("image/webp", "WEBP")]
)
def test_data_uri(media_type, fmt):
    data = encode(two_colour(), fmt)
    image = image_from_field(f"data:{media_type};base64,{b64(data)}", param="image", policy=POLICY)
    assert image.size == (16, 12) and image.mode == "RGB"


def test_data_uri_with_parameters_and_wrapped_base64():
    text = b64(encode(two_colour(), "PNG"))
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    image = image_from_field(f"data:image/png;name=x.png;base64,{wrapped}\n", param="image", policy=POLICY)
    assert image.getpixel((2, 2)) == (255, 0, 0)


def test_urlsafe_base64_without_padding():
    data = encode(Image.effect_noise((24, 24), 80).convert("RGB"), "PNG")
    standard = b64(data)
    assert "+" in standard or "/" in standard  # otherwise the test proves nothing
    urlsafe = base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    image = image_from_field(urlsafe, param="image", policy=POLICY)
    assert image.size == (24, 24)
    assert image.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_alpha_is_kept_as_rgba():
    original = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    original.putpixel((1, 1), (1, 2, 3, 0))
    original.putpixel((2, 2), (4, 5, 6, 128))
    image = decode_image(encode(original, "PNG"), param="image", policy=POLICY)
    assert image.mode == "RGBA"
    assert image.getpixel((1, 1))[3] == 0 and image.getpixel((2, 2)) == (4, 5, 6, 128)


def test_palette_transparency_becomes_rgba_and_opaque_palette_rgb():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    with_transparency = decode_image(encode(palette, "PNG", transparency=0), param="image", policy=POLICY)
    assert with_transparency.mode == "RGBA"
    assert with_transparency.getpixel((0, 0))[3] == 0 and with_transparency.getpixel((3, 3)) == (255, 0, 0, 255)
    assert decode_image(encode(palette, "PNG"), param="image", policy=POLICY).mode == "RGB"


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    data = encode(two_colour((40, 20)), "JPEG", exif=exif, quality=95)
    image = decode_image(data, param="image", policy=POLICY)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 3)), image.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_mpo_from_a_phone_camera_is_its_first_picture():
    data = encode(two_colour(), "MPO", save_all=True, append_images=[Image.new("RGB", (16, 12), "green")])
    image = decode_image(data, param="image", policy=POLICY)
    assert image.size == (16, 12) and image.getpixel((2, 6))[0] > 200


def _other_formats():
    gif = encode(two_colour(), "GIF")
    bmp = encode(two_colour(), "BMP")
    tiff = encode(two_colour(), "TIFF")
    pdf = encode(two_colour(), "PDF")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    return [
        pytest.param(b"hello there, not an image", "hello", id="text"),
        pytest.param(svg, "svg", id="svg"),
        pytest.param(eps, "PS-Adobe", id="eps"),
        pytest.param(pdf, "PDF", id="pdf"),
        pytest.param(gif, "GIF8", id="gif"),
        pytest.param(bmp, "BM", id="bmp"),
        pytest.param(tiff, "II*", id="tiff"),
    ]


@pytest.mark.parametrize("data, marker", _other_formats())
def test_other_formats_are_not_parsed(data, marker):
    assert marker.encode() in data[:200]
    refused(
        lambda: decode_image(data, param="image", policy=POLICY),
        param="image",
        says=("not a PNG, JPEG or WEBP image",),
        not_echoing=(marker,),
    )
    # The same through the JSON field, where the input is base64.
    refused(
        lambda: image_from_field(b64(data), param="image", policy=POLICY),
        param="image",
        says=("not a PNG, JPEG or WEBP image",),
        not_echoing=(b64(data)[:12],),
    )


def test_empty_image_refused():
    refused(lambda: decode_image(b"", param="image[]", policy=POLICY), param="image[]", says=("empty",))


def test_over_max_bytes_refused():
    data = encode(Image.effect_noise((64, 64), 80).convert("RGB"), "PNG")
    small = ImageInputPolicy(max_bytes=len(data) - 1, max_pixels=4_000_000)
    refused(
        lambda: decode_image(data, param="image", policy=small),
        param="image",
        says=(f"larger than {len(data) - 1} bytes",),
    )
    decode_image(data, param="image", policy=ImageInputPolicy(max_bytes=len(data), max_pixels=4_000_000))


def test_base64_length_is_checked_before_decoding():
    small = ImageInputPolicy(max_bytes=1000, max_pixels=4_000_000)
    # Invalid base64 of a length implying > max_bytes: the size is what is reported.
    for value in ("!" * 1400, "A" * 1400, "A" * 10_000_000):
        refused(
            lambda: image_from_field(value, param="image", policy=small),
            param="image",
            says=("larger than 1000 bytes",),
            not_echoing=("!!", "AAAA"),
        )
    # Just under the limit it is decoded (and then found not to be an image).
    refused(lambda: image_from_field("A" * 1332, param="image", policy=small), param="image", says=("not a PNG",))


def test_declared_giant_png_is_refused_from_the_header_quickly():
    bomb = png_declaring(20_000, 20_000)
    assert len(bomb) < 200
    generous = ImageInputPolicy(max_bytes=2_000_000, max_pixels=10**10)  # only PIL's own limit stands
    for policy in (POLICY, generous):
        started = time.perf_counter()
        refused(lambda: decode_image(bomb, param="image", policy=policy), param="image", says=("pixels",))
        assert time.perf_counter() - started < 1.0


def test_valid_zero_filled_png_over_max_pixels_is_refused_before_decoding():
    data = all_zero_png(5000, 5000)  # 25 Mpx in ~25 KB: a real, complete decompression bomb
    assert len(data) < 100_000
    tight = ImageInputPolicy(max_bytes=2_000_000, max_pixels=1_000_000)
    started = time.perf_counter()
    refused(
        lambda: decode_image(data, param="image", policy=tight),
        param="image",
        says=("5000x5000 is more than 1000000 pixels",),
    )
    assert time.perf_counter() - started < 1.0
    # The same file is decoded when the policy allows its size: the refusal above is the check.
    assert decode_image(all_zero_png(100, 100), param="image", policy=tight).size == (100, 100)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_refused(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    refused(lambda: decode_image(data, param="image", policy=POLICY), param="image", says=("animated",))


def test_truncated_png_refused():
    data = encode(Image.effect_noise((64, 64), 80).convert("RGB"), "PNG")
    refused(
        lambda: decode_image(data[: len(data) // 2], param="image", policy=POLICY),
        param="image",
        says=("corrupt or truncated",),
    )


def test_png_with_garbage_pixel_data_refused():
    refused(
        lambda: decode_image(png_declaring(16, 16, idat=os.urandom(64)), param="image", policy=POLICY),
        param="image",
        says=("corrupt or truncated",),
    )


# --- the JSON field: base64 and data URIs ---------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("not base64 at all!!", id="punctuation"),
        pytest.param("abc-def+ghi_", id="mixed-alphabets"),
        pytest.param("QUJDRAEFG", id="impossible-length"),
        pytest.param("QUJD\u00e9RA==", id="non-ascii"),
        pytest.param("data:image/png;base64,@@@@", id="data-uri-payload"),
        pytest.param("data:image/png;base64,", id="empty-data-uri"),
    ],
)
def test_bad_base64_refused(value):
    refused(
        lambda: image_from_field(value, param="image", policy=POLICY),
        param="image",
        says=("not valid base64",),
        not_echoing=(value.split(",")[-1] or "data:",),
    )


@pytest.mark.parametrize(
    "value",
    [
        "data:text/plain;base64,aGVsbG8=",
        "data:image/svg+xml;base64,PHN2Zy8+",
        "data:image/gif;base64,R0lGODlh",
        "data:image/png,rawbytes",  # not base64-encoded
        "data:;base64,aGVsbG8=",
    ],
)
def test_data_uri_with_other_media_types_refused(value):
    refused(
        lambda: image_from_field(value, param="image", policy=POLICY),
        param="image",
        says=("data URI must be base64-encoded image/png, image/jpeg or image/webp",),
        not_echoing=(value.split(",")[-1],),
    )


@pytest.mark.parametrize("value", ["file:///etc/passwd", "ftp://images.example/a.png", "gopher://x/"])
def test_other_url_schemes_refused(value):
    refused(
        lambda: image_from_field(value, param="image", policy=POLICY),
        param="image",
        says=("only http and https URLs",),
        not_echoing=("passwd", "images.example", "gopher"),
    )


@pytest.mark.parametrize("value", ["", "   ", None, 42])
def test_empty_or_non_string_field_refused(value):
    refused(lambda: image_from_field(value, param="image", policy=POLICY), param="image", says=("expected base64",))


# --- the decode budget: work in proportion to bytes and pixels ------------------------------


def progressive_jpeg(size=(64, 48)) -> bytes:
    data = encode(Image.effect_noise(size, 60).convert("RGB"), "JPEG", progressive=True, quality=90)
    assert data.count(b"\xff\xda") == 10  # libjpeg's progression: 10 scans
    return data


def with_empty_scans(data: bytes, count: int) -> bytes:
    """The file with ``count`` more copies of its last scan's header (an AC refinement of one
    component) and no entropy-coded data after them, just before EOI. libjpeg accepts it and
    makes a pass over the component's blocks for each: the 900 KB, 90,000-scan file that cost
    13.6 s of CPU."""
    sos = data.rindex(b"\xff\xda")
    header = data[sos : sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]]
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + header * count + data[eoi:]


def test_a_progressive_jpeg_of_empty_scans_is_refused_before_it_is_decoded(monkeypatch):
    # 1024x1024 and 907 KB: before the scan limit this took 8.9 s of CPU to decode on a
    # 2-core CI machine (13.6 s in the report), linear in the scans.
    flat = encode(Image.new("RGB", (1024, 1024), "gray"), "JPEG", progressive=True)
    hostile = with_empty_scans(flat, 90_000)
    assert 850_000 < len(hostile) < POLICY.max_bytes
    # Pillow must never see it: the refusal comes from counting markers in the bytes.
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("the hostile JPEG reached Pillow"))
    refused(
        lambda: decode_image(hostile, param="image", policy=POLICY),
        param="image",
        says=("the JPEG has more than 100 scans",),
    )
    refused(lambda: image_from_field(b64(hostile), param="image", policy=POLICY), param="image", says=("scans",))


def test_a_normal_progressive_jpeg_still_decodes_and_the_scan_limit_is_the_policys():
    data = progressive_jpeg()
    baseline = decode_image(encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG"), param="image", policy=POLICY)
    image = decode_image(data, param="image", policy=POLICY)
    assert image.size == (64, 48) and image.tobytes() == baseline.tobytes()
    # Up to the limit, scans are decoded (empty refinements are legal JPEG).
    padded = with_empty_scans(data, POLICY.max_jpeg_scans - 10)
    assert decode_image(padded, param="image", policy=POLICY).size == (64, 48)
    refused(
        lambda: decode_image(with_empty_scans(data, POLICY.max_jpeg_scans - 9), param="image", policy=POLICY),
        param="image",
        says=(f"more than {POLICY.max_jpeg_scans} scans",),
    )
    strict = ImageInputPolicy(max_bytes=2_000_000, max_pixels=4_000_000, max_jpeg_scans=9)
    refused(lambda: decode_image(data, param="image[]", policy=strict), param="image[]", says=("more than 9 scans",))
    assert ImageInputConfig().max_jpeg_scans == ImageInputPolicy(max_bytes=1, max_pixels=1).max_jpeg_scans == 100


def test_scans_of_an_mpo_and_an_exif_thumbnail_count_and_fit_the_default():
    picture = encode(two_colour(), "MPO", save_all=True, append_images=[Image.new("RGB", (16, 12), "green")])
    assert decode_image(picture, param="image", policy=POLICY).size == (16, 12)
    exif = Image.Exif()
    exif[0x0112] = 1
    data = encode(Image.effect_noise((640, 480), 60).convert("RGB"), "JPEG", progressive=True, exif=exif)
    assert decode_image(data, param="image", policy=POLICY).size == (640, 480)


def small_jpeg() -> bytes:
    return encode(two_colour(), "JPEG", quality=95)


def png_with_chunks_before_idat(chunks: bytes) -> bytes:
    data = encode(two_colour(), "PNG")
    end_of_ihdr = 8 + 25
    return data[:end_of_ihdr] + chunks + data[end_of_ihdr:]


@pytest.mark.parametrize(
    "hostile",
    [
        # Pillow's JPEG header parser is a Python loop: one step per marker, per fill byte, per junk byte.
        pytest.param(lambda: small_jpeg()[:2] + b"\xff\xfe\x00\x02" * 450_000 + small_jpeg()[2:], id="jpeg-comments"),
        pytest.param(lambda: small_jpeg()[:2] + b"\xff" * 1_900_000 + small_jpeg()[2:], id="jpeg-fill-bytes"),
        pytest.param(
            lambda: small_jpeg()[:2] + b"\xff\xfe\x00\x02" + b"\0" * 1_900_000 + small_jpeg()[2:], id="jpeg-junk"
        ),
        # ... and so is PNG's chunk reader.
        pytest.param(lambda: png_with_chunks_before_idat(png_chunk(b"abCd", b"") * 150_000), id="png-chunks"),
    ],
)
def test_files_of_tiny_markers_or_chunks_are_refused_within_the_parse_budget(hostile, monkeypatch):
    data = hostile()
    assert len(data) < POLICY.max_bytes
    reads = []
    real_read = image_input._BudgetedReader.read

    def counting_read(self, *args):
        reads.append(1)
        return real_read(self, *args)

    monkeypatch.setattr(image_input._BudgetedReader, "read", counting_read)
    refused(
        lambda: decode_image(data, param="image", policy=POLICY),
        param="image",
        says=("too many chunks, markers or padding bytes for its size",),
    )
    # It stopped at the budget: 10,000 reads plus one per KiB, not one per marker or byte.
    assert len(reads) <= 10_002 + len(data) // 1024


def test_a_png_of_many_ordinary_idat_chunks_decodes():
    pixels = Image.effect_noise((512, 512), 60).convert("RGB")
    data = encode(pixels, "PNG", compress_level=0)  # ~786 KB
    # Re-chunk its image data as libpng does (8 KiB IDAT chunks) and more finely (1 KiB).
    signature_ihdr, rest = data[:33], data[33:]
    idat = b""
    while rest:
        length, kind = struct.unpack(">I4s", rest[:8])
        if kind == b"IDAT":
            idat += rest[8 : 8 + length]
        rest = rest[12 + length :]
    for size in (8192, 1024):
        pieces = b"".join(png_chunk(b"IDAT", idat[i : i + size]) for i in range(0, len(idat), size))
        rechunked = signature_ihdr + pieces + png_chunk(b"IEND", b"")
        assert decode_image(rechunked, param="image", policy=POLICY).tobytes() == pixels.tobytes()


def test_an_exif_block_larger_than_a_jpeg_can_carry_is_refused():
    def tiff_with_orientation(padding: int) -> bytes:
        entry = struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)  # orientation 6 (rotate)
        return b"II*\0" + struct.pack("<IH", 8, 1) + entry + b"\0\0\0\0" + b"\0" * padding

    fits = png_with_chunks_before_idat(png_chunk(b"eXIf", tiff_with_orientation(1000)))
    assert decode_image(fits, param="image", policy=POLICY).size == (12, 16)  # orientation applied
    too_big = png_with_chunks_before_idat(png_chunk(b"eXIf", tiff_with_orientation(MAX_EXIF_BYTES)))
    data = encode(two_colour(), "PNG")
    trailing = data[:-12] + png_chunk(b"eXIf", tiff_with_orientation(MAX_EXIF_BYTES)) + data[-12:]  # after IDAT
    for hostile in (too_big, trailing):
        refused(
            lambda: decode_image(hostile, param="image", policy=POLICY),
            param="image",
            says=(f"EXIF metadata is larger than {MAX_EXIF_BYTES} bytes",),
        )


# --- the decoding pool ----------------------------------------------------------------------


def test_decoding_runs_on_a_pool_of_its_own_bounded_by_the_config():
    assert ImageInputConfig().decode_threads == 2
    with pytest.raises(ValueError):
        ImageInputConfig(decode_threads=0)
    decoder = Decoder(ImageInputConfig(decode_threads=3).decode_threads)
    assert decoder.threads == 3 and decoder._executor._max_workers == 3
    lock = threading.Lock()
    running, most, names = [0], [0], set()
    release = threading.Event()

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            names.add(threading.current_thread().name)
        release.wait(5)
        with lock:
            running[0] -= 1
        return i

    async def main() -> list[int]:
        tasks = [asyncio.ensure_future(decoder.run(work, i)) for i in range(10)]
        while running[0] < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert running[0] == 3  # the other seven wait their turn
        # The loop's default executor stays free meanwhile.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 2) == "free"
        release.set()
        return await asyncio.gather(*tasks)

    try:
        assert asyncio.run(main()) == list(range(10))
    finally:
        decoder.close()
    assert most[0] == 3
    assert all(name.startswith("image-decode") for name in names)


def test_work_queued_on_the_pool_never_starts_when_its_request_is_cancelled():
    decoder = Decoder(1)
    started, release = [], threading.Event()

    async def main() -> None:
        busy = asyncio.ensure_future(decoder.run(release.wait, 5))
        queued = asyncio.ensure_future(decoder.run(started.append, "queued"))
        await asyncio.sleep(0.05)
        queued.cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches the pool's queue
        release.set()
        await busy
        assert await decoder.run(lambda: "next") == "next"

    try:
        asyncio.run(main())
    finally:
        decoder.close()
    assert started == []


def test_the_decoder_decodes_fields_and_passes_refusals_through(server_port):
    decoder = Decoder(2)

    async def main() -> None:
        image = await decoder.image_from_field(b64(encode(two_colour(), "PNG")), param="image", policy=POLICY)
        assert image.size == (16, 12)
        url = f"http://127.0.0.1:{server_port}/ok.png"
        image = await decoder.image_from_field(url, param="image", policy=loopback_policy())
        assert image.getpixel((2, 2)) == (255, 0, 0)
        hostile = b64(with_empty_scans(progressive_jpeg(), 1000))
        with pytest.raises(InvalidRequest) as caught:
            await decoder.image_from_field(hostile, param="image", policy=POLICY)
        assert caught.value.param == "image" and "scans" in caught.value.message
        mask = encode(Image.new("RGBA", (16, 12), (0, 0, 0, 0)), "PNG")
        repaint = await decoder.run(mask_from_png, mask, image_size=(16, 12), policy=POLICY)
        assert repaint.getpixel((0, 0)) == 255

    try:
        asyncio.run(main())
    finally:
        decoder.close()


# --- URLs: a loopback server ----------------------------------------------------------------

PNG_BYTES = encode(two_colour(), "PNG")
RELEASE = threading.Event()  # set at teardown so stalled handlers end promptly


class ImageHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str]] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        ImageHandler.seen.append((self.path, self.headers.get("Host", "")))
        route = getattr(self, "route_" + self.path.strip("/").split("?")[0].replace("-", "_").replace(".", "_"), None)
        if route is None:
            self.send_error(404)
            return
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _headers(self, status=200, length: int | None = None, **extra) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def route_ok_png(self) -> None:
        self._headers(length=len(PNG_BYTES))
        self.wfile.write(PNG_BYTES)

    def route_until_close(self) -> None:  # HTTP/1.0 style: no length, the body ends at close
        self.close_connection = True
        self._headers(Connection="close")
        self.wfile.write(PNG_BYTES)

    def route_redirect(self) -> None:
        self._headers(302, length=0, Location="/ok.png")

    def route_declared_huge(self) -> None:
        # Declares 50 MB, then sends a little and stalls: only an up-front check is quick.
        self._headers(length=50_000_000)
        self.wfile.write(b"\0" * 1000)
        self.wfile.flush()
        RELEASE.wait(5)

    def route_endless_chunked(self) -> None:
        self._headers(Transfer_Encoding="chunked")
        chunk = b"\0" * 65536
        for _ in range(800):  # 50 MB at most, should the client keep reading
            if RELEASE.is_set():
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def route_stall(self) -> None:
        RELEASE.wait(5)

    def route_trickle(self) -> None:
        self._headers(length=100_000)
        for _ in range(100):
            if RELEASE.wait(0.05):
                break
            self.wfile.write(b"\0")
            self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve(server: http.server.HTTPServer):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def server_port():
    RELEASE.clear()
    server = _Server(("127.0.0.1", 0), ImageHandler)
    _serve(server)
    yield server.server_address[1]
    RELEASE.set()
    server.shutdown()
    server.server_close()


def loopback_policy(**overrides) -> ImageInputPolicy:
    settings = dict(
        max_bytes=2_000_000,
        max_pixels=4_000_000,
        allowed_url_hosts=("127.0.0.1",),
        allow_private_addresses=True,
        fetch_timeout_s=5.0,
    )
    settings.update(overrides)
    return ImageInputPolicy(**settings)


@pytest.fixture
def no_dns(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("DNS must not be consulted")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


@pytest.fixture
def fake_dns(monkeypatch):
    """Map made-up names to addresses; records every lookup."""
    table: dict[str, list[str]] = {}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        if host not in table:
            return real(host, port, *args, **kwargs)
        answers = []
        for address in table[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
            answers.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return answers

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table, lookups


def test_url_from_a_host_not_allowed_is_refused_without_a_lookup(no_dns):
    for policy in (POLICY, loopback_policy(allowed_url_hosts=("images.example",))):
        refused(
            lambda: image_from_field("https://evil.example/cat.png", param="image", policy=policy),
            param="image",
            says=("URLs are accepted only from hosts the operator allows",),
            not_echoing=("evil.example", "cat.png"),
        )


def test_url_with_credentials_refused(no_dns):
    refused(
        lambda: image_from_field("http://user:secret@127.0.0.1/ok.png", param="image", policy=loopback_policy()),
        param="image",
        says=("credentials",),
        not_echoing=("secret",),
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_host_refused_unless_private_addresses_allowed(server_port, host):
    before = len(ImageHandler.seen)
    policy = loopback_policy(allowed_url_hosts=(host,), allow_private_addresses=False)
    refused(
        lambda: image_from_field(f"http://{host}:{server_port}/ok.png", param="image", policy=policy),
        param="image",
        says=("private or internal address",),
        not_echoing=(str(server_port),),
    )
    assert len(ImageHandler.seen) == before  # nothing was sent


def test_allowed_loopback_url_is_fetched_and_decoded(server_port):
    for path in ("ok.png", "until-close"):
        image = image_from_field(f"http://127.0.0.1:{server_port}/{path}", param="image", policy=loopback_policy())
        assert image.size == (16, 12) and image.getpixel((2, 2)) == (255, 0, 0)


def test_connects_to_the_checked_address_with_the_original_host_header(server_port, fake_dns):
    table, lookups = fake_dns
    table["images.example"] = ["127.0.0.1"]
    policy = loopback_policy(allowed_url_hosts=("images.example",))
    image = image_from_field(f"http://images.example:{server_port}/ok.png?v=1", param="image", policy=policy)
    assert image.size == (16, 12)
    assert lookups == ["images.example"]  # one lookup: no second answer to rebind to
    assert ImageHandler.seen[-1] == ("/ok.png?v=1", f"images.example:{server_port}")


@pytest.mark.parametrize("answers", [["93.184.216.34", "10.0.0.7"], ["::ffff:127.0.0.1"], ["169.254.169.254"]])
def test_any_internal_answer_refuses_the_host(fake_dns, answers):
    table, _ = fake_dns
    table["images.example"] = answers
    policy = ImageInputPolicy(max_bytes=1000, max_pixels=1000, allowed_url_hosts=("images.example",))
    refused(
        lambda: image_from_field("https://images.example/a.png", param="image", policy=policy),
        param="image",
        says=("private or internal address",),
        not_echoing=tuple(answers),
    )


def test_unresolvable_host_refused(fake_dns):
    policy = loopback_policy(allowed_url_hosts=("no-such-host.invalid",))
    refused(
        lambda: image_from_field("http://no-such-host.invalid/a.png", param="image", policy=policy),
        param="image",
        says=("could not be resolved",),
        not_echoing=("no-such-host",),
    )


def test_redirect_refused(server_port):
    refused(
        lambda: image_from_field(f"http://127.0.0.1:{server_port}/redirect", param="image", policy=loopback_policy()),
        param="image",
        says=("redirects are not followed", "302"),
    )


def test_error_status_refused(server_port):
    refused(
        lambda: image_from_field(
            f"http://127.0.0.1:{server_port}/missing.png", param="image", policy=loopback_policy()
        ),
        param="image",
        says=("HTTP 404",),
        not_echoing=("missing",),
    )


def test_declared_length_over_max_bytes_refused_up_front(server_port):
    policy = loopback_policy(max_bytes=100_000, fetch_timeout_s=3.0)
    started = time.perf_counter()
    refused(
        lambda: image_from_field(f"http://127.0.0.1:{server_port}/declared-huge", param="image", policy=policy),
        param="image",
        says=("larger than 100000 bytes",),
    )
    assert time.perf_counter() - started < 1.5  # did not wait for the body


def test_chunked_body_over_max_bytes_stops_reading(server_port):
    policy = loopback_policy(max_bytes=100_000, fetch_timeout_s=3.0)
    refused(
        lambda: image_from_field(f"http://127.0.0.1:{server_port}/endless-chunked", param="image", policy=policy),
        param="image",
        says=("larger than 100000 bytes",),
    )


@pytest.mark.parametrize("path", ["stall", "trickle"])
def test_slow_server_refused_at_the_overall_deadline(server_port, path):
    policy = loopback_policy(fetch_timeout_s=0.5)
    started = time.perf_counter()
    refused(
        lambda: image_from_field(f"http://127.0.0.1:{server_port}/{path}", param="image", policy=policy),
        param="image",
        says=("within 0.5 seconds",),
    )
    assert time.perf_counter() - started < 1.5


def test_connection_refused_is_a_400():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    refused(
        lambda: image_from_field(f"http://127.0.0.1:{closed_port}/a.png", param="image", policy=loopback_policy()),
        param="image",
        says=("could not be fetched",),
    )


# --- https: SNI and certificate checks name the URL's host ----------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https loopback server with a self-signed certificate for images.example."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.example")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    server = _Server(("127.0.0.1", 0), ImageHandler)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    _serve(server)
    yield server.server_address[1], cert_path
    server.shutdown()
    server.server_close()


def test_https_certificate_is_verified(tls_server, fake_dns):
    port, _ = tls_server
    table, _ = fake_dns
    table["images.example"] = ["127.0.0.1"]
    policy = loopback_policy(allowed_url_hosts=("images.example",))
    refused(
        lambda: image_from_field(f"https://images.example:{port}/ok.png", param="image", policy=policy),
        param="image",
        says=("certificate could not be verified",),
    )


def test_https_checks_the_certificate_against_the_url_host(tls_server, fake_dns, monkeypatch):
    port, cert_path = tls_server
    table, _ = fake_dns
    table["images.example"] = ["127.0.0.1"]
    table["other.example"] = ["127.0.0.1"]
    monkeypatch.setattr(image_input, "_tls_context", lambda: ssl.create_default_context(cafile=str(cert_path)))
    policy = loopback_policy(allowed_url_hosts=("images.example", "other.example"))
    image = image_from_field(f"https://images.example:{port}/ok.png", param="image", policy=policy)
    assert image.size == (16, 12)
    # Same address, same trusted certificate, but the URL names another host.
    refused(
        lambda: image_from_field(f"https://other.example:{port}/ok.png", param="image", policy=policy),
        param="image",
        says=("certificate could not be verified",),
        not_echoing=("other.example",),
    )


# --- the address classifier -----------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "::ffff:169.254.169.254",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
        "2001:db8::1",
        "not-an-address",
    ],
)
def test_non_public_addresses(address):
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses(address):
    assert is_public_address(address)


# --- masks ----------------------------------------------------------------------------------


def test_rgba_mask_marks_exactly_the_fully_transparent_pixels():
    alpha = np.full((6, 10), 255, dtype=np.uint8)
    alpha[1, 2] = 0
    alpha[4, 7] = 0
    alpha[3, 3] = 1  # nearly transparent is still kept
    alpha[0, 0] = 128
    rgba = np.dstack([np.full((6, 10, 3), 77, dtype=np.uint8), alpha])
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    mask = mask_from_png(data, image_size=(10, 6), policy=POLICY)
    assert mask.mode == "L" and mask.size == (10, 6)
    np.testing.assert_array_equal(np.asarray(mask), np.where(alpha == 0, 255, 0))


def test_la_and_palette_transparency_masks():
    la = Image.new("LA", (4, 4), (0, 255))
    la.putpixel((1, 1), (0, 0))
    mask = mask_from_png(encode(la, "PNG"), image_size=(4, 4), policy=POLICY)
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((0, 0)) == 0

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.putpixel((2, 3), 0)
    mask = mask_from_png(encode(palette, "PNG", transparency=0), image_size=(4, 4), policy=POLICY)
    assert np.count_nonzero(np.asarray(mask)) == 1 and mask.getpixel((2, 3)) == 255


def test_jpeg_mask_refused():
    data = encode(Image.new("RGB", (4, 4)), "JPEG")
    refused(lambda: mask_from_png(data, image_size=(4, 4), policy=POLICY), param="mask", says=("not a PNG image",))


def test_webp_with_alpha_is_not_a_mask():
    data = encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "WEBP", lossless=True)
    refused(lambda: mask_from_png(data, image_size=(4, 4), policy=POLICY), param="mask", says=("not a PNG image",))


def test_mask_without_alpha_refused():
    data = encode(Image.new("RGB", (4, 4), "white"), "PNG")
    refused(lambda: mask_from_png(data, image_size=(4, 4), policy=POLICY), param="mask", says=("no alpha channel",))


def test_mask_of_another_size_refused():
    data = encode(Image.new("RGBA", (8, 4), (0, 0, 0, 0)), "PNG")
    refused(
        lambda: mask_from_png(data, image_size=(4, 8), policy=POLICY),
        param="mask",
        says=("the mask is 8x4 but the image is 4x8",),
    )


def test_fully_opaque_mask_refused():
    data = encode(Image.new("RGBA", (4, 4), (0, 0, 0, 255)), "PNG")
    refused(lambda: mask_from_png(data, image_size=(4, 4), policy=POLICY), param="mask", says=("nothing to edit",))


def test_mask_refusals_name_the_given_param():
    data = encode(Image.new("RGBA", (4, 4), (0, 0, 0, 255)), "PNG")
    refused(lambda: mask_from_png(data, image_size=(4, 4), policy=POLICY, param="mask[]"), param="mask[]")


def test_mask_bomb_and_over_max_bytes_refused():
    bomb = png_declaring(20_000, 20_000)
    started = time.perf_counter()
    refused(lambda: mask_from_png(bomb, image_size=(20_000, 20_000), policy=POLICY), param="mask", says=("pixels",))
    assert time.perf_counter() - started < 1.0
    data = encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")
    tiny = ImageInputPolicy(max_bytes=len(data) - 1, max_pixels=100)
    refused(lambda: mask_from_png(data, image_size=(4, 4), policy=tiny), param="mask", says=("larger than",))


def test_module_imports_without_torch_or_diffusers():
    check = "import sys, serve_app.image_input; assert not {'torch', 'diffusers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
