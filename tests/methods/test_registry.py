"""A method is one folder: discovered by the registry (torch-free), packaged without a list, usable end to end
(train -> export -> runtime) with no edit outside its folder; parameters are typed and errors name the key."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import edgead.methods as registry
from edgead.cli import app
from edgead.methods import PLANNED, discover, get_method, implemented_methods, method_folders, planned_methods
from edgead.methods.params import ParamError

ROOT = Path(__file__).resolve().parents[2]

THROWAWAY_METHOD = '''
"""A throwaway method written by a test: a Gaussian per pixel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgead.config import RunConfig
from edgead.methods.base import FitContext, InferenceGraph, Method
from edgead.methods.params import MethodParams, param, positive
from edgead.train.checkpoint import load_weights, save_weights


@dataclass(frozen=True)
class PixelParams(MethodParams):
    variance_floor: float = param(1e-3, "added to every pixel variance", "ours", check=positive)


class PixelGraph(InferenceGraph):
    def __init__(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("var", var)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = ((image - self.mean) ** 2 / self.var).sum(dim=1)
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)


class PixelGaussian(Method):
    """Nobody's paper."""

    name = "pixel-gaussian"
    paper = "a test"
    summary = "per-pixel Gaussian"
    Params = PixelParams

    def fit(self, ctx: FitContext) -> dict[str, Any]:
        self.graph = PixelGraph(ctx.images.mean(0), ctx.images.var(0) + self.params.variance_floor)
        save_weights(self.graph.state_dict(), self.run_dir)
        return {"n_images": len(ctx.images)}

    def build_graph(self) -> PixelGraph:
        return self.graph.eval()

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> PixelGaussian:
        method = cls(config, run_dir)
        state = load_weights(run_dir)
        method.graph = PixelGraph(state["mean"], state["var"])
        return method
'''


@pytest.fixture()
def throwaway(tmp_path: Path) -> Iterator[Path]:
    """A new method folder on the methods package path (as a plug-in or a new folder would be), removed after."""
    extra = tmp_path / "extra_methods"
    folder = extra / "pixel_gaussian"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text('"""pixel-gaussian: a throwaway."""\n')
    (folder / "method.py").write_text(THROWAWAY_METHOD)
    registry.__path__.append(str(extra))
    discover.cache_clear()
    try:
        yield folder
    finally:
        registry.__path__.remove(str(extra))
        discover.cache_clear()
        for name in [m for m in sys.modules if m.startswith("edgead.methods.pixel_gaussian")]:
            del sys.modules[name]


def test_registry_is_torch_free_and_finds_every_folder() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import edgead.methods as m
        print(",".join(m.implemented_methods()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == implemented_methods()
    assert {f.name for f in method_folders()} == {e.folder.name for e in discover().values()}
    assert {"score-resilience", "score-tscale", "gaussian"} <= set(implemented_methods())


def test_planned_methods_are_listed_but_refused_clearly() -> None:
    for name in planned_methods():
        with pytest.raises(NotImplementedError, match="planned"):
            get_method(name)
    with pytest.raises(ValueError, match="unknown method 'nope'; expected one of"):
        get_method("nope")


def test_a_new_folder_needs_no_edit_elsewhere(throwaway: Path, tmp_path: Path) -> None:
    from edgead.data.synthetic import generate_dataset
    from edgead.export.exporter import ExportOptions, export_run
    from edgead.pipeline import train_run
    from edgead.runtime.detector import Detector
    from edgead.spec import RunSpec

    assert "pixel-gaussian" in implemented_methods()
    data = generate_dataset(tmp_path / "data", size=32, n_train=20, n_test_good=2, n_test_defect=2, seed=1)
    run_dir, summary = train_run(
        RunSpec(method="pixel-gaussian", data=[data], image_size=32, runs_root=tmp_path / "runs", device="cpu",
                params={"variance_floor": 0.01}),
        progress=False,
    )  # fmt: skip
    assert summary["n_images"] == 18
    meta = export_run(run_dir, tmp_path / "export", ExportOptions(), log=lambda _: None)
    assert meta.parity["torch_vs_onnxruntime_fp32"]["score_max_rel_error"] < 1e-4
    result = Detector.load(tmp_path / "export").predict(np.full((40, 40, 3), 128, np.uint8))
    assert np.isfinite(result.score) and result.anomaly_map.shape == (32, 32)
    output = CliRunner().invoke(app, ["info", "--method", "pixel-gaussian"], env={"COLUMNS": "200"}).output
    assert "variance_floor" in output and "per-pixel Gaussian" in output


def _discover_packages() -> list[str]:
    spec = importlib.util.spec_from_file_location("edgead_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.discover_packages()[0]


def test_every_method_folder_is_packaged() -> None:
    packages = _discover_packages()
    for folder in method_folders():
        if folder.parent == ROOT / "edgead" / "methods":
            assert f"edgead.methods.{folder.name}" in packages, f"{folder} would be left out of the wheel"
    assert {"edgead.export", "edgead.runtime", "edgead.runtime.backends", "edgead.bench"} <= set(packages)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="setuptools not installed")
def test_a_built_wheel_holds_a_new_method_folder(tmp_path: Path) -> None:
    """Build a real wheel from a copy of the project with one more method folder in it."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs", "exports", ".*cache*")
    for name in ("edgead", "export", "runtime"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    extra = src / "edgead" / "methods" / "pixel_gaussian"
    extra.mkdir()
    (extra / "__init__.py").write_text('"""pixel-gaussian."""\n')
    (extra / "method.py").write_text(THROWAWAY_METHOD)
    (extra / "README.md").write_text("# pixel-gaussian\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("edgead-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in [*method_folders(), extra]:
        if folder.parent.name == "methods":
            assert f"edgead/methods/{folder.name}/method.py" in names
            assert f"edgead/methods/{folder.name}/README.md" in names or folder.name != extra.name
    assert "edgead/runtime/backends/onnxruntime.py" in names and "edgead/export/exporter.py" in names


def test_readme_methods_table_names_only_known_methods() -> None:
    """The README's table describes methods; ``edgead info`` is the list, so a new folder needs no README edit,
    but the README may not name a method that does not exist."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert rows and set(rows) <= {*implemented_methods(), *PLANNED}


def test_param_errors_name_the_method_the_key_and_what_is_allowed() -> None:
    cls = get_method("score-resilience")
    unknown = r"score-resilience: unknown parameter\(s\) n_drawz; score-resilience has .*n_draws"
    with pytest.raises(ParamError, match=unknown):
        cls.parse_params({"n_drawz": 2})
    with pytest.raises(ParamError, match=r"n_draws=0 must be a value >= 1"):
        cls.parse_params({"n_draws": 0})
    with pytest.raises(ParamError, match=r"n_draws='three' must be an integer"):
        cls.parse_params({"n_draws": "three"})
    with pytest.raises(ParamError, match=r"projection='ica' must be one of 'opca', 'pca', 'none'"):
        get_method("gaussian").parse_params({"projection": "ica"})
    assert cls.parse_params({"sigma": 10}).sigma == 10.0 and isinstance(cls.parse_params({"sigma": 10}).sigma, float)
    for name in implemented_methods():
        method = get_method(name)
        assert method.parse_params(method.default_params()) == method.Params()
        assert all(row["doc"] and row["ref"] for row in method.Params.describe())


def test_a_broken_method_folder_is_reported_not_fatal(tmp_path: Path) -> None:
    extra = tmp_path / "extra_methods"
    (extra / "half_written").mkdir(parents=True)
    (extra / "half_written" / "method.py").write_text("class Half(Method):\n    name = 'half'\n    def fit(self\n")
    registry.__path__.append(str(extra))
    discover.cache_clear()
    try:
        assert "score-resilience" in implemented_methods() and "half" not in implemented_methods()
        assert "half_written" in registry.BROKEN
        with pytest.raises(ValueError, match="half_written is broken"):
            get_method("half")
        output = CliRunner().invoke(app, ["info"], env={"COLUMNS": "200"}).output
        assert "broken" in output and "score-resilience" in output
    finally:
        registry.__path__.remove(str(extra))
        discover.cache_clear()
        discover()
