"""release_freed_memory: glibc's malloc_trim on Linux, nothing elsewhere."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgead.train import memory


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_system() -> None:
    # Freeing a mapped 8 MiB block raises glibc's mmap threshold to 8 MiB (as a fit's first batches do); then
    # many smaller blocks come from the heap, and freeing every other one leaves holes it keeps without a trim.
    del_me = np.ones(2**20, dtype=np.float64)
    del del_me
    blocks = [np.ones(64 * 1024, dtype=np.float64) for _ in range(4000)]  # 512 KiB each, 2 GB in all
    del blocks[::2]
    before = resident_bytes()
    assert memory.release_freed_memory()
    assert resident_bytes() < before - 512 * 2**20, "about 1 GB of holes should have gone back"
    del blocks


def test_elsewhere_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.sys, "platform", "win32")
    assert memory.release_freed_memory() is False
