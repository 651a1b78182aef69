"""Score fusion (edgead.methods.fusion): the fused graph's arithmetic, the refusals, the automatic choice, the
export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgead.config import TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.export.exporter import ExportOptions, export_run
from edgead.methods.fusion import FusedGraph, fuse_runs
from edgead.pipeline import train_run
from edgead.runtime.metadata import load_metadata
from edgead.spec import RunSpec

SIZE = 32


class _Member(nn.Module):
    def __init__(self, weight: float, map_size: int) -> None:
        super().__init__()
        self.weight, self.map_size = weight, map_size

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = torch.nn.functional.adaptive_avg_pool2d(image.mean(dim=1, keepdim=True), self.map_size)[:, 0]
        anomaly_map = anomaly_map * self.weight
        return anomaly_map, anomaly_map.amax(dim=(1, 2))


def test_members_are_standardised_resized_and_fused() -> None:
    members = [_Member(1.0, SIZE), _Member(3.0, SIZE // 2)]
    map_stats = np.array([[0.5, 0.25], [1.5, 0.75]])
    score_stats = np.array([[0.9, 0.1], [2.7, 0.3]])
    image = torch.rand(2, 3, SIZE, SIZE)
    a_map, a_score = members[0](image)
    b_map, b_score = members[1](image)
    b_map = torch.nn.functional.interpolate(b_map[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0]
    za, zb = (a_map - 0.5) / 0.25, (b_map - 1.5) / 0.75
    sa, sb = (a_score - 0.9) / 0.1, (b_score - 2.7) / 0.3
    mean_map, mean_score = FusedGraph(members, map_stats, score_stats, "mean", (SIZE, SIZE))(image)
    assert torch.allclose(mean_map, (za + zb) / 2, atol=1e-5) and torch.allclose(mean_score, (sa + sb) / 2, atol=1e-4)
    max_map, max_score = FusedGraph(members, map_stats, score_stats, "max", (SIZE, SIZE))(image)
    assert torch.allclose(max_map, torch.maximum(za, zb), atol=1e-5)
    assert torch.allclose(max_score, torch.maximum(sa, sb), atol=1e-4)
    with pytest.raises(ValueError, match="sd 0"):
        FusedGraph(members, map_stats, np.array([[0.9, 0.0], [2.7, 0.3]]), "mean", (SIZE, SIZE))
    with pytest.raises(ValueError, match="at least two"):
        FusedGraph(members[:1], map_stats[:1], score_stats[:1], "mean", (SIZE, SIZE))


def _spec(data: Path, root: Path, params: dict, size: int = SIZE, seed: int = 0) -> RunSpec:
    """A seconds-long gaussian fit holding out a quarter of the images (fusion needs at least 4)."""
    train = TrainConfig(batch_size=8, seed=seed)
    params = {**params, "map_calibration": "none"}
    return RunSpec(method="gaussian", data=[data], image_size=size, runs_root=root, device="cpu", val_fraction=0.25,
                   train=train, params=params)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("fusion")
    data = generate_dataset(root / "data", size=SIZE, n_train=24, n_test_good=4, n_test_defect=4, seed=5)
    made = []
    for params in ({"weights": "random"}, {"weights": "random", "projection": "none", "image_score": "max"}):
        made.append(train_run(_spec(data, root / "runs", params), progress=False)[0])
    return data, made


@pytest.mark.slow  # two gaussian fits and an export: a minute on 2 cores
def test_auto_records_both_candidates_and_keeps_the_mean_unless_beaten(runs: tuple[Path, list[Path]]) -> None:
    _, (first, second) = runs
    graph, record = fuse_runs([first, second], "auto")
    assert set(record["pseudo_validation"]) == {"mean", "max"} and record["decision"]["default"] == "mean"
    assert record["how"] == graph.how == record["decision"]["chosen"]
    assert [m["method"] for m in record["members"]] == ["gaussian", "gaussian"]
    assert all(sd > 0 for _, sd in record["map_stats"]) and all(sd > 0 for _, sd in record["score_stats"])
    fixed, fixed_record = fuse_runs([first, second], "max")
    assert fixed.how == "max" and "pseudo_validation" not in fixed_record


@pytest.mark.slow  # two gaussian fits and an export: a minute on 2 cores
def test_runs_that_cannot_be_fused_are_refused(runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    data, (first, _) = runs
    bigger = train_run(_spec(data, tmp_path, {"weights": "random"}, size=SIZE + 8), progress=False)[0]
    with pytest.raises(ValueError, match="preprocesses differently"):
        fuse_runs([first, bigger])
    shuffled = _spec(data, tmp_path, {"weights": "random"}, seed=7)
    with pytest.raises(ValueError, match="held out other normal images"):
        fuse_runs([first, train_run(shuffled, progress=False)[0]])
    with pytest.raises(ValueError, match="auto, mean, max"):
        fuse_runs([first, first], "median")


@pytest.mark.slow  # two gaussian fits and an export: a minute on 2 cores
def test_a_fused_export_holds_both_members_with_parity(runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    data, (first, second) = runs
    out = tmp_path / "fused"
    export_run(
        first, out, ExportOptions(precision="fp32", data=data, fuse=(second,), fuse_how="mean"), log=lambda _: None
    )
    meta = load_metadata(out)
    assert meta["method"] == "gaussian+gaussian" and meta["notes"]["fusion"]["how"] == "mean"
    parity = meta["parity"]["torch_vs_onnxruntime_fp32"]
    # (a decision may flip: the threshold sits just above the normal scores, within FP32 rounding of one)
    assert parity["score_max_rel_error"] < 1e-4 and parity["map_max_rel_error"] < 1e-4
    with pytest.raises(ValueError, match="leave out --image-size"):
        ExportOptions(fuse=(second,), image_size=64).validate()
