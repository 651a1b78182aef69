"""Normal-calibrated maps (edgead.methods.calibration): the statistics, the graph that carries them into ONNX
and FP16, and the automatic choice recorded by a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgead.config import RunConfig, TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.export.fp16 import FP32Island, fp32_node_names, mixed_precision_graph
from edgead.methods import calibration, load_method
from edgead.methods.calibration import CalibratedGraph, MapCalibration, fit_map_statistics
from edgead.methods.scoring import MapScore
from edgead.pipeline import train_run
from edgead.spec import RunSpec

SIZE = 32


def _normal_maps(n: int, seed: int) -> np.ndarray:
    """Maps of normal images where the left band is always hot (a fixture edge) and noisier."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(1.0, 0.1, (n, SIZE, SIZE))
    maps[:, :, :6] += 3.0 + rng.normal(0, 0.5, (n, SIZE, 1))
    return maps.astype(np.float32)


def test_calibrated_normal_maps_are_standardised_and_a_small_defect_outranks_the_hot_band() -> None:
    train, check = _normal_maps(40, 0), _normal_maps(10, 1)
    mean, spread = fit_map_statistics(train)
    assert mean.shape == spread.shape == (calibration.GRID, calibration.GRID) and (spread > 0).all()
    module = MapCalibration(mean, spread, (SIZE, SIZE))
    with torch.no_grad():
        calibrated = module(torch.from_numpy(check)).numpy()
    interior = calibrated[:, 4:-4, 10:-4]  # away from the smoothed edge of the band
    assert abs(float(interior.mean())) < 0.3 and 0.5 < float(interior.std()) < 2.0
    defect = check[0].copy()
    defect[20:23, 20:23] += 1.0  # small, weaker than the hot band
    assert defect.max() < check[1:].max()  # raw: the band of any normal image beats the defect
    with torch.no_grad():
        scored = module(torch.from_numpy(np.stack([defect, *check[1:]]))).amax(dim=(1, 2)).numpy()
    assert scored[0] > scored[1:].max()  # calibrated: the defect is the highest image


def test_statistics_and_records_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="at least two normal images"):
        fit_map_statistics(np.zeros((1, SIZE, SIZE)))
    with pytest.raises(ValueError, match="NaN"):
        fit_map_statistics(np.full((3, SIZE, SIZE), np.nan))
    mean, spread = fit_map_statistics(_normal_maps(5, 0))
    stored = calibration.record(mean, spread, (SIZE, SIZE), "5 held-out normal images")
    assert torch.allclose(calibration.from_record(stored).mean, MapCalibration(mean, spread, (SIZE, SIZE)).mean)
    with pytest.raises(ValueError, match="damaged"):
        calibration.from_record({**stored, "spread": [[0.0] * len(stored["spread"])] * len(stored["spread"])})
    with pytest.raises(ValueError, match="damaged"):
        calibration.from_record({k: v for k, v in stored.items() if k != "mean"})


class _Toy(nn.Module):
    """A graph with a network (conv) and an FP32-sensitive part, like the methods' graphs."""

    fp16_modules = ("net",)

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = self.net(image)[:, 0].square()
        return anomaly_map, anomaly_map.mean(dim=(1, 2))


def _calibrated_toy() -> CalibratedGraph:
    torch.manual_seed(0)
    toy = _Toy().eval()
    with torch.no_grad():
        maps = toy(torch.rand(8, 3, SIZE, SIZE))[0].numpy()
    mean, spread = fit_map_statistics(maps)
    return CalibratedGraph(toy, MapCalibration(mean, spread, (SIZE, SIZE)), MapScore("max", map_size=(SIZE, SIZE)))


def test_the_calibrated_graph_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    graph = _calibrated_toy().eval()
    image = torch.rand(2, 3, SIZE, SIZE)
    path = tmp_path / "calibrated.onnx"
    torch.onnx.export(graph, (image,), str(path), input_names=["image"], output_names=["anomaly_map", "score"],
                      opset_version=18, dynamo=False)  # fmt: skip
    onnx_map, onnx_score = ort.InferenceSession(str(path)).run(None, {"image": image.numpy()})
    with torch.no_grad():
        torch_map, torch_score = graph(image)
    np.testing.assert_allclose(onnx_map, torch_map.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_score, torch_score.numpy(), rtol=1e-4, atol=1e-4)
    assert np.allclose(torch_score.numpy(), torch_map.amax(dim=(1, 2)).numpy())  # the score is of the new map


def test_fp16_export_finds_the_wrapped_network_and_keeps_the_calibration_fp32() -> None:
    graph = _calibrated_toy().eval()
    assert graph.fp16_modules == ("method_graph.net",)
    mixed = mixed_precision_graph(graph)
    assert mixed.method_graph.net.module.weight.dtype == torch.float16
    assert mixed.calibration.mean.dtype == torch.float32 and not any(isinstance(m, FP32Island) for m in mixed.modules())
    with torch.no_grad():
        image = torch.rand(1, 3, SIZE, SIZE)
        assert torch.allclose(mixed(image)[1], graph(image)[1], rtol=5e-2, atol=5e-2)


def test_fp32_nodes_are_named_for_a_wrapped_graph(tmp_path: Path) -> None:
    import onnx

    graph = _calibrated_toy().eval()
    path = tmp_path / "g.onnx"
    torch.onnx.export(graph, (torch.rand(1, 3, SIZE, SIZE),), str(path), opset_version=18, dynamo=True)
    model = onnx.load(str(path))
    kept = set(fp32_node_names(graph, model))
    conv = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert conv and not kept & set(conv)  # the network goes to FP16
    assert any(n.op_type in ("Sub", "Mul") and n.name in kept for n in model.graph.node)  # the calibration stays


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("calibration")
    data = generate_dataset(root / "data", size=SIZE, n_train=24, n_test_good=4, n_test_defect=4, seed=2)
    spec = RunSpec(method="gaussian", data=[data], image_size=SIZE, runs_root=root / "runs", device="cpu",
                   val_fraction=0.25, train=TrainConfig(batch_size=8), params={"weights": "random"})  # fmt: skip
    return train_run(spec, progress=False)


def test_auto_records_the_choice_and_the_statistics(gaussian_run: tuple[Path, dict]) -> None:
    run_dir, summary = gaussian_run
    config = RunConfig.load(run_dir)
    selection = config.state["map_calibration_selection"]
    assert set(selection["pseudo_validation"]) == {"none", "normal"}
    assert selection["decision"]["default"] == "none" and selection["chosen"] in ("none", "normal")
    assert selection["calibration"]["reference_auroc_by_strength"]  # the discriminating set's calibration
    assert config.method_params["map_calibration"] == selection["chosen"] == summary["map_calibration"]
    stored = config.state["map_calibration"]
    assert stored["grid"] == calibration.GRID and stored["map_size"] == [SIZE, SIZE]


def test_a_run_switched_to_normal_runs_the_calibrated_graph(gaussian_run: tuple[Path, dict]) -> None:
    run_dir, _ = gaussian_run
    config = RunConfig.load(run_dir)
    config.method_params.update({"map_calibration": "normal", "image_score": "max"})
    method = type(load_method(run_dir)).load(run_dir, config)
    graph = method.inference_graph()
    assert isinstance(graph, CalibratedGraph)
    image = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        raw_map, _ = method.build_graph()(image)
        calibrated_map, score = graph(image)
    expected = (raw_map - graph.calibration.mean) * graph.calibration.inverse_spread
    assert torch.allclose(calibrated_map, expected) and torch.allclose(score, calibrated_map.amax(dim=(1, 2)))
    config.method_params["map_calibration"] = "none"
    assert not isinstance(type(method).load(run_dir, config).inference_graph(), CalibratedGraph)
    config.method_params["map_calibration"] = "auto"  # unresolved: what the run's choice chose
    config.state["map_calibration_selection"] = {**config.state["map_calibration_selection"], "chosen": "normal"}
    assert isinstance(type(method).load(run_dir, config).inference_graph(), CalibratedGraph)
    del config.state["map_calibration"]
    config.method_params["map_calibration"] = "normal"
    with pytest.raises(ValueError, match="no calibration statistics"):
        type(method).load(run_dir, config).inference_graph()
