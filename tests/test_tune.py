"""edgead tune: candidates scored on held-out normals + pseudo-anomalies only, recorded, best kept as the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.config import RunConfig, TrainConfig, resolve_latest
from edgead.data.synthetic import generate_dataset
from edgead.methods import get_method
from edgead.methods.gaussian import method as gaussian_module
from edgead.spec import RunSpec
from edgead.tune import parse_grid, tune_run


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("tune") / "data", size=32, n_train=30, n_test_good=2,
                            n_test_defect=2, seed=4)  # fmt: skip


def test_gaussian_grid_reuses_features_and_keeps_the_best(data: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []
    original = gaussian_module.collect_features
    monkeypatch.setattr(gaussian_module, "collect_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    gaussian_module._FEATURE_CACHE.clear()
    grid = parse_grid(["opca_fraction=0.05,0.2", "image_score=pooled,topk_mean"], get_method("gaussian"))
    spec = RunSpec(method="gaussian", data=[data], image_size=32, runs_root=tmp_path, device="cpu")
    run_dir, record = tune_run(spec, grid, progress=False, log=lambda _: None)
    assert len(calls) == 1, "statistics-only candidates must reuse the backbone features"
    assert len(record["candidates"]) == 4
    best = max(record["candidates"], key=lambda r: (r["image_auroc"], r["pixel_auroc"]))
    assert record["chosen"] == best["params"]
    config = RunConfig.load(run_dir)
    assert config.state["tuning"]["chosen"] == record["chosen"]
    assert all(config.method_params[k] == v for k, v in record["chosen"].items())
    assert resolve_latest("gaussian", tmp_path) == run_dir.resolve()
    assert not list((tmp_path / "gaussian").glob(".tune-*")), "candidate runs left behind"
    assert all(0.0 <= r["image_auroc"] <= 1.0 and r["n_pseudo"] == r["n_normal"] for r in record["candidates"])


def test_input_size_is_a_candidate_and_every_size_sees_one_calibrated_set(data: Path, tmp_path: Path) -> None:
    grid = parse_grid(["image_size=32,48", "image_score=pooled,max"], get_method("gaussian"))
    spec = RunSpec(method="gaussian", data=[data], image_size=32, runs_root=tmp_path / "runs", device="cpu")
    run_dir, record = tune_run(spec, grid, progress=False, log=lambda _: None, keep_candidates=tmp_path / "kept")
    assert record["default"] == {"image_size": 32, "image_score": get_method("gaussian").Params().image_score}
    assert [r["params"]["image_size"] for r in record["candidates"]] == [32, 32, 48, 48]  # the default's fit first
    # one set: the same images and defects at every size, calibrated on the default
    assert len({(r["n_normal"], r["n_pseudo"]) for r in record["candidates"]}) == 1
    assert "calibration" in record and record["strength"] in (1.0, 0.6, 0.4, 0.25, 0.15)
    assert record["decision"]["chosen"] == record["chosen"]
    if record["decision"].get("kept_default"):
        assert record["chosen"] == record["default"]
    config = RunConfig.load(run_dir)
    assert config.preprocess["image_size"] == record["chosen"]["image_size"]
    assert "image_size" not in config.method_params
    assert len(list((tmp_path / "kept").iterdir())) == 1  # the other size's fit, for the benchmark


def test_inference_only_grid_trains_once(data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-3, checkpoint_every=5)
    spec = RunSpec(method="score-resilience", data=[data], preset="tiny", image_size=32, train=cfg,
                   runs_root=tmp_path, device="cpu")  # fmt: skip
    run_dir, record = tune_run(spec, None, progress=False, log=lambda _: None)
    assert [r["params"]["image_score"] for r in record["candidates"]] == ["max", "topk_mean", "interior_max"]
    assert len(list((tmp_path / "score-resilience").iterdir())) == 2  # the chosen run and `latest`


def test_grid_errors_name_the_key_and_the_values() -> None:
    with pytest.raises(ValueError, match="has no parameter 'opca'"):
        parse_grid(["opca=0.1"], get_method("gaussian"))
    with pytest.raises(ValueError, match=r"opca_fraction=2.0 must be \"auto\" or a value in \(0, 1\)"):
        parse_grid(["opca_fraction=0.1,2.0"], get_method("gaussian"))
    assert parse_grid(["stages=[[3,4],[5,6,7]]"], get_method("gaussian")) == {"stages": [[3, 4], [5, 6, 7]]}
    with pytest.raises(ValueError, match="image_size=16: expected whole pixels >= 32"):
        parse_grid(["image_size=224,16"], get_method("gaussian"))
    with pytest.raises(ValueError, match="listed twice"):
        parse_grid(["image_size=224,224"], get_method("gaussian"))


def test_tune_through_the_cli(data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["tune", "--method", "gaussian", "--data", str(data), "--image-size", "32",
                                      "--grid", "opca_fraction=0.05,0.1", "--runs-root", str(tmp_path),
                                      "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "chosen" in result.output and "pseudo-validation image AUROC" in result.output
