"""Build the ``edgead.json`` sidecar (schema and reading live in ``edgead.runtime.metadata``)."""

from __future__ import annotations

import datetime as dt
import importlib.util
from typing import Any

from edgead import __version__
from edgead.runtime.backends.base import INPUT_NAME, OUTPUT_NAMES
from edgead.runtime.metadata import FORMAT_VERSION


def tool_versions() -> dict[str, str | None]:
    """Versions of the libraries that produced an export."""
    versions: dict[str, str | None] = {"edgead": __version__}
    for module in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "tensorrt_rtx"):
        if importlib.util.find_spec(module) is None:
            versions[module] = None
            continue
        try:
            versions[module] = str(getattr(__import__(module), "__version__", "unknown"))
        except Exception:  # a broken optional install (e.g. the PyPI tensorrt stub) is recorded, not fatal
            versions[module] = "broken install"
    return versions


def build_metadata(
    *,
    method: str,
    run_dir: str,
    preprocess: dict[str, Any],
    method_params: dict[str, Any],
    model: dict[str, Any],
    input_shape: tuple[int, ...],
    map_shape: tuple[int, ...],
    threshold: dict[str, Any],
    artifacts: dict[str, Any],
    parity: dict[str, Any],
    noise: dict[str, Any],
) -> dict[str, Any]:
    """Everything the runtime and a reader of the export need, in one JSON-friendly dict."""
    return {
        "format_version": FORMAT_VERSION,
        "method": method,
        "edgead_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run": {"name": run_dir.rstrip("/").rsplit("/", 1)[-1], "dir": run_dir},
        "input": {
            "name": INPUT_NAME, "shape": list(input_shape), "dtype": "float32", "layout": "NCHW",
            "channel_order": "RGB" if preprocess.get("channels", 3) == 3 else "GRAY",
            "note": "frames are converted BGR->RGB and preprocessed by edgead.data.preprocess.preprocess",
        },
        "outputs": [
            {"name": OUTPUT_NAMES[0], "shape": list(map_shape), "dtype": "float32"},
            {"name": OUTPUT_NAMES[1], "shape": [input_shape[0]], "dtype": "float32"},
        ],
        "preprocess": preprocess,
        "noise": noise,
        "method_params": method_params,
        "model": model,
        "threshold": threshold,
        "artifacts": artifacts,
        "parity": parity,
        "versions": tool_versions(),
    }
