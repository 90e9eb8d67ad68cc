"""What wraps a request's payload, undone before its decoder runs (service/decode.py, service/tensors.py).

- ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), inflated within the body limit;
- ``multipart/form-data`` (a browser's or curl's ``-F`` file upload): the named part's bytes;
- the Open Inference Protocol's binary tensor data extension: a JSON header of ``Inference-Header-Content-Length``
  bytes, then the raw tensor bytes.

Each raises the service's 4xx errors (service/errors.py) naming what was wrong.
"""

from __future__ import annotations

import zlib

from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidInput, MalformedBody, PayloadTooLarge, UnsupportedMediaType


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), at most ``limit`` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"content encoding {enc!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedBody(f"the {enc} body cannot be decompressed: {exc}", code="malformed_body") from exc
    if len(out) > limit:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise MalformedBody(f"the {enc} body is truncated", code="malformed_body")
    return out


def split(body: bytes, declared: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) following the binary tensor data extension."""
    if declared is None:
        return body, b""
    text = declared.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) > len(body):
        raise MalformedBody(
            f"Inference-Header-Content-Length {declared[:32]!r} must be an integer at most the body size ({len(body)})"
        )
    n = int(text)
    return body[:n], body[n:]


def multipart_file(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The bytes of the ``field`` part of a ``multipart/form-data`` body (its boundary from ``content_type``)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedBody("the multipart body has no boundary", code="malformed_multipart")
    parts: list[tuple[bytes, list[bytes]]] = []
    header: list[bytes] = []
    callbacks = {
        "on_part_begin": lambda: parts.append((b"", [])),
        "on_header_field": lambda d, s, e: header.append(d[s:e].lower()),
        "on_header_value": lambda d, s, e: header.append(d[s:e]),
        "on_header_end": lambda: _part_header(parts, header),
        "on_part_data": lambda d, s, e: parts[-1][1].append(d[s:e]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own types for malformed bodies
        raise MalformedBody(f"malformed multipart body: {exc}", code="malformed_multipart") from None
    for name, chunks in parts:
        if name == field.encode():
            return b"".join(chunks)
    raise InvalidInput(f'the multipart body needs a "{field}" part holding a PNG', code="missing_field")


def _part_header(parts: list[tuple[bytes, list[bytes]]], header: list[bytes]) -> None:
    if len(header) >= 2 and header[0] == b"content-disposition" and parts:
        _, params = parse_options_header(b"".join(header[1:]))
        parts[-1] = (params.get(b"name", b""), parts[-1][1])
    header.clear()
