"""What machine this is, for reports made without torch (``edgead verify``, ``edgead bench``) and for the
benchmark records (``edgead.bench.machine`` adds torch's view): CPU model, NVIDIA GPU name and the device
memory a process holds. Reads ``/proc/cpuinfo`` and ``nvidia-smi``; on a Jetson, which has no ``nvidia-smi``,
the device tree, ``/etc/nv_tegra_release``, the GPU's devfreq node in sysfs (clocks) and ``/proc/meminfo``
(the GPU shares the system memory), the same sources ``tegrastats`` reads. Never imports torch.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
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


#: Where a Jetson's files are; tests point it at a copy (``root``).
ROOT = Path("/")
#: devfreq node names of Jetson GPUs (Orin: 17000000.ga10b / .gpu, Xavier: 17000000.gv11b, TX2/Nano: .gp10b).
_JETSON_GPU_NODES = ("gpu", "ga10b", "gv11b", "gp10b", "gm20b")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def is_jetson(root: Path | None = None) -> bool:
    """Whether this is an NVIDIA Jetson (L4T): ``/etc/nv_tegra_release`` or a device-tree model naming one."""
    root = ROOT if root is None else root
    model = _read(root / "proc/device-tree/model") or ""
    return (root / "etc/nv_tegra_release").is_file() or "jetson" in model.lower()


def jetson_record(root: Path | None = None) -> dict[str, Any] | None:
    """A Jetson's model, L4T release, GPU clock (current / max, MHz, from its devfreq node) and memory
    (total / available MB, shared by CPU and GPU); None when this is no Jetson."""
    root = ROOT if root is None else root
    if not is_jetson(root):
        return None
    release = (_read(root / "etc/nv_tegra_release") or "").splitlines()
    record: dict[str, Any] = {
        "model": _read(root / "proc/device-tree/model"),
        "l4t": release[0].lstrip("# ").strip() if release else None,
        "gpu_clock_mhz": None,
        "memory_mb": None,
    }
    devfreq = root / "sys/class/devfreq"
    nodes = sorted(devfreq.iterdir()) if devfreq.is_dir() else []
    for node in nodes:
        if node.name.split(".")[-1] in _JETSON_GPU_NODES:
            current, highest = _read(node / "cur_freq"), _read(node / "max_freq")
            if current and current.isdigit():
                record["gpu_clock_mhz"] = {
                    "current": int(current) / 1e6,
                    "max": int(highest) / 1e6 if highest and highest.isdigit() else None,
                    "node": node.name,
                }
                break
    memory = _meminfo(root)
    if memory:
        record["memory_mb"] = memory
    return record


def _meminfo(root: Path | None = None) -> dict[str, float] | None:
    root = ROOT if root is None else root
    fields = {}
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) / 1024  # kB -> MB
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return {"total": round(fields["MemTotal"], 1), "available": round(fields["MemAvailable"], 1)}


def gpu_memory_used_mb(pid: int | None = None) -> dict[str, Any]:
    """Device memory this process holds now, from ``nvidia-smi --query-compute-apps`` (TensorRT and ONNX
    Runtime keep their pools once allocated, so after a run this is its peak). Returns ``{"used_mb": float,
    "source": "nvidia-smi"}``, or ``{"used_mb": None, "reason": ...}`` where nothing reports it (no NVIDIA GPU,
    no nvidia-smi: Jetson reports memory through ``tegrastats`` instead).
    """
    pid = os.getpid() if pid is None else pid
    smi = shutil.which("nvidia-smi")
    if smi is None and is_jetson():
        memory = _meminfo()
        if memory is None:
            return {"used_mb": None, "reason": "a Jetson whose /proc/meminfo cannot be read"}
        return {
            "used_mb": round(memory["total"] - memory["available"], 1),
            "source": "/proc/meminfo (Jetson: CPU and GPU share this memory; all processes, as tegrastats' RAM)",
        }
    if smi is None:
        return {"used_mb": None, "reason": "nvidia-smi not found (no NVIDIA driver here)"}
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


def nvidia_gpus(runner: Callable[..., Any] = subprocess.run) -> list[dict[str, str]] | str:
    """NVIDIA GPUs from ``nvidia-smi`` (name, compute capability, driver), or the reason there are none
    (``runner``: tests pass a stand-in for ``subprocess.run``). ``compute_cap`` needs driver 510 or newer;
    TensorRT 10 itself needs a newer one, so a driver too old to answer is one no engine runs on."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi not found (no NVIDIA driver here)"
    query = [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    try:
        done = runner(query, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed: {err}"
    gpus = []
    for line in done.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 3:
            gpus.append({"name": fields[0], "compute_capability": fields[1], "driver": fields[2]})
    return gpus or "nvidia-smi lists no GPU"


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name from ``nvidia-smi`` (torch-free), a Jetson's model, or None."""
    if shutil.which("nvidia-smi") is None:
        jetson = jetson_record()
        return jetson["model"] if jetson else None
    gpus = nvidia_gpus()
    return gpus[0]["name"] if isinstance(gpus, list) else None


def module_version(module: str) -> tuple[str | None, str | None]:
    """``(version, error)`` of an importable module: ``(None, None)`` when it is not installed, an error text
    when its import fails (a broken install, e.g. PyPI's tensorrt stub, is reported, never raised)."""
    if importlib.util.find_spec(module) is None:
        return None, None
    try:
        imported = importlib.import_module(module)
    except Exception as err:
        return None, f"installed but its import fails: {str(err).splitlines()[0][:160] if str(err) else err!r}"
    version = getattr(imported, "__version__", None)
    if version is None:  # rich, tritonclient: the distribution that provides the module knows
        from importlib import metadata

        dists = metadata.packages_distributions().get(module.split(".")[0], [])
        version = metadata.version(dists[0]) if dists else "installed"
    return str(version), None


def device_record() -> dict[str, Any]:
    """Date, CPU and GPU of this machine for a report made without torch (``edgead verify``)."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "gpu": gpu_name(),
        **({"jetson": jetson} if (jetson := jetson_record()) else {}),
    }
