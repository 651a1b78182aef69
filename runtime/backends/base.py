"""The small interface every inference backend implements."""

from __future__ import annotations

import abc

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")


class BackendError(RuntimeError):
    """A backend could not load or run a model; the message says which file and why."""


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
