"""The classifier: 784 -> Dense(512, relu) -> Dropout(0.2) -> Dense(10, softmax), Adam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
import tensorflow as tf

from training.data import N_CLASSES, N_PIXELS

LrSchedule = Literal["cosine", "constant"]
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"


@dataclass(frozen=True)
class ModelConfig:
    hidden_units: int = 512
    dropout_rate: float = 0.2
    learning_rate: float = 1e-3
    lr_schedule: LrSchedule = "cosine"
    # Final learning rate of the cosine schedule, as a fraction of the initial one.
    cosine_alpha: float = 0.01


def seed_everything(seed: int, deterministic_ops: bool = True) -> None:
    """Python, NumPy and TensorFlow seeds; deterministic TF kernels (cheap for a dense model on CPU)."""
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()


def build_model(config: ModelConfig, total_steps: int) -> keras.Model:
    """The compiled model. ``total_steps`` (epochs x batches per epoch) sizes the cosine schedule."""
    model = keras.Sequential(
        [
            keras.Input(shape=(N_PIXELS,), name=INPUT_NAME),
            keras.layers.Dense(config.hidden_units, activation="relu", name="hidden"),
            keras.layers.Dropout(config.dropout_rate, name="dropout"),
            keras.layers.Dense(N_CLASSES, activation="softmax", name=OUTPUT_NAME),
        ],
        name="mnist_mlp",
    )
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(total_steps, 1), alpha=config.cosine_alpha
        )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
