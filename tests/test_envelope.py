"""service/envelope.py: what wraps a payload is undone exactly, and every malformed or oversized wrapper is the
service's 4xx naming what was wrong (never a zlib or python-multipart exception)."""

from __future__ import annotations

import gzip
import zlib

import pytest

from service.envelope import decompress, multipart_file, split
from service.errors import InvalidInput, MalformedBody, PayloadTooLarge, UnsupportedMediaType

PAYLOAD = b'{"inputs": []}' * 100


@pytest.mark.parametrize("encoding", [None, "identity", " Identity "])
def test_an_identity_body_is_passed_through(encoding: str | None) -> None:
    assert decompress(PAYLOAD, encoding, limit=10) is PAYLOAD  # the body limit applied when it was read


@pytest.mark.parametrize(("encoding", "packed"), [("gzip", gzip.compress(PAYLOAD)), ("deflate", zlib.compress(PAYLOAD)),
                                                  ("GZIP", gzip.compress(PAYLOAD))])  # fmt: skip
def test_gzip_and_deflate_are_undone(encoding: str, packed: bytes) -> None:
    assert decompress(packed, encoding, limit=len(PAYLOAD)) == PAYLOAD


def test_a_body_that_inflates_past_the_limit_is_413_without_inflating_it_all() -> None:
    bomb = gzip.compress(bytes(50_000_000))  # 50 MB of zeros in about 50 KB
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 1000000 bytes"):
        decompress(bomb, "gzip", limit=1_000_000)


@pytest.mark.parametrize(("body", "message"), [(b"not gzip at all", "cannot be decompressed"),
                                               (gzip.compress(PAYLOAD)[:-20], "truncated")])  # fmt: skip
def test_a_broken_or_truncated_stream_is_400(body: bytes, message: str) -> None:
    with pytest.raises(MalformedBody, match=message):
        decompress(body, "gzip", limit=len(PAYLOAD))


def test_an_unknown_encoding_is_415() -> None:
    with pytest.raises(UnsupportedMediaType, match="'br' is not supported"):
        decompress(PAYLOAD, "br", limit=len(PAYLOAD))


def test_the_binary_extension_splits_at_the_declared_header_length() -> None:
    assert split(b"{}TAIL", None) == (b"{}TAIL", b"")
    assert split(b"{}TAIL", "2") == (b"{}", b"TAIL")
    assert split(b"{}TAIL", " 6 ") == (b"{}TAIL", b"")


@pytest.mark.parametrize("declared", ["7", "-1", "1.5", "two", "", "١", "9" * 19])
def test_a_header_length_that_is_not_a_count_within_the_body_is_400(declared: str) -> None:
    with pytest.raises(MalformedBody, match="Inference-Header-Content-Length"):
        split(b"{}TAIL", declared)


def form(*parts: tuple[str, bytes], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, data in parts:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="d.png"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"  # fmt: skip
    return out + f"--{boundary}--\r\n".encode()


def test_the_named_part_of_a_form_is_returned_whole() -> None:
    data = bytes(range(256)) * 40  # binary, with CR and LF inside
    body = form(("other", b"ignored"), ("file", data))
    assert multipart_file(body, "multipart/form-data; boundary=XyZ") == data


def test_a_form_without_boundary_or_without_the_part_or_broken_is_4xx() -> None:
    with pytest.raises(MalformedBody, match="no boundary"):
        multipart_file(form(("file", b"x")), "multipart/form-data")
    for body in (form(("picture", b"x")), b"--XyZ\r\nbroken"):  # another part; a part with no header at all
        with pytest.raises(InvalidInput, match='needs a "file" part'):
            multipart_file(body, "multipart/form-data; boundary=XyZ")
    for body in (b"garbage", form(("file", b"x"), boundary="Other")):  # no boundary where one must be
        with pytest.raises(MalformedBody, match="malformed multipart"):
            multipart_file(body, "multipart/form-data; boundary=XyZ")
