"""The Open Inference Protocol's tensor codec, shared by its transports (REST ``/v2`` and gRPC).

Requests: ``Content-Encoding`` undone within the body limit, the binary tensor data extension split off (a JSON
header of ``Inference-Header-Content-Length`` bytes, then raw little-endian tensor bytes), the one input checked
against the model (name, datatype FP32 or UINT8, shape [N, F] or [N, H, W], count, range) and returned as pixels
((N, F) uint8 or float32 in [0, 1]); JSON ``data`` goes through a typed conversion that refuses booleans,
strings and empty rows. Responses: ``probabilities`` FP32 and ``label`` INT64, as JSON or binary, with Triton's
classification extension.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson

from service.decode import check_count, check_range
from service.errors import InvalidInput, MalformedBody, PayloadTooLarge, UnsupportedMediaType
from service.model import Model

PLATFORM = "onnxruntime_onnx"
LABEL_OUTPUT = "label"
DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


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


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object", code="invalid_type")
    return value


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f'parameter "{key}" must be true or false', code="invalid_type")
    return value


@dataclass(slots=True)
class Output:
    name: str
    binary: bool
    classification: int = 0


@dataclass(slots=True)
class InferRequest:
    images: np.ndarray  # (N, features): uint8 0-255 or float32 in [0, 1]
    outputs: list[Output]
    request_id: str | None
    timeout_s: float | None  # the request's "timeout" parameter (microseconds on the wire), as a deadline


@functools.cache
def _data_type(features: int, rows: int, cols: int, max_values: int) -> Any:
    """JSON ``data``: flat numbers, or rows, or images of rows; no booleans, strings or empty lists."""
    row = Annotated[list[float], msgspec.Meta(min_length=1, max_length=max(features, cols))]
    image = Annotated[list[float | row], msgspec.Meta(min_length=1, max_length=max(features, rows))]
    return Annotated[list[float | image], msgspec.Meta(max_length=max_values)]  # empty: "the batch is empty"


def _json_data(data: Any, model: Model, max_images: int, what: str) -> np.ndarray:
    rows, cols = model.image_shape
    try:
        values = msgspec.convert(data, _data_type(model.n_features, rows, cols, max_images * model.n_features))
        with np.errstate(over="ignore"):  # beyond float32: inf, which the range check names
            arr = np.array(values, dtype=np.float32)
    except msgspec.ValidationError as exc:
        raise InvalidInput(
            f"{what} must contain only numbers in regular nested lists: {exc}", code="invalid_type"
        ) from None
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{what} is not a regular array of numbers", code="invalid_shape") from None
    return arr


def input_images(name: Any, datatype: Any, shape: Any, data: bytes | Any, model: Model, max_images: int) -> np.ndarray:
    """One input tensor -> pixels (N, features): uint8 0-255 (UINT8) or float32 in [0, 1] (FP32).

    ``data`` is the tensor's raw little-endian bytes (binary extension, gRPC ``raw_input_contents``) or its
    JSON/typed values. Raises InvalidInput/MalformedBody/PayloadTooLarge naming what was wrong.
    """
    if name != model.input_name:
        raise InvalidInput(f"unexpected input {name!r}; model {model.name!r} has one input, {model.input_name!r}",
                           code="unknown_input")  # fmt: skip
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"input {name!r}: datatype {datatype!r} is not supported; use FP32 ([0, 1]) or UINT8",
                           code="invalid_type")  # fmt: skip
    h, w = model.image_shape
    if (
        not isinstance(shape, list | tuple)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or len(shape) not in (2, 3)
        or tuple(shape[1:]) not in ((model.n_features,), (h, w))
    ):
        raise InvalidInput(f"input {name!r}: shape {list(shape) if isinstance(shape, tuple) else shape!r}; "
                           f"expected [N, {model.n_features}] or [N, {h}, {w}]", code="invalid_shape")  # fmt: skip
    n = shape[0]
    if n < 0:
        raise InvalidInput(f"input {name!r}: the batch dimension must not be negative", code="invalid_shape")
    check_count(n, max_images)
    count = n * model.n_features
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) != count * dtype.itemsize:
            raise InvalidInput(f"input {name!r}: the data size ({len(data)} bytes) does not match shape {list(shape)} "
                               f"of {datatype} ({count * dtype.itemsize} bytes)", code="invalid_shape")  # fmt: skip
        arr = np.frombuffer(data, dtype=dtype).reshape(n, model.n_features)
    else:
        values = _json_data(data, model, max_images, f"input {name!r} data")
        if values.size != count:
            raise InvalidInput(f"input {name!r}: data has {values.size} values; shape {list(shape)} needs {count}",
                               code="invalid_shape")  # fmt: skip
        values = values.reshape(n, model.n_features)
        if dtype == np.uint8:
            if values.size and (values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.floor(values))):
                raise InvalidInput(f"input {name!r}: UINT8 data must be integers in 0-255", code="out_of_range")
            return values.astype(np.uint8)
        arr = values
    if dtype == np.uint8:
        return arr
    return check_range(arr.astype(np.float32, copy=False), f"input {name!r}")


def _input(spec: Any, model: Model, tail: bytes, max_images: int) -> tuple[np.ndarray, int]:
    """One request input (REST JSON form) -> (pixels, binary bytes it used)."""
    spec = _dict(spec, "each input")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    params = _dict(spec.get("parameters"), f"input {name!r} parameters")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise InvalidInput(f'input {name!r} has no "data" and no binary_data_size', code="missing_field")
        return input_images(name, datatype, shape, spec["data"], model, max_images), 0
    if "data" in spec:
        raise InvalidInput(f"input {name!r} has both JSON data and binary_data_size", code="invalid_input")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size {size!r} must be a byte count", code="invalid_shape")
    if size > len(tail):
        raise MalformedBody(f"input {name!r}: {size} binary bytes declared, {len(tail)} sent")
    return input_images(name, datatype, shape, tail[:size], model, max_images), size


_Scalar = str | int | float | bool | None
_Dict = Annotated[dict[str, _Scalar], msgspec.Meta(max_length=64)]
_Loose = _Scalar | Annotated[list[_Scalar], msgspec.Meta(max_length=64)] | _Dict


@functools.cache
def _envelope(features: int, rows: int, cols: int, max_values: int) -> msgspec.json.Decoder[Any]:
    """A typed decoder of the whole request: every container is bounded while it is read, ``data`` is numbers in
    regular nesting, everything else a scalar or a small flat container (checked by name below)."""
    data = _data_type(features, rows, cols, max_values)
    tensor = msgspec.defstruct("Tensor", [("name", _Loose, None), ("datatype", _Loose, None), ("shape", _Loose, None),
                                          ("data", data | msgspec.UnsetType, msgspec.UNSET),
                                          ("parameters", _Loose, None)])  # fmt: skip
    output = msgspec.defstruct("OutputSpec", [("name", _Loose, None), ("parameters", _Loose, None)])
    items = Annotated[list[tensor | _Scalar], msgspec.Meta(max_length=16)]  # type: ignore[valid-type]
    outs = Annotated[list[output | _Scalar], msgspec.Meta(max_length=16)]  # type: ignore[valid-type]
    doc = msgspec.defstruct("InferDoc", [("inputs", items | _Scalar | _Dict, None), ("outputs", outs | _Scalar | _Dict, None),
                                         ("parameters", _Loose, None), ("id", _Loose, None)])  # fmt: skip
    return msgspec.json.Decoder(doc)


def _plain(value: Any) -> Any:
    """A decoded struct as the dict the checks below read (no copy of ``data``)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, msgspec.Struct):
        return {f: getattr(value, f) for f in value.__struct_fields__ if getattr(value, f) is not msgspec.UNSET}
    return value


def _decode_doc(head: bytes, model: Model, max_images: int) -> dict[str, Any]:
    rows, cols = model.image_shape
    decoder = _envelope(model.n_features, rows, cols, 2 * max_images * model.n_features)
    try:
        doc = decoder.decode(head)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if " - at " not in text:
            raise InvalidInput("the inference request must be a JSON object", code="invalid_type") from None
        if ".data" in text:
            raise InvalidInput(f"input data must contain only numbers in regular nested lists: {text}",
                               code="invalid_type") from None  # fmt: skip
        raise InvalidInput(f"invalid inference request: {text}", code="invalid_type") from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"malformed JSON: {exc}", code="malformed_json") from None
    except RecursionError:
        raise MalformedBody("malformed JSON: nested too deeply", code="malformed_json") from None
    return {"inputs": _plain(doc.inputs), "outputs": _plain(doc.outputs), "parameters": doc.parameters, "id": doc.id}


def parse_infer(body: bytes, declared: str | None, model: Model, max_images: int,
                max_json_bytes: int | None = None) -> InferRequest:  # fmt: skip
    """A REST inference request (JSON, or JSON header + binary tail) -> pixels, outputs wanted, id, timeout."""
    head, tail = split(body, declared)
    if not head:
        raise MalformedBody("the request body is empty; send JSON")
    if max_json_bytes is not None and len(head) > max_json_bytes:
        raise PayloadTooLarge(f"the JSON part is {len(head)} bytes; JSON is limited to {max_json_bytes} (send the "
                              "tensor with the binary tensor data extension)")  # fmt: skip
    doc = _decode_doc(head, model, max_images)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InvalidInput(f'"inputs" must be a list holding one input, {model.input_name!r}', code="missing_field")
    images, used = _input(inputs[0], model, tail, max_images)
    if used != len(tail):
        raise MalformedBody(f"{len(tail) - used} bytes of binary data are not claimed by any input")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput('"id" must be a string', code="invalid_type")
    timeout = _dict(doc.get("parameters"), '"parameters"').get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise InvalidInput('parameter "timeout" must be a positive number of microseconds', code="invalid_input")
    return InferRequest(images, requested_outputs(doc, model), rid, None if timeout is None else timeout / 1e6)


def requested_outputs(doc: dict[str, Any], model: Model) -> list[Output]:
    params = _dict(doc.get("parameters"), '"parameters"')
    default_binary = _flag(params, "binary_data_output", False)
    specs = doc.get("outputs")
    if specs is None:
        return [Output(model.output_name, default_binary)]
    if not isinstance(specs, list) or not specs:
        raise InvalidInput('"outputs" must be a non-empty list of {"name": ...}', code="invalid_type")
    outputs: list[Output] = []
    for raw in specs:
        spec = _dict(raw, "each output")
        name = spec.get("name")
        if name not in (model.output_name, LABEL_OUTPUT):
            raise InvalidInput(f"unknown output {name!r}; outputs are {model.output_name!r} and {LABEL_OUTPUT!r}",
                               code="unknown_output")  # fmt: skip
        if any(o.name == name for o in outputs):
            raise InvalidInput(f"output {name!r} is requested twice", code="invalid_input")
        p = _dict(spec.get("parameters"), f"output {name!r} parameters")
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= model.n_classes:
            raise InvalidInput(f"output {name!r}: classification must be 0-{model.n_classes}", code="invalid_input")
        if k and name == LABEL_OUTPUT:
            raise InvalidInput(f"classification applies to {model.output_name!r}, not {LABEL_OUTPUT!r}")
        outputs.append(Output(str(name), _flag(p, "binary_data", default_binary), k))
    return outputs


def classification(probs: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification extension: the top ``k`` classes per row as ``"score:index:label"``."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [f"{probs[i, j]:f}:{j}:{labels[j]}".encode() for i in range(probs.shape[0]) for j in top[i]]


def encode_outputs(
    outputs: list[Output], request_id: str | None, model: Model, probs: np.ndarray, labels: np.ndarray
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    n = probs.shape[0]
    entries: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for out in outputs:
        data: np.ndarray | list[bytes]
        if out.classification:
            data = classification(probs, out.classification, model.class_labels)
            datatype, shape = "BYTES", [n, out.classification]
        elif out.name == LABEL_OUTPUT:
            data, datatype, shape = labels.astype("<i8"), "INT64", [n]
        else:
            data, datatype, shape = probs.astype("<f4", copy=False), "FP32", [n, model.n_classes]
        entry: dict[str, object] = {"name": out.name, "datatype": datatype, "shape": shape}
        if out.binary:
            raw = (
                b"".join(struct.pack("<I", len(s)) + s for s in data)
                if isinstance(data, list)
                else np.ascontiguousarray(data).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = [s.decode() for s in data] if isinstance(data, list) else data.ravel()
        entries.append(entry)
    doc: dict[str, object] = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    head = orjson.dumps(doc, option=_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
