"""OpenAI's multipart image forms (edits, variations), read part by part by their names.

Starlette's form parser decides whether a part is a file by whether it carries a filename,
and decodes every other part as text. But curl's ``-F image=<photo.png`` sends the file's
bytes without one, and such a part would then arrive as mangled text. Here the endpoint
names its file parts (``image``, ``image[]``, ``mask``): those are the part's raw bytes,
with or without a filename; every other part is a UTF-8 text field. The body is already
read and bounded (``max_body_bytes``) before it is parsed; the part counts are bounded
while parsing.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from serve_app.errors import InvalidRequest


@dataclass(frozen=True)
class FormPart:
    name: str
    data: bytes
    filename: str | None = None  # None: the part carries no filename


def _decoded(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _unreadable(why: str) -> InvalidRequest:
    return InvalidRequest(f"The multipart form could not be read: {why}.")


class _Collector:
    """python-multipart's callbacks, collecting whole parts and counting them as they start."""

    def __init__(self, file_names: Collection[str], max_files: int, max_fields: int) -> None:
        self.parts: list[FormPart] = []
        self.ended = False
        self._file_names = file_names
        self._limits = {True: max_files, False: max_fields}
        self._counts = {True: 0, False: 0}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._data = bytearray()
        self._name = ""
        self._filename: str | None = None

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _unreadable('a part has no Content-Disposition "name"')
        self._name = _decoded(options[b"name"])
        self._filename = _decoded(options[b"filename"]) if b"filename" in options else None
        is_file = self._name in self._file_names
        self._counts[is_file] += 1
        if self._counts[is_file] > self._limits[is_file]:
            kind = "file parts" if is_file else "fields"
            raise _unreadable(f"too many {kind} (at most {self._limits[is_file]})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def on_part_end(self) -> None:
        self.parts.append(FormPart(self._name, bytes(self._data), self._filename))

    def on_end(self) -> None:
        self.ended = True


def parse_form(
    body: bytes, content_type: str, *, file_names: Collection[str], max_files: int, max_fields: int
) -> list[FormPart]:
    """The parts of a ``multipart/form-data`` body, in order; a 400 when it is malformed,
    truncated, or has more than ``max_files`` parts named in ``file_names`` or more than
    ``max_fields`` others."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise _unreadable("its Content-Type names no boundary")
    collector = _Collector(file_names, max_files, max_fields)
    callbacks = {
        name: getattr(collector, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        if isinstance(exc, InvalidRequest):
            raise
        raise _unreadable("it is not well-formed multipart/form-data") from None
    if not collector.ended:
        raise _unreadable("it ends before its closing boundary")
    return collector.parts
