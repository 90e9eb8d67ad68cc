"""The Open Inference Protocol's REST ``/v2`` request and response bodies.

A request is JSON, or a JSON header followed by raw tensor bytes (the binary tensor data extension, split off by
service/envelope.py). The JSON is read by one typed, bounded decoder (every container limited while it is read,
``data`` numbers in regular nesting), then checked by name: one input (to pixels by service/tensors.py), the
outputs wanted, the request id and its ``timeout`` parameter. A response carries the outputs as JSON or binary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson

from service.envelope import split
from service.errors import InvalidInput, MalformedBody, PayloadTooLarge
from service.model import Model
from service.tensors import Output, add_output, data_type, input_images, output_tensors, raw_bytes

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


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
class InferRequest:
    images: np.ndarray  # (N, features): uint8 0-255 or float32 in [0, 1]
    outputs: list[Output]
    request_id: str | None
    timeout_s: float | None  # the request's "timeout" parameter (microseconds on the wire), as a deadline


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
    data = data_type(features, rows, cols, max_values)
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
        p = _dict(spec.get("parameters"), f"output {name!r} parameters")
        add_output(outputs, name, p.get("classification", 0), _flag(p, "binary_data", default_binary), model)
    return outputs


def encode_outputs(
    outputs: list[Output], request_id: str | None, model: Model, probs: np.ndarray, labels: np.ndarray
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    entries: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for out, datatype, shape, data in output_tensors(outputs, model, probs, labels):
        entry: dict[str, object] = {"name": out.name, "datatype": datatype, "shape": shape}
        if out.binary:
            raw = raw_bytes(data)
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
