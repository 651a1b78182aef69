"""Start the ``tritonserver`` binary that the PyPI wheel ``nvidia-pytriton`` carries, on a CPU-only machine.

The wheel ships Triton (2.51) with its Python backend; only the binary and its libraries are used (the
``pytriton`` package itself pins numpy < 2 and is never imported). The Python backend needs the stub built for
this Python version next to ``libtriton_python.so``: :func:`backend_directory` links the wheel's files into a
folder laid out that way. Models served by a repository from ``edgead export --format triton`` name this
environment in ``EXECUTION_ENV_PATH``, because the stub does not inherit ``PYTHONPATH``.

    python -m edgead.runtime.triton_server REPO [--model NAME] [--http-port 8000] [--grpc-port 8001]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


class TritonNotInstalled(RuntimeError):
    """The ``nvidia-pytriton`` wheel (the server binary) is not installed."""


def pytriton_root() -> Path:
    """The installed ``pytriton`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(
            "tritonserver is not installed: pip install --no-deps nvidia-pytriton (only its server binary is used)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def server_binary() -> Path:
    binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotInstalled(f"{binary} is missing: reinstall nvidia-pytriton")
    return binary


def backend_directory(folder: Path) -> Path:
    """``folder/python/`` with the wheel's Python backend and the stub for this Python version (links)."""
    server = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotInstalled(f"nvidia-pytriton has no Python backend stub for Python {version}")
    target = folder / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in [server / "backends" / "python" / "libtriton_python.so",
                   server / "backends" / "python" / "triton_python_backend_utils.py", stub]:  # fmt: skip
        link = target / source.name
        if not link.exists():
            link.symlink_to(source)
    return folder


def server_command(repo: Path, backends: Path, http_port: int, grpc_port: int, metrics_port: int,
                   models: list[str] | None = None) -> list[str]:  # fmt: skip
    """The command line; with ``models`` only those are loaded (others in the repository, e.g. the
    ``onnxruntime_onnx`` model that needs NVIDIA's server containers, are left alone)."""
    command = [
        str(server_binary()), f"--model-repository={repo}", f"--backend-directory={backends}",
        f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
        "--allow-metrics=true", "--log-verbose=0",
    ]  # fmt: skip
    if models:
        command += ["--model-control-mode=explicit", *[f"--load-model={m}" for m in models]]
    return command


def wait_ready(http_port: int, process: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
    """Block until ``/v2/health/ready`` answers 200; raise with the reason when the server exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"tritonserver on port {http_port} was not ready within {timeout_s:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path)
    parser.add_argument("--model", action="append", default=None, help="load only these models (repeatable)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args()
    try:
        with tempfile.TemporaryDirectory(prefix="edgead-triton-") as tmp:
            command = server_command(args.repo.resolve(), backend_directory(Path(tmp)), args.http_port,
                                     args.grpc_port, args.metrics_port, args.model)  # fmt: skip
            subprocess.run(command, check=False)  # the backend links live as long as the server
    except TritonNotInstalled as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
