"""Input images from clients: validated PIL images, or a 400 that names the field.

Image-to-image requests carry an ``image`` field (base64, a ``data:`` URI or an http(s)
URL); OpenAI's multipart edits endpoint sends image files and a ``mask`` PNG. Everything
here is hostile input: sizes are checked from the header before any pixel is decoded,
only PNG, JPEG and WEBP are parsed at all, and a URL is fetched only from a host the
operator allows, from an address checked to be public, with one DNS lookup whose answer
is the address we connect to. Messages never echo the input.

Decoding has a work budget, checked before the work is done: the encoded bytes and the
declared pixels (every format), the scans of a JPEG (libjpeg makes a pass over the whole
image per scan, so a file of empty scans costs seconds), the reads Pillow's Python parsers
make (one per marker, chunk or junk byte: a file of tiny chunks), the size of the EXIF block
that orientation is read from, and one frame (animations are refused from the header).

The functions here are synchronous and blocking (DNS, sockets, decoding); ``Decoder`` runs
them on a small thread pool of decoding's own, never the event loop's default executor.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.errors import InvalidRequest

# The formats a diffusion pipeline can use; everything else (SVG, EPS, PDF, GIF, TIFF...)
# is never handed to a parser at all.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
# ``formats=["JPEG"]`` may still yield an MPO (a JPEG with extra pictures, as many phone
# cameras write): its first picture is the photo, the rest are not animation frames.
_STILL_MULTI_PICTURE_FORMATS = ("MPO",)
DATA_URI_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Whatever PIL raises on corrupt or truncated data, or on a size it calls a bomb.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    MemoryError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}:")
_READ_CHUNK = 64 * 1024
# Pillow's parsers (JPEG markers, PNG chunks) are Python loops with one read per step, and
# skip junk or fill bytes one at a time: a file of tiny chunks costs ~1 us a byte. A real
# file needs a few dozen reads plus about three per IDAT chunk (libpng writes 8 KiB ones);
# past this allowance plus one read per KiB, parsing stops.
_PARSE_READS = 10_000
_PARSE_BYTES_PER_READ = 1024
# Orientation is read from the EXIF block; JPEG caps it at 64 KiB (one APP1 segment), and
# Pillow's parse of a larger one (PNG eXIf, WEBP EXIF) costs up to a second.
MAX_EXIF_BYTES = 64 * 1024
_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"

_T = TypeVar("_T")


@dataclass(frozen=True)
class ImageInputPolicy:
    max_bytes: int  # encoded bytes of one input image
    max_pixels: int  # width * height of the decoded input
    # Exact, lowercase host names an http(s) URL may name; empty: URLs are refused.
    allowed_url_hosts: tuple[str, ...] = ()
    # Operator opt-in for internal hosts; by default only public addresses are fetched.
    allow_private_addresses: bool = False
    fetch_timeout_s: float = 10.0
    # Scans (SOS markers) a JPEG may hold, counted over the whole file: an upper bound, as
    # embedded thumbnails and MPO pictures count too. A progressive JPEG has about 10.
    max_jpeg_scans: int = 100


# --- the decoding pool ----------------------------------------------------------------------


class Decoder:
    """Decoding's own bounded thread pool. At most ``threads`` images are decoded at once
    whatever the load; work still queued when its request is cancelled never starts. The
    loop's default executor (``asyncio.to_thread``) stays free for storage and the rest."""

    def __init__(self, threads: int = 2) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-decode")

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``await asyncio.to_thread(fn, *args, **kwargs)``, on this pool (context vars too)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def image_from_field(self, value: str, *, param: str, policy: ImageInputPolicy) -> Image.Image:
        """``image_from_field`` off the loop: an http(s) URL is fetched on the default
        executor (waiting on the network, bounded by ``policy.fetch_timeout_s``), so a slow
        host never holds a decoding thread; the bytes are decoded on this pool."""
        data = await self.bytes_from_field(value, param=param, policy=policy)
        return await self.run(decode_image, data, param=param, policy=policy)

    async def bytes_from_field(self, value: str, *, param: str, policy: ImageInputPolicy) -> bytes:
        """``image_bytes_from_field`` off the loop: a URL fetched on the default executor,
        base64 or a data URI decoded on this pool."""
        if _is_url(value):
            return await asyncio.to_thread(image_bytes_from_field, value, param=param, policy=policy)
        return await self.run(image_bytes_from_field, value, param=param, policy=policy)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- decoding -------------------------------------------------------------------------------


def _check_before_parsing(data: bytes, *, param: str, policy: ImageInputPolicy) -> None:
    """What an image's bytes must pass before a parser sees them (decode_image, sniff_image)."""
    if not data:
        raise InvalidRequest(f"Invalid '{param}': the image is empty.", param=param)
    _check_byte_size(len(data), param=param, policy=policy)
    _check_jpeg_scans(data, param=param, policy=policy)


def _check_still_within_pixels(image: Image.Image, *, param: str, policy: ImageInputPolicy) -> None:
    """What an opened image's header must pass: declared pixels within the limit, one frame."""
    _check_pixels(image, param=param, policy=policy)
    if getattr(image, "n_frames", 1) > 1 and image.format not in _STILL_MULTI_PICTURE_FORMATS:
        raise InvalidRequest(f"Invalid '{param}': animated images are not accepted; send a single frame.", param=param)


def decode_image(data: bytes, *, param: str, policy: ImageInputPolicy) -> Image.Image:
    """A PNG, JPEG or WEBP still image, EXIF orientation applied, in "RGB" or "RGBA"."""
    _check_before_parsing(data, param=param, policy=policy)
    image, reader = _open(data, INPUT_FORMATS, param=param, what="a PNG, JPEG or WEBP image")
    try:
        _check_still_within_pixels(image, param=param, policy=policy)
        _load(image, reader, param=param)
        # After loading: a PNG's eXIf chunk may follow its image data.
        if len(image.info.get("exif") or b"") > MAX_EXIF_BYTES:
            raise InvalidRequest(
                f"Invalid '{param}': the image's EXIF metadata is larger than {MAX_EXIF_BYTES} bytes.",
                param=param,
            )
        try:
            upright = ImageOps.exif_transpose(image)
            mode = "RGBA" if _has_alpha(upright) else "RGB"
            return upright.convert(mode)
        except _DECODE_ERRORS:
            raise _unreadable(param) from None
    finally:
        image.close()


def sniff_image(data: bytes, *, param: str, policy: ImageInputPolicy) -> tuple[str, int, int]:
    """``(format, width, height)`` of a PNG, JPEG or WEBP still image, from its header only:
    the checks ``decode_image`` makes before it decodes a pixel (bytes, JPEG scans, format,
    declared pixels, one frame), for an image kept now and decoded later (a Files API upload
    of purpose vision / user_data). ``format`` is PNG, JPEG or WEBP (an MPO is a JPEG)."""
    _check_before_parsing(data, param=param, policy=policy)
    image, _ = _open(data, INPUT_FORMATS, param=param, what="a PNG, JPEG or WEBP image")
    try:
        _check_still_within_pixels(image, param=param, policy=policy)
        kind = "JPEG" if image.format in _STILL_MULTI_PICTURE_FORMATS else str(image.format)
        return kind, image.width, image.height
    except _ParseBudgetExceeded:
        raise _over_parse_budget(param) from None
    except _DECODE_ERRORS:
        raise _unreadable(param) from None
    finally:
        image.close()


def mask_from_png(
    data: bytes, *, image_size: tuple[int, int], policy: ImageInputPolicy, param: str = "mask"
) -> Image.Image:
    """OpenAI's edits mask as an "L" image: 255 where the mask is fully transparent (repaint,
    diffusers' convention), 0 elsewhere."""
    if not data:
        raise InvalidRequest(f"Invalid '{param}': the mask is empty.", param=param)
    _check_byte_size(len(data), param=param, policy=policy)
    image, reader = _open(data, ("PNG",), param=param, what="a PNG image")
    try:
        # The size must match the image's, which is already within max_pixels: checking it
        # from the header bounds what decoding may allocate.
        if image.size != tuple(image_size):
            raise InvalidRequest(
                f"Invalid '{param}': the mask is {image.width}x{image.height} but the image is "
                f"{image_size[0]}x{image_size[1]}; they must be the same size.",
                param=param,
            )
        _check_pixels(image, param=param, policy=policy)
        if getattr(image, "n_frames", 1) > 1:
            raise InvalidRequest(f"Invalid '{param}': an animated PNG is not a mask.", param=param)
        if not _has_alpha(image):
            raise InvalidRequest(
                f"Invalid '{param}': the mask has no alpha channel; fully transparent pixels mark "
                "the area to edit.",
                param=param,
            )
        _load(image, reader, param=param)
        try:
            alpha = image.convert("RGBA").getchannel("A")
        except _DECODE_ERRORS:
            raise _unreadable(param) from None
    finally:
        image.close()
    repaint = alpha.point([255] + [0] * 255)
    if repaint.getbbox() is None:
        raise InvalidRequest(
            f"Invalid '{param}': the mask has no fully transparent pixel, so there is nothing to edit.",
            param=param,
        )
    return repaint


class _ParseBudgetExceeded(Exception):
    """Raised from a read past the budget; deliberately none of the errors Pillow catches."""


class _BudgetedReader(io.BytesIO):
    """The file Pillow parses: counts its reads and refuses more than ``budget`` of them."""

    def __init__(self, data: bytes, budget: int) -> None:
        super().__init__(data)
        self.budget = budget
        self.exceeded = False

    def read(self, size: int | None = -1, /) -> bytes:
        self.budget -= 1
        if self.budget < 0:
            self.exceeded = True  # sticky, should a caller swallow the exception
            raise _ParseBudgetExceeded
        return super().read(size)


def _open(data: bytes, formats: tuple[str, ...], *, param: str, what: str) -> tuple[Image.Image, _BudgetedReader]:
    """Parse only the header, and only as one of ``formats``."""
    reader = _BudgetedReader(data, _PARSE_READS + len(data) // _PARSE_BYTES_PER_READ)
    try:
        image = Image.open(reader, formats=list(formats))
    except _ParseBudgetExceeded:
        raise _over_parse_budget(param) from None
    except UnidentifiedImageError:
        if reader.exceeded:
            raise _over_parse_budget(param) from None
        raise InvalidRequest(f"Invalid '{param}': the data is not {what}.", param=param) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own limit, raised from the header: the image declares far too many pixels.
        raise InvalidRequest(f"Invalid '{param}': the image has too many pixels.", param=param) from None
    except _DECODE_ERRORS:
        raise (_over_parse_budget(param) if reader.exceeded else _unreadable(param)) from None
    if reader.exceeded:
        image.close()
        raise _over_parse_budget(param)
    return image, reader


def _load(image: Image.Image, reader: _BudgetedReader, *, param: str) -> None:
    """Decode the pixels, within the parse budget."""
    try:
        image.load()
    except _ParseBudgetExceeded:
        raise _over_parse_budget(param) from None
    except _DECODE_ERRORS:
        raise (_over_parse_budget(param) if reader.exceeded else _unreadable(param)) from None
    if reader.exceeded:
        raise _over_parse_budget(param)


def _check_jpeg_scans(data: bytes, *, param: str, policy: ImageInputPolicy) -> None:
    """Count the SOS markers of a JPEG before libjpeg sees it. Inside entropy-coded data an
    0xFF byte is always followed by 0x00 or a restart marker, so every ``FF DA`` is a scan
    header or a byte pair inside metadata: the count is an upper bound, read at C speed."""
    if data.startswith(_JPEG_SOI) and data.count(_JPEG_SOS) > policy.max_jpeg_scans:
        raise InvalidRequest(
            f"Invalid '{param}': the JPEG has more than {policy.max_jpeg_scans} scans.", param=param
        )


def _over_parse_budget(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': the image has too many chunks, markers or padding bytes for its size.",
        param=param,
    )


def _check_byte_size(size: int, *, param: str, policy: ImageInputPolicy) -> None:
    if size > policy.max_bytes:
        raise InvalidRequest(
            f"Invalid '{param}': the image is larger than {policy.max_bytes} bytes.", param=param
        )


def _check_pixels(image: Image.Image, *, param: str, policy: ImageInputPolicy) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _unreadable(param)
    if width * height > policy.max_pixels:
        raise InvalidRequest(
            f"Invalid '{param}': {width}x{height} is more than {policy.max_pixels} pixels.", param=param
        )


def _has_alpha(image: Image.Image) -> bool:
    # PNG and WEBP can carry transparency outside an alpha mode: a tRNS colour or palette entry.
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _unreadable(param: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{param}': the image data is corrupt or truncated.", param=param)


# --- the JSON field -------------------------------------------------------------------------


def image_from_field(value: str, *, param: str, policy: ImageInputPolicy) -> Image.Image:
    """Base64 (standard or URL-safe), a base64 ``data:`` URI, or an http(s) URL, decoded.
    Blocking: ``Decoder.image_from_field`` is the way to call it from the event loop."""
    return decode_image(image_bytes_from_field(value, param=param, policy=policy), param=param, policy=policy)


def _is_url(value: object) -> bool:
    scheme = _URI_SCHEME.match(value.strip()) if isinstance(value, str) else None
    return scheme is not None and scheme[0][:-1].lower() in ("http", "https")


def image_bytes_from_field(value: str, *, param: str, policy: ImageInputPolicy) -> bytes:
    """The encoded image the field holds: base64 or a data URI decoded, a URL fetched."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"Invalid '{param}': expected base64 image data, a data URI or a URL.", param=param)
    value = value.strip()
    scheme = _URI_SCHEME.match(value)
    if scheme is None:  # ':' is not in either base64 alphabet
        data = _decode_base64(value, param=param, policy=policy)
    else:
        name = scheme[0][:-1].lower()
        if name == "data":
            data = _decode_data_uri(value, param=param, policy=policy)
        elif name in ("http", "https"):
            data = fetch_image_bytes(value, param=param, policy=policy)
        else:
            raise InvalidRequest(
                f"Invalid '{param}': only http and https URLs are accepted (or base64 data).", param=param
            )
    return data


def _decode_data_uri(value: str, *, param: str, policy: ImageInputPolicy) -> bytes:
    header, comma, payload = value.partition(",")
    # data:[<media type>][;<parameter>...];base64
    parts = [part.strip().lower() for part in header[len("data:") :].split(";")]
    media_type, parameters = parts[0], parts[1:]
    if not comma or media_type not in DATA_URI_MEDIA_TYPES or not parameters or parameters[-1] != "base64":
        raise InvalidRequest(
            f"Invalid '{param}': a data URI must be base64-encoded image/png, image/jpeg or image/webp, "
            "e.g. data:image/png;base64,....",
            param=param,
        )
    if "%" in payload:  # '%' is in neither base64 alphabet: the payload was percent-encoded
        payload = urllib.parse.unquote(payload)
    return _decode_base64(payload, param=param, policy=policy)


def _decode_base64(text: str, *, param: str, policy: ImageInputPolicy) -> bytes:
    # Refuse from the length alone before copying or decoding anything large; the generous
    # allowance is for line breaks in wrapped base64.
    if len(text) > 2 * _encoded_length(policy.max_bytes) + 1024:
        raise InvalidRequest(f"Invalid '{param}': the image is larger than {policy.max_bytes} bytes.", param=param)
    compact = "".join(text.split()).rstrip("=")
    if len(compact) * 3 // 4 > policy.max_bytes:
        raise InvalidRequest(f"Invalid '{param}': the image is larger than {policy.max_bytes} bytes.", param=param)
    urlsafe = "-" in compact or "_" in compact
    if urlsafe:
        if "+" in compact or "/" in compact:
            raise _bad_base64(param)
        compact = compact.replace("-", "+").replace("_", "/")
    if len(compact) % 4 == 1 or not compact:
        raise _bad_base64(param)
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad_base64(param) from None


def _encoded_length(byte_count: int) -> int:
    return 4 * -(-byte_count // 3)


def _bad_base64(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': not valid base64 (send base64 image data, a data URI or an http(s) URL).",
        param=param,
    )


# --- URLs -----------------------------------------------------------------------------------


def is_public_address(address: str) -> bool:
    """Whether an IP address is on the public internet: not loopback, private, link-local,
    shared (CGNAT), reserved, multicast or unspecified, including IPv4 addresses embedded in
    IPv6 (mapped, NAT64, 6to4, Teredo)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that stand for an IPv4 address are as public as that address.
        if ip.ipv4_mapped is not None:
            return is_public_address(str(ip.ipv4_mapped))
        if ip in _NAT64:
            return is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if any(not is_public_address(str(v4)) for v4 in (ip.sixtofour, *(ip.teredo or ())) if v4 is not None):
            return False
    # is_global also excludes shared (CGNAT) 100.64.0.0/10; the rest are listed to be sure.
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def fetch_image_bytes(url: str, *, param: str, policy: ImageInputPolicy) -> bytes:
    """GET an http(s) URL from an allowed host at a checked address: at most
    ``policy.max_bytes``, within ``policy.fetch_timeout_s`` overall, no redirects."""
    deadline = time.monotonic() + policy.fetch_timeout_s
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRequest(f"Invalid '{param}': the URL is malformed.", param=param) from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidRequest(f"Invalid '{param}': the URL has no host.", param=param)
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(f"Invalid '{param}': URLs with credentials are not accepted.", param=param)
    if host not in policy.allowed_url_hosts:
        raise InvalidRequest(
            f"Invalid '{param}': URLs are accepted only from hosts the operator allows; send the image "
            "as base64 instead.",
            param=param,
        )
    port = port or (443 if scheme == "https" else 80)
    addresses = _resolve(host, port, deadline=deadline, param=param, policy=policy)
    if not policy.allow_private_addresses and not all(is_public_address(sockaddr[0]) for _, sockaddr in addresses):
        # Any internal answer refuses the host: a resolver may hand out either.
        raise InvalidRequest(
            f"Invalid '{param}': the URL's host resolves to a private or internal address, which is "
            "not fetched.",
            param=param,
        )

    connection_type = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    connection = connection_type(host, port, addresses=addresses, deadline=deadline)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()
    # Socket timeouts bound each wait, not the sum: a server trickling a byte at a time
    # could hold us forever. The watchdog shuts the socket down at the deadline.
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _expire, args=(connection, expired))
    watchdog.daemon = True
    watchdog.start()
    try:
        return _get(connection, target, param=param, policy=policy, expired=expired)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # Check the clock first: the watchdog's shutdown surfaces as any of these.
        if expired.is_set() or time.monotonic() >= deadline or isinstance(exc, TimeoutError):
            raise _timed_out(param, policy) from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = "its TLS certificate could not be verified for the host"
        elif isinstance(exc, ssl.SSLError):
            why = "the TLS handshake failed"
        else:
            why = "the connection failed or the server's answer was not valid HTTP"
        raise InvalidRequest(f"Invalid '{param}': the URL could not be fetched ({why}).", param=param) from None
    finally:
        watchdog.cancel()
        connection.close()


def _get(
    connection: http.client.HTTPConnection,
    target: str,
    *,
    param: str,
    policy: ImageInputPolicy,
    expired: threading.Event,
) -> bytes:
    connection.request(
        "GET",
        target,
        headers={"Accept": "image/png, image/jpeg, image/webp", "Accept-Encoding": "identity"},
    )
    response = connection.getresponse()
    if expired.is_set():
        raise _timed_out(param, policy)
    if 300 <= response.status < 400:
        raise InvalidRequest(
            f"Invalid '{param}': the URL answered with a redirect (HTTP {response.status}); redirects are "
            "not followed, send the final URL.",
            param=param,
        )
    if response.status != 200:
        raise InvalidRequest(f"Invalid '{param}': the URL answered with HTTP {response.status}.", param=param)
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise InvalidRequest(f"Invalid '{param}': the image is larger than {policy.max_bytes} bytes.", param=param)
    body = bytearray()
    while True:
        chunk = response.read(min(_READ_CHUNK, policy.max_bytes + 1 - len(body)))
        if expired.is_set():  # a shut-down socket reads as the end of the body
            raise _timed_out(param, policy)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > policy.max_bytes:
            raise InvalidRequest(
                f"Invalid '{param}': the image is larger than {policy.max_bytes} bytes.", param=param
            )


def _timed_out(param: str, policy: ImageInputPolicy) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': the URL did not deliver the image within {policy.fetch_timeout_s:g} seconds.",
        param=param,
    )


def _expire(connection: http.client.HTTPConnection, expired: threading.Event) -> None:
    expired.set()
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_Address = tuple[int, tuple]  # (family, sockaddr) as getaddrinfo gives them


def _resolve(host: str, port: int, *, deadline: float, param: str, policy: ImageInputPolicy) -> list[_Address]:
    """The host's addresses, looked up once: these are the addresses checked and connected to.

    getaddrinfo cannot be interrupted, so it runs in a daemon thread we stop waiting for at
    the deadline."""
    answer: list = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    resolver = threading.Thread(target=lookup, name="image-url-dns", daemon=True)
    resolver.start()
    resolver.join(max(0.0, deadline - time.monotonic()))
    if not answer:
        raise _timed_out(param, policy)
    if isinstance(answer[0], Exception):
        raise InvalidRequest(f"Invalid '{param}': the URL's host could not be resolved.", param=param)
    addresses = [
        (family, sockaddr)
        for family, _type, _proto, _name, sockaddr in answer[0]
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
    if not addresses:
        raise InvalidRequest(f"Invalid '{param}': the URL's host could not be resolved.", param=param)
    return addresses


def _connect_pinned(addresses: list[_Address], deadline: float) -> socket.socket:
    """A TCP connection to the first checked address that answers, never a fresh lookup."""
    failure: OSError = OSError("no address")
    for family, sockaddr in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed while connecting")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
    raise failure


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Sends the URL's Host header but connects to the address that was checked."""

    def __init__(self, host: str, port: int, *, addresses: list[_Address], deadline: float) -> None:
        super().__init__(host, port, timeout=max(0.001, deadline - time.monotonic()))
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        self.sock = _connect_pinned(self._addresses, self._deadline)
        self.sock.settimeout(max(0.001, self._deadline - time.monotonic()))


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As ``_PinnedHTTPConnection``, with SNI and certificate checks against the URL's host."""

    def __init__(self, host: str, port: int, *, addresses: list[_Address], deadline: float) -> None:
        super().__init__(host, port, timeout=max(0.001, deadline - time.monotonic()), context=_tls_context())
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        raw = _connect_pinned(self._addresses, self._deadline)
        raw.settimeout(max(0.001, self._deadline - time.monotonic()))
        self.sock = raw  # within the watchdog's reach during the handshake too
        # server_hostname: SNI and the certificate check name the URL's host, not the address.
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)
