"""Pydantic models for the OpenAPI document and the (cold) JSON endpoints.

The hot paths decode with typed msgspec decoders and validate with NumPy (service/decode.py); these models
describe exactly what those paths accept, so /docs and schemathesis see the real contract.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Pixel = Annotated[float, Field(ge=0.0, le=1.0, description="Pixel intensity in [0, 1] (0 = background).")]
FlatImage = Annotated[list[Pixel], Field(min_length=784, max_length=784, description="784 pixels, row-major.")]
Row = Annotated[list[Pixel], Field(min_length=28, max_length=28)]
NestedImage = Annotated[list[Row], Field(min_length=28, max_length=28, description="28 rows of 28 pixels.")]
Image = FlatImage | NestedImage


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: Image = Field(description="One 28x28 grayscale digit, pixels scaled to [0, 1].")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    images: list[Image] = Field(min_length=1, description="Images, in order; at most MNIST_MAX_IMAGES_PER_REQUEST.")


class Prediction(BaseModel):
    label: int = Field(ge=0, description="Predicted class.")
    probabilities: list[float] = Field(description="Softmax output, one per class label.")
    model: str
    version: str
    request_id: str = Field(description="The caller's X-Request-ID (echoed) or one made up: correlation only.")
    prediction_id: str = Field(description="Issued by the server: what /v1/feedback refers to.")


class BatchPrediction(BaseModel):
    labels: list[int] = Field(description="Predicted class per image, in request order.")
    probabilities: list[list[float]] = Field(description="Softmax output per image, in request order.")
    count: int
    model: str
    version: str
    request_id: str
    prediction_id: str = Field(description="Issued by the server: what /v1/feedback refers to (with `index`).")


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: str = Field(min_length=1, max_length=64, description="`prediction_id` of the earlier reply.")
    label: int = Field(ge=0, le=9, description="The true label.")
    index: int = Field(0, ge=0, le=65535, description="Which image of a batch request (0 for single images).")


class FeedbackResult(BaseModel):
    prediction_id: str
    correct: bool


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_shape, queue_full.")
    message: str = Field(description="What was wrong, for humans.")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": "Error"} for code in codes}


def binary_body(description: str) -> dict[str, Any]:
    return {"schema": {"type": "string", "format": "binary"}, "description": description}
