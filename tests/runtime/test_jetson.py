"""Jetson without nvidia-smi: model, L4T release, GPU clocks and shared memory from the files tegrastats reads.

The files are laid out as on a Jetson Orin (JetPack 6) under a temporary root; no Jetson ran these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgead.runtime import machine

MEMINFO = "MemTotal:        7620000 kB\nMemFree:          100000 kB\nMemAvailable:    5120000 kB\n"


def fake_jetson(root: Path, gpu_node: str = "17000000.ga10b") -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (root / "proc/meminfo").write_text(MEMINFO)
    node = root / "sys/class/devfreq" / gpu_node
    node.mkdir(parents=True)
    (node / "cur_freq").write_text("306000000\n")
    (node / "max_freq").write_text("624750000\n")
    (root / "sys/class/devfreq/3d00000.pcie").mkdir()  # another devfreq device, not the GPU
    return root


def test_jetson_record_reads_model_release_clock_and_memory(tmp_path: Path) -> None:
    root = fake_jetson(tmp_path)
    assert machine.is_jetson(root)
    record = machine.jetson_record(root)
    assert record["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert record["l4t"].startswith("R36 (release), REVISION: 3.0")
    assert record["gpu_clock_mhz"] == {"current": 306.0, "max": 624.75, "node": "17000000.ga10b"}
    assert record["memory_mb"] == {"total": round(7620000 / 1024, 1), "available": 5000.0}


def test_not_a_jetson_and_missing_files(tmp_path: Path) -> None:
    assert not machine.is_jetson(tmp_path) and machine.jetson_record(tmp_path) is None
    root = fake_jetson(tmp_path / "xavier", gpu_node="17000000.gv11b")
    (root / "proc/meminfo").unlink()
    record = machine.jetson_record(root)
    assert record["gpu_clock_mhz"]["node"] == "17000000.gv11b" and record["memory_mb"] is None


def test_device_memory_on_a_jetson_comes_from_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_jetson(tmp_path)
    monkeypatch.setattr(machine, "ROOT", root)
    monkeypatch.setattr(machine.shutil, "which", lambda _: None)  # Jetsons have no nvidia-smi
    used = machine.gpu_memory_used_mb()
    assert used["used_mb"] == pytest.approx((7620000 - 5120000) / 1024, abs=0.1) and "Jetson" in used["source"]
    assert machine.gpu_name() == "NVIDIA Jetson Orin Nano Developer Kit"
    assert machine.device_record()["jetson"]["gpu_clock_mhz"]["current"] == 306.0
