"""``edgead doctor``: what this machine has for a deployment, and what to fix, one line per check.

Like ``yolo checks``, but for what a line PC, a Jetson or a GPU server needs to run an edgead export: Python and
package versions, the OpenCV build (window backend, FFmpeg, GStreamer), ONNX Runtime's providers, TensorRT or
TensorRT-RTX, NVIDIA GPUs and their compute capability against what the installed TensorRT builds for (or a
Jetson's model and clocks), OpenVINO's devices, optionally a camera or URL (``--camera``: opens, reads a
frame, says its resolution and FPS), write permission where runs and exports go, and optionally an export
(``--export``: loads and verifies on this machine).

Each check is ``ok``, ``warn`` (works, with a limit worth knowing), ``fail`` (something a deployment needs is
missing or broken: the line says how to fix it) or ``skip`` (not asked, or not applicable here). The command
exits 0 when no check failed. Torch-free, like the rest of the runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgead.runtime.machine import module_version, nvidia_gpus

STATUSES = ("ok", "warn", "fail", "skip")
#: What the runtime needs (import name, pip name); ``fail`` when missing.
REQUIRED = (("numpy", "numpy"), ("cv2", "opencv-python-headless"), ("typer", "typer"), ("rich", "rich"))
#: What some deployments use; reported, never a failure.
OPTIONAL = (
    ("onnxruntime", "onnxruntime"),
    ("onnx", "onnx"),
    ("openvino", "edgead[openvino]"),
    ("tensorrt", "TensorRT 10/11 from NVIDIA (JetPack on a Jetson)"),
    ("tensorrt_rtx", "edgead[rtx]"),
    ("pycuda", "pycuda"),
    ("polygraphy", "polygraphy"),
    ("tritonclient", "edgead[triton]"),
    ("torch", "edgead[train]"),
)
#: Oldest compute capability each TensorRT line builds engines for (TensorRT 10 support matrix: Turing and
#: newer, plus Volta; TensorRT for RTX: Turing, when named, to Blackwell).
MIN_COMPUTE_CAPABILITY = {"tensorrt": 7.0, "tensorrt_rtx": 7.5}
MIN_PYTHON = (3, 10)


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"[{self.status:>4}] {self.name}: {self.detail}" + (f"  -> {self.fix}" if self.fix else "")


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", "fail", f"{version}", f"edgead needs Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    return Check("python", "ok", f"{version} on {platform.system()} {platform.machine()}")


def check_packages() -> list[Check]:
    checks = []
    for module, pip_name in REQUIRED:
        version, error = module_version(module)
        if version is None:
            checks.append(Check(module, "fail", error or "not installed", f"pip install {pip_name}"))
        else:
            checks.append(Check(module, "ok", version))
    for module, source in OPTIONAL:
        version, error = module_version(module)
        if error:
            checks.append(Check(module, "warn", error, f"reinstall it ({source}) or uninstall it"))
        elif version is None:
            checks.append(Check(module, "skip", f"not installed (optional: {source})"))
        else:
            checks.append(Check(module, "ok", version))
    return checks


def opencv_build(info: str) -> dict[str, str]:
    """The GUI, FFmpeg and GStreamer lines of ``cv2.getBuildInformation()``."""
    from edgead.runtime.overlay import gui_backend

    found = {"gui": gui_backend(info) or "NONE"}
    for key, label in (("ffmpeg", "FFMPEG"), ("gstreamer", "GStreamer")):
        match = re.search(rf"^\s*{label}:\s*(\S+)", info, flags=re.MULTILINE)
        found[key] = match.group(1) if match else "unknown"
    return found


def check_opencv(info: str | None = None) -> list[Check]:
    try:
        import cv2
    except ImportError:
        return [Check("opencv build", "skip", "OpenCV is not installed (see the cv2 line)")]
    from edgead.runtime.overlay import gui_install_command

    build = opencv_build(cv2.getBuildInformation() if info is None else info)
    checks = [
        Check(
            "opencv ffmpeg",
            "ok" if build["ffmpeg"] == "YES" else "warn",
            f"FFmpeg {build['ffmpeg']}",
            "" if build["ffmpeg"] == "YES" else "video files and RTSP/HTTP streams need an OpenCV with FFmpeg",
        )
    ]
    gst_ok = build["gstreamer"] == "YES"
    checks.append(Check("opencv gstreamer", "ok" if gst_ok else "warn", f"GStreamer {build['gstreamer']}",
                        "" if gst_ok else "CSI cameras and GStreamer pipelines need an OpenCV built with GStreamer "
                        "(JetPack's own OpenCV on a Jetson: see README, Jetson)"))  # fmt: skip
    gui = build["gui"] != "NONE"
    checks.append(Check("opencv window", "ok" if gui else "warn", f"GUI backend {build['gui']}",
                        "" if gui else f"headless build: run works, --show needs {gui_install_command()}"))  # fmt: skip
    return checks


def check_onnxruntime() -> Check:
    if importlib.util.find_spec("onnxruntime") is None:
        return Check("onnxruntime providers", "skip", "ONNX Runtime not installed (TensorRT engines run without it)")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    return Check("onnxruntime providers", "ok", ", ".join(providers))


def check_gpus(gpus: list[dict[str, str]] | str | None = None) -> list[Check]:
    from edgead.runtime.machine import jetson_record

    jetson = jetson_record()
    if jetson is not None:
        clock = jetson["gpu_clock_mhz"] or {}
        return [Check("jetson", "ok", f"{jetson['model']} ({jetson['l4t']}), GPU clock {clock.get('current')} of "
                                      f"{clock.get('max')} MHz, memory {jetson['memory_mb']} MB")]  # fmt: skip
    gpus = nvidia_gpus() if gpus is None else gpus
    if isinstance(gpus, str):
        return [Check("cuda devices", "skip", gpus + ": CPU backends only (ONNX Runtime, OpenVINO)")]
    installed = {name for name in MIN_COMPUTE_CAPABILITY if importlib.util.find_spec(name) is not None}
    checks = []
    for index, gpu in enumerate(gpus):
        try:
            capability = float(gpu["compute_capability"])
        except ValueError:
            capability = 0.0
        detail = f"{gpu['name']}, compute capability {gpu['compute_capability']}, driver {gpu['driver']}"
        builds = sorted(name for name in installed if capability >= MIN_COMPUTE_CAPABILITY[name])
        if not installed:
            fix = "install TensorRT (pip install edgead[trt]) or TensorRT for RTX (edgead[rtx])"
            checks.append(Check(f"gpu {index}", "warn", detail + "; no TensorRT installed", fix))
        elif not builds:
            needed = ", ".join(f"{name} >= {MIN_COMPUTE_CAPABILITY[name]}" for name in sorted(installed))
            checks.append(Check(f"gpu {index}", "fail", detail + f"; the installed TensorRT does not build for it "
                                f"({needed})", "use ONNX Runtime (CUDA) or an older TensorRT"))  # fmt: skip
        else:
            checks.append(Check(f"gpu {index}", "ok", detail + f"; engines build with {', '.join(builds)}"))
    return checks


def check_openvino() -> Check:
    if importlib.util.find_spec("openvino") is None:
        return Check("openvino devices", "skip", 'OpenVINO not installed (pip install "edgead[openvino]")')
    from edgead.runtime.backends.openvino import available_devices

    found = available_devices()
    if not found:
        return Check("openvino devices", "warn", "OpenVINO finds no device", "check OpenVINO's installation")
    return Check("openvino devices", "ok", "; ".join(f"{d['device']}: {d['name']}" for d in found))


def check_camera(spec: str, timeout_s: float = 10.0) -> Check:
    """Opens SOURCE as ``edgead run`` would, reads one frame within ``timeout_s``; its size and FPS."""
    from edgead.runtime.sources import SourceError, VideoCaptureSource, create_source

    name = f"camera {spec}"
    try:
        source = create_source(spec, stall_timeout_s=timeout_s)
        source.open()
    except SourceError as err:
        return Check(name, "fail", str(err), "check the index, path, URL or pipeline (edgead run --help)")
    try:
        start, frame = time.monotonic(), None
        while frame is None and time.monotonic() - start < timeout_s:
            frame = source.read()
            if frame is None and not source.live:
                break
        if frame is None:
            return Check(name, "fail", f"opened, but no frame within {timeout_s:g} s",
                         "check that the camera streams (another program may hold it)")  # fmt: skip
        height, width = frame.image.shape[:2]
        fps = ""
        capture = getattr(source, "_capture", None) if isinstance(source, VideoCaptureSource) else None
        if capture is not None:
            import cv2

            reported = capture.get(cv2.CAP_PROP_FPS)
            fps = f", {reported:g} FPS reported" if reported and reported > 0 else ", FPS not reported"
        return Check(name, "ok", f"{source.label}: {width}x{height}{fps}")
    finally:
        source.close()


def check_writable(path: Path, what: str) -> Check:
    from edgead.data.files import OutputPathError, check_output_folder, nearest_existing

    try:
        check_output_folder(path, what)
    except OutputPathError as err:
        return Check(f"write {what}", "fail", str(err), "choose another folder or fix its permissions")
    free = shutil.disk_usage(nearest_existing(path)).free / 2**30
    status = "ok" if free >= 1.0 else "warn"
    return Check(f"write {what}", status, f"{path}: writable, {free:.1f} GiB free",
                 "" if status == "ok" else "less than 1 GiB free: exports and saved alarms need room")  # fmt: skip


def check_export(export_dir: Path, runs: int = 10) -> Check:
    """Loads the export and runs ``edgead verify`` on this machine's default backend."""
    from edgead.runtime.metadata import MetadataError
    from edgead.runtime.verify import VerifyUnavailable, verify_export

    name = f"export {export_dir}"
    try:
        report = verify_export(export_dir, runs=runs)
    except (MetadataError, VerifyUnavailable, OSError, ValueError) as err:
        return Check(name, "fail", str(err), "re-run `edgead export`, or see `edgead verify --help`")
    used, latency = report["backend"], report["latency_ms"]
    detail = f"{used['method']} on {used['backend']} ({used['precision']}), median {latency['median']:.1f} ms"
    if not report["passed"]:
        return Check(name, "fail", detail + "; " + "; ".join(report["failures"]), "edgead verify EXPORT --json F")
    return Check(name, "ok", detail + ", verified")


def run_doctor(
    camera: str | None = None,
    export_dir: Path | None = None,
    runs_root: Path = Path("runs"),
    exports_root: Path = Path("exports"),
) -> dict[str, Any]:
    """Every check; ``passed`` is False when one failed."""
    checks = [check_python(), *check_packages(), *check_opencv(), check_onnxruntime(), *check_gpus()]
    checks.append(check_openvino())
    checks.append(check_camera(camera) if camera else Check("camera", "skip", "not asked (--camera SOURCE)"))
    checks += [check_writable(runs_root, "runs"), check_writable(exports_root, "exports")]
    checks.append(check_export(export_dir) if export_dir else Check("export", "skip", "not asked (--export DIR)"))
    return {"checks": [asdict(c) for c in checks], "passed": not any(c.status == "fail" for c in checks)}


__all__ = ["Check", "run_doctor"]
