"""Windows line PCs, simulated here: no POSIX-only module is needed to import and run the runtime and the CLI,
and paths written the Windows way are handled.

What cannot run on Linux is not claimed: ``msvcrt``'s lock (``edgead.data.files._try_lock``'s Windows branch)
and OpenCV's Windows capture backends have not run in this project's CI.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgead.runtime.metadata import MetadataError, is_plain_file_name, verified_artifact
from edgead.runtime.sources import SourceError, describe_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integration_helpers import make_tiny_run  # noqa: E402

#: Modules that exist only on POSIX systems (the standard library's Unix-specific services).
POSIX_ONLY = ("fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "syslog")

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))
    class NoPosix(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is POSIX-only (blocked to simulate Windows)")
            return None
    for name in BLOCKED:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, NoPosix())
    """
)


@pytest.mark.slow  # trains a tiny run and exports it
def test_runtime_and_cli_run_without_posix_only_modules(tmp_path: Path) -> None:
    from edgead.export.exporter import ExportOptions, export_run

    data, run_dir = make_tiny_run(tmp_path)
    export_dir = tmp_path / "export"
    export_run(run_dir, export_dir, ExportOptions(), log=lambda _: None)
    frames = data / "test" / "good"
    script = BLOCKER + textwrap.dedent(
        f"""
        import cv2
        from typer.testing import CliRunner
        from edgead.runtime import Detector
        from edgead.cli import app
        export, frames, out = {str(export_dir)!r}, {str(frames)!r}, {str(tmp_path / "out")!r}
        with Detector.load(export, backend="onnxruntime") as detector:
            frame = cv2.imread(next(iter(sorted(__import__("pathlib").Path(frames).glob("*.png")))).as_posix())
            print("score", detector.predict(frame).score)
        runner = CliRunner()
        for args in (["predict", frames, "--export", export, "--out", out, "--no-progress"],
                     ["run", "--camera", frames, "--export", export, "--headless", "--max-frames", "2"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args, result.output, result.exception)
        for name in {list(POSIX_ONLY)!r}:
            assert name not in sys.modules, name + " was imported"
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, ",".join(POSIX_ONLY)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout and "score" in done.stdout


@pytest.mark.parametrize(
    "name",
    ["C:\\exports\\model.onnx", "..\\model.onnx", "C:model.onnx", "D:", "sub\\model.onnx", "\\\\server\\share\\m.onnx"],
)
def test_artifact_names_written_the_windows_way_are_refused(name: str, tmp_path: Path) -> None:
    assert not is_plain_file_name(name)
    with pytest.raises(MetadataError, match="must be a file name inside the export folder"):
        verified_artifact(tmp_path, {"file": name, "sha256": "0" * 64})


def test_plain_names_pass() -> None:
    assert all(is_plain_file_name(n) for n in ("model.onnx", "model.int8.onnx", "verification.npz", "a b.engine"))


def test_sources_given_as_windows_paths(tmp_path: Path) -> None:
    video = tmp_path / "line 3.mp4"
    video.write_bytes(b"\0")
    assert describe_source(str(video)) == ("video", video)
    with pytest.raises(SourceError, match=r"no file or folder exists at that path"):
        describe_source("C:\\videos\\line3.mp4")  # a drive-letter path is a path, never a URL scheme
    assert describe_source("rtsp://cam/1")[0] == "stream" and describe_source("0") == ("camera", 0)
