"""Handing memory that a fit's finished steps freed back to the operating system."""

from __future__ import annotations

import ctypes
import sys


def release_freed_memory() -> bool:
    """glibc's ``malloc_trim(0)``, between the large steps of a fit (feature passes, pseudo-validation sets).

    glibc serves allocations below its mmap threshold (which grows with the blocks freed, up to 32 MiB) from
    its heap. A feature pass allocates and frees thousands of such blocks (a batch's stage features), and the
    free space they leave among live blocks stays in the process's resident memory; the next step's larger
    arrays do not fit those holes and come on top. On the 10,731-tile bsdata fit that was several GB
    (``benchmarks/results/README.md``, "Memory of a tiled fit"). Returns whether it ran: Linux with glibc;
    elsewhere (Windows, macOS, musl) it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
