"""Describe the machine a benchmark ran on, and save a benchmark's record into benchmarks/results/.

The torch-free part (CPU and GPU names, device memory) lives in ``edgead.runtime.machine``, which the runtime
owns; this module adds torch's view of the machine and the record-and-save tail every benchmark script shares.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgead.data.files import write_json_atomic
from edgead.runtime.machine import cpu_name, device_record, gpu_memory_used_mb, gpu_name

__all__ = ["cpu_name", "device_record", "gpu_memory_used_mb", "gpu_name", "machine_record", "portable", "save_record"]


def portable(text: str) -> str:
    """Replace the real-data root and the working directory in ``text`` by placeholders, so a record
    shows the command without this machine's paths."""
    data_root = os.environ.get("EDGEAD_DATA_ROOT")
    if data_root:
        text = text.replace(os.path.abspath(data_root), "$EDGEAD_DATA_ROOT").replace(data_root, "$EDGEAD_DATA_ROOT")
    return text.replace(os.getcwd() + os.sep, "")


def scrubbed(value: Any) -> Any:
    """``value`` (a record, at any depth) with :func:`portable` applied to every string and every path under
    the temporary folder (a benchmark's throwaway export) replaced by ``<a temporary path>``."""
    if isinstance(value, dict):
        return {key: scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrubbed(item) for item in value]
    if isinstance(value, str):
        temporary = re.escape(tempfile.gettempdir().rstrip(os.sep) + os.sep) + r"[^\s'\",;)]*"
        return re.sub(temporary, "<a temporary path>", portable(value))
    return value


def machine_record() -> dict[str, Any]:
    """CPU, core count, GPU (when torch sees one), versions, date and the command line."""
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": portable(" ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        record["torch"] = torch.__version__
        record["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        record["torch_threads"] = torch.get_num_threads()
    except ImportError:
        record["gpu"] = None
    return record


def save_record(record: dict[str, Any], results_dir: Path, name: str, out: Path | None = None) -> Path:
    """The common tail of every benchmark script: add the machine (when the record has none yet), write the
    record atomically to ``out`` or ``results_dir / name``, print where it went and return that path.

    ``name`` may contain ``{device}``, replaced by ``gpu`` when torch saw a GPU for this record, else ``cpu``
    (``latency_{device}_gaussian.json``), so CPU and GPU figures never overwrite each other.
    """
    record.setdefault("machine", machine_record())
    record = scrubbed(record)
    device = "gpu" if record["machine"].get("gpu") else "cpu"
    path = Path(out) if out is not None else Path(results_dir) / name.format(device=device)
    write_json_atomic(path, record)
    print(f"saved {path}")
    return path
