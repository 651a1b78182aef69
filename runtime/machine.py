"""What machine this is, for reports made without torch (``edgead verify``, ``edgead bench``) and for the
benchmark records (``edgead.bench.machine`` adds torch's view): CPU model, NVIDIA GPU name and the device
memory a process holds. Reads ``/proc/cpuinfo`` and ``nvidia-smi`` only; never imports torch.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_memory_used_mb(pid: int | None = None) -> dict[str, Any]:
    """Device memory this process holds now, from ``nvidia-smi --query-compute-apps`` (TensorRT and ONNX
    Runtime keep their pools once allocated, so after a run this is its peak). Returns ``{"used_mb": float,
    "source": "nvidia-smi"}``, or ``{"used_mb": None, "reason": ...}`` where nothing reports it (no NVIDIA GPU,
    no nvidia-smi: Jetson reports memory through ``tegrastats`` instead).
    """
    pid = os.getpid() if pid is None else pid
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"used_mb": None, "reason": "nvidia-smi not found (no NVIDIA driver here, or a Jetson: use tegrastats)"}
    query = [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return {"used_mb": None, "reason": f"nvidia-smi failed: {err}"}
    for line in done.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            try:
                return {"used_mb": float(fields[1]), "source": "nvidia-smi"}
            except ValueError:
                return {"used_mb": None, "reason": f"nvidia-smi reported {fields[1]!r} (not available on this GPU)"}
    return {"used_mb": None, "reason": "nvidia-smi lists no device memory for this process"}


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name from ``nvidia-smi`` (torch-free), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return names[0] if names else None


def device_record() -> dict[str, Any]:
    """Date, CPU and GPU of this machine for a report made without torch (``edgead verify``)."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "gpu": gpu_name(),
    }
