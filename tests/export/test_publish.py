"""Export folders change as whole versions: a kill at every write boundary leaves the previous export in use,
a second concurrent export is refused, stale pieces are cleaned, and nothing a user saved is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import edgead.export.publish as publish_module
from edgead.cli import _latest_export
from edgead.export.publish import (
    PublishError,
    check_target,
    export_lock,
    publish,
    start_version,
    versions_dir,
)


def _export(out: Path, content: str, fail_at: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """One export of two files, ``edgead.json`` last, optionally killed at a named boundary."""
    with export_lock(out):
        staging = start_version(out)
        (staging / "model.onnx").write_text(content)
        if fail_at == "before metadata":
            raise KeyboardInterrupt
        (staging / "edgead.json").write_text(f'{{"v": "{content}"}}')
        if fail_at == "before publish":
            raise KeyboardInterrupt
        publish(staging, out)


def _state(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in out.iterdir()}


@pytest.mark.parametrize("fail_at", ["before metadata", "before publish", "after rename", "after link"])
def test_a_kill_at_every_boundary_keeps_the_previous_export(
    tmp_path: Path, fail_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "exports" / "m"
    _export(out, "one")
    before = _state(out)
    real_rename, real_symlink = os.rename, os.symlink

    def killed_rename(src: str | Path, dst: str | Path) -> None:
        real_rename(src, dst)
        if fail_at == "after rename" and str(src).endswith(".partial"):
            raise KeyboardInterrupt

    def killed_symlink(src: str, dst: str | Path) -> None:
        real_symlink(src, dst)
        if fail_at == "after link":
            raise KeyboardInterrupt

    monkeypatch.setattr(publish_module.os, "rename", killed_rename)
    monkeypatch.setattr(publish_module.os, "symlink", killed_symlink)
    with pytest.raises(KeyboardInterrupt):
        _export(out, "two", fail_at=fail_at)
    assert _state(out) == before  # readers still see the whole previous export
    monkeypatch.undo()
    _export(out, "three")  # the next export cleans up what the kill left
    assert _state(out) == {"model.onnx": "three", "edgead.json": '{"v": "three"}'}
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".m.link")]
    assert not leftovers and not list(versions_dir(out).glob("*.partial"))


def test_versions_switch_whole_and_keep_one_previous(tmp_path: Path) -> None:
    out = tmp_path / "exports" / "m"
    for content in ("one", "two", "three"):
        _export(out, content)
    assert out.is_symlink() and not os.path.isabs(os.readlink(out))  # relative: the folder can move
    assert _state(out)["model.onnx"] == "three"
    kept = sorted((v / "model.onnx").read_text() for v in versions_dir(out).iterdir())
    assert kept == ["three", "two"]


def test_a_second_concurrent_export_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "exports" / "m"
    with export_lock(out):
        with pytest.raises(PublishError, match=f"another export.*pid {os.getpid()}"):
            with export_lock(out):
                pass
    with export_lock(out):  # released
        pass


def test_an_older_real_export_folder_is_adopted_and_other_folders_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "exports" / "m"
    out.mkdir(parents=True)
    (out / "edgead.json").write_text("{}")
    (out / "model.onnx").write_text("old")
    _export(out, "new")
    assert out.is_symlink() and _state(out)["model.onnx"] == "new"
    assert sorted((v / "model.onnx").read_text() for v in versions_dir(out).iterdir()) == ["new", "old"]

    mine = tmp_path / "my-photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_text("precious")
    with pytest.raises(PublishError, match="not an edgead export"):
        check_target(mine)
    with pytest.raises(PublishError, match="not an edgead export"):
        _export(mine, "x")
    assert (mine / "holiday.jpg").read_text() == "precious" and not mine.is_symlink()


def test_run_never_picks_a_hidden_version_or_unfinished_export(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    _export(root / "m", "one")
    hidden = root / ".m.versions" / "zzz.partial"
    hidden.mkdir()
    (hidden / "edgead.json").write_text("{}")
    stray = root / ".old.staging-1"
    stray.mkdir()
    (stray / "edgead.json").write_text("{}")
    assert _latest_export(root) == root / "m"
