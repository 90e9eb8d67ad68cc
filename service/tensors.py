"""The Open Inference Protocol's tensors, shared by its transports (REST ``/v2``: service/oip_body.py; gRPC).

In: the one input checked against the model (name, datatype FP32 or UINT8, shape [N, F] or [N, H, W], count,
range) and returned as pixels ((N, F) uint8 or float32 in [0, 1]); raw little-endian bytes, or values that go
through a typed conversion refusing booleans, strings and empty rows. Out: the requested outputs, checked
against the model, as tensors: ``probabilities`` FP32, ``label`` INT64, or Triton's classification strings.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np

from service.decode import check_count, check_range
from service.errors import InvalidInput
from service.model import Model

PLATFORM = "onnxruntime_onnx"
LABEL_OUTPUT = "label"
DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}


@dataclass(slots=True)
class Output:
    name: str
    binary: bool
    classification: int = 0


@functools.cache
def data_type(features: int, rows: int, cols: int, max_values: int) -> Any:
    """JSON ``data``: flat numbers, or rows, or images of rows; no booleans, strings or empty lists."""
    row = Annotated[list[float], msgspec.Meta(min_length=1, max_length=max(features, cols))]
    image = Annotated[list[float | row], msgspec.Meta(min_length=1, max_length=max(features, rows))]
    return Annotated[list[float | image], msgspec.Meta(max_length=max_values)]  # empty: "the batch is empty"


def _json_data(data: Any, model: Model, max_images: int, what: str) -> np.ndarray:
    rows, cols = model.image_shape
    try:
        values = msgspec.convert(data, data_type(model.n_features, rows, cols, max_images * model.n_features))
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


def add_output(outputs: list[Output], name: Any, k: Any, binary: bool, model: Model) -> None:
    """Append the output ``name`` (``k``: Triton's classification, 0 = off) after checking it against the model."""
    if name not in (model.output_name, LABEL_OUTPUT):
        raise InvalidInput(f"unknown output {name!r}; outputs are {model.output_name!r} and {LABEL_OUTPUT!r}",
                           code="unknown_output")  # fmt: skip
    if any(o.name == name for o in outputs):
        raise InvalidInput(f"output {name!r} is requested twice", code="invalid_input")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= model.n_classes:
        raise InvalidInput(f"output {name!r}: classification must be 0-{model.n_classes}", code="invalid_input")
    if k and name == LABEL_OUTPUT:
        raise InvalidInput(f"classification applies to {model.output_name!r}, not {LABEL_OUTPUT!r}")
    outputs.append(Output(str(name), binary, k))


def classification(probs: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification extension: the top ``k`` classes per row as ``"score:index:label"``."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [f"{probs[i, j]:f}:{j}:{labels[j]}".encode() for i in range(probs.shape[0]) for j in top[i]]


TensorOut = tuple[Output, str, list[int], np.ndarray | list[bytes]]  # (output, datatype, shape, data)


def output_tensors(outputs: list[Output], model: Model, probs: np.ndarray, labels: np.ndarray) -> list[TensorOut]:
    """(output, datatype, shape, data) of each requested output: ``probabilities`` FP32, ``label`` INT64, or
    Triton's classification strings (BYTES)."""
    n = probs.shape[0]
    tensors: list[TensorOut] = []
    for out in outputs:
        if out.classification:
            k = out.classification
            tensors.append((out, "BYTES", [n, k], classification(probs, k, model.class_labels)))
        elif out.name == LABEL_OUTPUT:
            tensors.append((out, "INT64", [n], labels.astype("<i8")))
        else:
            tensors.append((out, "FP32", [n, model.n_classes], probs.astype("<f4", copy=False)))
    return tensors


def raw_bytes(data: np.ndarray | list[bytes]) -> bytes:
    """A tensor's raw little-endian contents; a BYTES element is its 4-byte length, then its bytes."""
    if isinstance(data, list):
        return b"".join(struct.pack("<I", len(s)) + s for s in data)
    return np.ascontiguousarray(data).tobytes()
