"""Fixed-size batches for backends whose batch dimension is fixed at export (torch-free: numpy only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["padded_batches"]

T = TypeVar("T")


def padded_batches(
    items: Sequence[T],
    batch_size: int,
    row_shape: Sequence[int],
    dtype: DTypeLike = np.float32,
    write: Callable[[T, np.ndarray], Any] | None = None,
) -> Iterator[tuple[np.ndarray, int]]:
    """Splits ``items`` into consecutive batches of exactly ``batch_size`` rows, the last one padded by
    repeating its last real row (a padding row gives the same output as that row, so it is harmless).

    Args:
        items: What goes into the rows: arrays of ``row_shape``, or anything ``write`` turns into a row.
        batch_size: Rows per batch (the backend's fixed batch dimension), >= 1.
        row_shape: Shape of one row, e.g. (C, S, S).
        dtype: The batch's dtype.
        write: ``write(item, row)`` fills ``row`` (a view into the batch) from ``item``, e.g. preprocessing
            a frame in place; None copies ``item`` into it.

    Yields:
        ``(batch, count)``: a new C-contiguous ``(batch_size, *row_shape)`` array whose first ``count`` rows
        are the next ``count`` items; keep the first ``count`` outputs of the backend.

    Example:
        >>> for batch, count in padded_batches(images, backend.input_shape[0], images.shape[1:]):
        ...     maps.append(backend.infer(batch)["anomaly_map"][:count])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = np.empty((batch_size, *row_shape), dtype=dtype)
        for row, item in zip(batch, chunk, strict=False):
            if write is None:
                row[...] = item
            else:
                write(item, row)
        count = len(chunk)
        batch[count:] = batch[count - 1]
        yield batch, count
