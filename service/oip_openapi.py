"""The Open Inference Protocol's request schema for /docs (the route itself is served as pure ASGI)."""

from __future__ import annotations

from typing import Any

from service.decode import JSON
from service.tensors import DTYPES, LABEL_OUTPUT

_NUMBERS = {"type": "array", "items": {"type": "number", "minimum": 0}}
_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string", "description": "The model's input name (see the metadata)."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 3,
                  "description": "[N, 784] or [N, 28, 28]."},
        "datatype": {"type": "string", "enum": list(DTYPES)},
        "data": {
            "type": "array",
            "items": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "array", "items": {"anyOf": [
                {"type": "number", "minimum": 0}, _NUMBERS]}}]},
            "description": "Row-major values, flat or nested: FP32 in [0, 1], UINT8 0-255.",
        },
        "parameters": {"type": ["object", "null"]},
    },
}  # fmt: skip
INFER_BODY = {
    "required": True,
    "description": "JSON (shown), or the binary tensor data extension (see the description).",
    "content": {
        JSON: {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string", "description": "Echoed in the response."},
                    "parameters": {
                        "type": ["object", "null"],
                        "properties": {
                            "binary_data_output": {"type": "boolean"},
                            "timeout": {"type": "integer", "minimum": 1, "description": "Deadline in microseconds."},
                        },
                    },
                    "inputs": {"type": "array", "items": _TENSOR_SCHEMA, "minItems": 1, "maxItems": 1},
                    "outputs": {
                        "type": ["array", "null"],
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "enum": ["probabilities", LABEL_OUTPUT]},
                                "parameters": {
                                    "type": ["object", "null"],
                                    "properties": {
                                        "binary_data": {"type": "boolean"},
                                        "classification": {"type": "integer", "minimum": 0, "maximum": 10},
                                    },
                                },
                            },
                        },
                    },
                },
            },
            "example": {
                "id": "example-1",
                "inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}],
                "outputs": [{"name": "probabilities"}, {"name": LABEL_OUTPUT}],
            },
        },
    },
}
ERROR_SCHEMA: dict[str, Any] = {
    "description": 'Error: {"error": "message"}',
    "content": {JSON: {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}},
}


INFER_DOC = (
    "FP32 pixels in [0, 1] or UINT8 0-255, shape [N, 784] or [N, 28, 28], as JSON `data` or with the binary "
    "tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes, then each input's raw "
    "little-endian bytes, sized by its `parameters.binary_data_size`). Outputs: `probabilities` FP32 [N, 10] "
    "(default) and `label` INT64 [N] on request; `binary_data: true` per output (or `binary_data_output` for "
    "all) returns raw bytes after the JSON header. `Content-Encoding: gzip|deflate` bodies are accepted."
)
INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    code: ERROR_SCHEMA for code in (400, 404, 413, 415, 422, 500, 503, 504)
}
