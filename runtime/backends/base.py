"""The small interface every inference backend implements."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from pathlib import Path

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")


class BackendError(RuntimeError):
    """A backend could not load or run a model; the message says which file and why."""


def model_file(path: str | Path) -> Path:
    """``path`` as a Path, once it names a file (the ONNX backends read the exported graph themselves)."""
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"{path}: ONNX model not found")
    return path


def check_io(path: Path, inputs: Iterable[str], outputs: Iterable[str]) -> None:
    """A loaded graph has edgead's input and outputs (``INPUT_NAME``, ``OUTPUT_NAMES``), else which it has."""
    inputs, outputs = list(inputs), set(outputs)
    if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= outputs:
        raise BackendError(
            f"{path}: expected input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}, "
            f"found {inputs} -> {sorted(outputs)}; was it exported by edgead?"
        )


def check_batch(batch: np.ndarray, shape: tuple[int, ...]) -> None:
    """A batch has the graph's fixed input shape."""
    if tuple(batch.shape) != shape:
        raise BackendError(f"input shape {tuple(batch.shape)} != the exported shape {shape}")


class Backend(abc.ABC):
    """Runs an exported graph ``image (B, C, S, S) float32 -> anomaly_map (B, H, W), score (B,)``."""

    name: str = "backend"

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """The fixed input shape the engine was built for."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; returns host float32 arrays keyed by ``OUTPUT_NAMES``."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends free nothing explicitly
        """Release device memory and handles."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
