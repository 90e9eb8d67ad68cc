"""Keras -> ONNX with tf2onnx.

``tf2onnx.convert.from_keras`` fails with Keras 3 (``KeyError: 'keras_tensor_2'`` with TF 2.21 / Keras 3.15 /
tf2onnx 1.17), so the model is wrapped in a ``tf.function`` with an explicit input signature and converted
with ``from_function``. The function returns a dict, which names the ONNX output.
"""

from __future__ import annotations

from typing import Any

import onnx

from training.data import N_PIXELS

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"
DEFAULT_OPSET = 17


def keras_to_onnx(model: Any, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Convert a Keras model taking float32 (N, 784) to ONNX with input ``pixels`` and output
    ``probabilities``, both with a dynamic batch dimension named ``batch``."""
    import tensorflow as tf
    import tf2onnx

    def probabilities(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: model(pixels, training=False)}

    signature = [tf.TensorSpec([None, N_PIXELS], tf.float32, name=INPUT_NAME)]
    serve = tf.function(probabilities, input_signature=signature)
    proto: onnx.ModelProto
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    _name_batch_dimension(proto)
    # tf2onnx writes "converted from b'__inference_probabilities_<counter>'"; the counter depends on what
    # else the process traced, so replace it to keep the file byte-for-byte reproducible.
    proto.graph.doc_string = "Keras MNIST classifier converted with tf2onnx"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _name_batch_dimension(proto: onnx.ModelProto) -> None:
    """tf2onnx calls the dynamic dimension ``unk__N``; give input and output the same readable symbol."""
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def describe_io(proto: onnx.ModelProto) -> tuple[tuple[str, list[int | None]], tuple[str, list[int | None]]]:
    """((input name, shape), (output name, shape)) with None for dynamic dimensions."""

    def shape(value: onnx.ValueInfoProto) -> list[int | None]:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    (inp,), (out,) = proto.graph.input, proto.graph.output
    return (inp.name, shape(inp)), (out.name, shape(out))
