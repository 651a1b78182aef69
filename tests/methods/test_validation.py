"""The pseudo-validation service (edgead.methods.validation): one set, one way to compute the figures and to
choose, the choice recorded in the run's state; and the layering rule that methods never import edgead.tune."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import edgead.methods
from edgead.config import RunConfig, TrainConfig
from edgead.data import holdout
from edgead.data.mvtec import list_train
from edgead.data.preprocess import PreprocessConfig
from edgead.data.synthetic import generate_dataset
from edgead.methods.base import FitContext
from edgead.methods.gaussian.method import GaussianOPCA
from edgead.methods.score_tscale.method import rank_feature_maps
from edgead.methods.validation import (
    STRENGTHS,
    PseudoValidationSet,
    calibrated_set,
    keep_default_unless_beaten,
    per_image_pixel_auroc,
    pseudo_figures,
    ranked,
)
from edgead.metrics import image_auroc, pixel_auroc
from edgead.train.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SIZE = 32


# The computations the service replaced, kept verbatim as references: edgead.tune.pseudo_figures and
# score-tscale's rank_feature_maps before the refactor.
def _former_pseudo_figures(labels: np.ndarray, masks: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> dict:
    if maps.shape[-2:] != masks.shape[-2:]:
        maps = np.stack([cv2.resize(m, masks.shape[-2:][::-1], interpolation=cv2.INTER_LINEAR) for m in maps])
    defect = labels == 1
    return {
        "image_auroc": round(float(image_auroc(labels, scores)), 4),
        "pixel_auroc": round(float(pixel_auroc(masks[defect], maps[defect])), 4),
        "n_normal": int((~defect).sum()),
        "n_pseudo": int(defect.sum()),
    }


def _former_rank_feature_maps(maps: dict, labels: np.ndarray, masks: np.ndarray, combine: str, keep: int) -> tuple:
    def quality(m: np.ndarray) -> dict[str, float]:
        scores = m.reshape(len(m), -1).max(axis=1)
        img = image_auroc(labels, scores)
        pix = pixel_auroc(masks[labels == 1], m[labels == 1])
        return {"image_auroc": round(img, 4), "pixel_auroc": round(pix, 4), "criterion": round((img + pix) / 2, 4)}

    candidates = {name: quality(m) for name, m in maps.items()}
    order = sorted(candidates, key=lambda n: candidates[n]["criterion"], reverse=True)
    prefixes = {}
    for k in range(1, min(keep, len(order)) + 1):
        combined = None
        for name in order[:k]:
            m = maps[name].astype(np.float64)
            combined = m if combined is None else (combined * m if combine == "product" else combined + m)
        prefixes[",".join(order[:k])] = quality(combined)
    best = max(prefixes, key=lambda key: prefixes[key]["criterion"])
    return best.split(","), {"candidates": candidates, "prefixes": prefixes, "selected": best.split(",")}


def _problem(seed: int, n: int = 12, size: int = 8) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Labels, masks and a few maps coarse enough (quantised) that figures tie."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n // 2, dtype=int), np.ones(n // 2, dtype=int)]
    masks = np.zeros((n, size, size), dtype=bool)
    masks[n // 2 :, 2:5, 3:6] = True
    maps = [np.round(rng.random((n, size, size)) * 3 + masks * rng.random(), 1).astype(np.float32) for _ in range(5)]
    return labels, masks, maps


def _set(labels: np.ndarray, masks: np.ndarray) -> PseudoValidationSet:
    images = np.zeros((len(labels), 3, *masks.shape[-2:]), np.float32)
    return PseudoValidationSet(images, labels, masks, f"{(labels == 0).sum()} held-out normal images")


@pytest.mark.parametrize("seed", range(6))
def test_figures_are_the_former_tune_figures(seed: int) -> None:
    labels, masks, maps = _problem(seed)
    for m in maps:
        scores = m.reshape(len(m), -1).mean(axis=1)
        assert pseudo_figures(labels, masks, m, scores) == _former_pseudo_figures(labels, masks, m, scores)
        small = m[:, ::2, ::2].copy()  # a map at another size is resized to the masks
        assert pseudo_figures(labels, masks, small, scores) == _former_pseudo_figures(labels, masks, small, scores)
    only_image = pseudo_figures(labels, masks, None, maps[0].max(axis=(1, 2)))
    assert set(only_image) == {"image_auroc", "n_normal", "n_pseudo"}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("combine", ["product", "sum"])
def test_feature_map_ranking_is_the_former_one(seed: int, combine: str) -> None:
    labels, masks, maps = _problem(seed)
    named = {"copy3": maps[3].copy(), **{f"tap{i}": m for i, m in enumerate(maps)}}  # exact ties: order decides
    selected, record = rank_feature_maps(named, labels, masks, combine, keep=3)
    former_selected, former = _former_rank_feature_maps(named, labels, masks, combine, keep=3)
    assert selected == former_selected and list(record["prefixes"]) == list(former["prefixes"])
    for part in ("candidates", "prefixes"):
        for name, row in former[part].items():
            assert {k: record[part][name][k] for k in row} == row  # the same figures (plus the set's counts)


def test_choice_is_image_then_pixel_auroc_and_the_earlier_candidate_on_exact_ties() -> None:
    rows = {
        "a": {"image_auroc": 0.8, "pixel_auroc": 0.6},
        "b": {"image_auroc": 0.9, "pixel_auroc": 0.5},
        "c": {"image_auroc": 0.9, "pixel_auroc": 0.7},
        "d": {"image_auroc": 0.9, "pixel_auroc": 0.7},
    }
    assert ranked(rows) == ["c", "d", "b", "a"]
    assert ranked({"x": {"image_auroc": 0.5}, "y": {"image_auroc": 0.5}})[0] == "x"  # scores only: image AUROC
    assert ranked({"x": {"criterion": 0.6}, "y": {"criterion": 0.7}}, "mean") == ["y", "x"]
    # what tune_run did before: max over the rows by (image, pixel)
    former = max(range(len(rows)), key=lambda i: tuple(list(rows.values())[i].values()))
    assert list(rows)[former] == ranked(rows)[0]


class _MeanGraph(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = (image * self.weight).mean(dim=1)
        return anomaly_map, anomaly_map.amax(dim=(1, 2))


def test_graph_and_callable_candidates_are_evaluated_alike_in_order() -> None:
    labels, masks, _ = _problem(0)
    rng = np.random.default_rng(1)
    images = (rng.random((len(labels), 3, 8, 8)) + masks[:, None]).astype(np.float32)
    validation = PseudoValidationSet(images, labels, masks, "test")
    calls = []

    def as_callable(weight: float) -> Any:
        def outputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            calls.append(weight)
            anomaly_map = (x * weight).mean(axis=1)
            return anomaly_map, anomaly_map.max(axis=(1, 2))

        return outputs

    choice = validation.choose({"graph": _MeanGraph(-1.0), "callable": as_callable(-1.0), "better": as_callable(1.0)})
    assert choice.rows["graph"] == choice.rows["callable"]
    assert choice.best == "better" and calls == [-1.0, 1.0]
    assert choice.by_name()["better"]["image_auroc"] == 1.0


def _method(run_dir: Path | None, data: dict[str, Any] | None = None) -> GaussianOPCA:
    config = RunConfig(
        method="gaussian",
        preprocess=PreprocessConfig(image_size=SIZE).to_dict(),
        method_params=GaussianOPCA.default_params(),
        data=data or {},
    )
    return GaussianOPCA(config, run_dir)


@pytest.fixture(scope="module")
def normals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    data = generate_dataset(tmp_path_factory.mktemp("normals"), size=SIZE, n_train=8, n_test_good=1, n_test_defect=1)
    return [s.path for s in list_train(data)]


def _context(n: int) -> FitContext:
    images = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return FitContext(images, TrainConfig(), CPU, progress=False)


def test_the_set_is_built_once_from_the_held_out_normals(normals: list[Path], tmp_path: Path, monkeypatch) -> None:
    record = holdout.save_holdout(tmp_path, normals[:5], PreprocessConfig(image_size=SIZE))
    method = _method(tmp_path, {"holdout": record})
    built = []
    original = PseudoValidationSet.from_normals.__func__
    monkeypatch.setattr(
        PseudoValidationSet, "from_normals", classmethod(lambda cls, *a, **k: built.append(1) or original(cls, *a, **k))
    )
    first = method.pseudo_validation_set(_context(6), limit=4)
    assert method.pseudo_validation_set(_context(6), limit=4) is first and len(built) == 1
    assert first.describe() == {
        "validation": "4 held-out normal images", "n_normal": 4, "n_pseudo": 4, "kinds": ["paste"], "strength": 1.0
    }  # fmt: skip
    assert first.images.shape == (8, 3, SIZE, SIZE) and first.masks[4:].any() and not first.masks[:4].any()
    assert method.pseudo_validation_set().n_normal == 5  # without ctx (edgead tune): every held-out image


def test_without_a_held_out_split_the_fit_uses_training_images_and_tune_refuses(tmp_path: Path) -> None:
    method = _method(tmp_path, {"holdout": None})
    assert method.pseudo_validation_set(_context(6)).source == "6 training images (no held-out split)"
    with pytest.raises(ValueError, match="at least two held-out normal images"):
        _method(tmp_path).pseudo_validation_set()


def test_held_out_normals_are_found_in_one_place(normals: list[Path], tmp_path: Path) -> None:
    pre = PreprocessConfig(image_size=SIZE)
    stored = {"holdout": holdout.save_holdout(tmp_path, normals[:3], pre), "validation_paths": [str(normals[0])]}
    images, origin = holdout.held_out_normals(tmp_path, stored)
    assert origin == holdout.STORED and len(images) == 3
    older = {"validation_paths": [str(p.resolve()) for p in normals[:2]] + ["relative.png"]}  # before holdout.npz
    images, origin = holdout.held_out_normals(tmp_path, older)
    assert origin == holdout.DATASET and len(images) == 2
    assert holdout.held_out_normals(tmp_path, {}) == ([], "")


def test_a_choice_is_recorded_in_the_state_without_parsing_the_config_again(monkeypatch) -> None:
    method = _method(None)

    def refuse(values: Any) -> Any:
        raise AssertionError("the config was parsed again")

    monkeypatch.setattr(method, "parse_params", refuse)
    record = {"selected": 0.02, "pseudo_validation_image_auroc": {"0.01": 0.5, "0.02": 0.75}}
    method.record_choice("opca_selection", record, {"opca_fraction": 0.02})
    assert method.params.opca_fraction == 0.02 and method.config.method_params["opca_fraction"] == 0.02
    assert method.config.state["opca_selection"] == record
    method.record_choice("feature_selection", {"selected": ["enc1"]})  # a record only: no parameter changes
    assert method.config.method_params["opca_fraction"] == 0.02 and "feature_selection" in method.config.state


def test_no_method_module_imports_tune() -> None:
    """Methods sit below the flows (ARCHITECTURE.md): nothing under edgead/methods imports edgead.tune."""
    offenders = []
    for path in Path(edgead.methods.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            offenders += [
                f"{path.name}: {name}" for name in names if name == "edgead.tune" or name.startswith("edgead.tune.")
            ]
    assert not offenders, offenders


def _rows(aurocs: dict[str, float], n: int = 30) -> dict[str, dict[str, Any]]:
    return {name: {"image_auroc": a, "pixel_auroc": 0.5, "n_normal": n, "n_pseudo": n} for name, a in aurocs.items()}


def test_the_default_stays_unless_beaten_by_more_than_one_standard_error() -> None:
    # 30 + 30 images at AUROC 0.8: Hanley-McNeil's error is about 0.057
    chosen, decision = keep_default_unless_beaten(_rows({"paper": 0.80, "other": 0.85}), "paper")
    assert chosen == "paper" and decision["kept_default"] and decision["best"] == "other"
    assert 0.05 < decision["standard_error"] < 0.07 and decision["margin"] == 0.05 and "why" in decision
    chosen, decision = keep_default_unless_beaten(_rows({"paper": 0.70, "other": 0.85}), "paper")
    assert chosen == "other" and not decision["kept_default"]
    # the same margin on a set ten times larger is resolved
    assert keep_default_unless_beaten(_rows({"paper": 0.80, "other": 0.85}, n=300), "paper")[0] == "other"
    # without a default: the best; a tuple key is recorded as a list
    assert keep_default_unless_beaten(_rows({"a": 0.7, "b": 0.9}), None)[0] == "b"
    _, decision = keep_default_unless_beaten(
        {("p", 2): _rows({"x": 0.9})["x"], ("n", 3): _rows({"x": 0.92})["x"]}, ("p", 2)
    )
    assert decision["chosen"] == ["p", 2] and decision["best"] == ["n", 3]


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8), (0, 0), 2)
    return [np.clip(base.astype(int) + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def test_a_calibrated_set_is_the_strongest_the_reference_does_not_saturate() -> None:
    normals = _images(12, 0)
    pre = PreprocessConfig(image_size=SIZE)
    seen: list[float] = []

    def reference(validation: PseudoValidationSet) -> float:  # a scorer that sees strong defects only
        seen.append(validation.strength)
        return {1.0: 1.0, 0.6: 0.97, 0.4: 0.88}.get(validation.strength, 0.6)

    validation = calibrated_set(normals, pre, "12 normals", reference)
    assert seen == [1.0, 0.6, 0.4] and validation.strength == 0.4
    record = validation.describe()
    assert record["calibration"]["reference_auroc_by_strength"] == {"1.0": 1.0, "0.6": 0.97, "0.4": 0.88}
    assert set(record["kinds"]) >= {"paste", "speck", "blemish", "scratch"}
    # the same defects at every strength, only fainter: the masks agree and the change shrinks
    strong = PseudoValidationSet.from_normals(normals, pre, "s", kinds=record["kinds"], strength=1.0)
    assert np.array_equal(strong.masks, validation.masks)
    normal_part = strong.images[: len(normals)]
    change = lambda s: np.abs(s.images[len(normals) :] - normal_part).sum()  # noqa: E731
    assert 0 < change(validation) < change(strong)
    # a reference that never drops below the target: the faintest strength, and the record says so
    saturated = calibrated_set(normals, pre, "12 normals", lambda s: 0.99)
    assert saturated.strength == min(STRENGTHS)
    assert len(saturated.calibration["reference_auroc_by_strength"]) == len(STRENGTHS)


def test_a_map_only_choice_is_decided_by_paired_per_image_localisation() -> None:
    rows = _rows({"default": 0.9, "sharper": 0.9})  # the same image score: only the maps differ
    rng = np.random.default_rng(0)
    default_pixels = rng.uniform(0.6, 0.8, 30)
    better = {"default": default_pixels, "sharper": default_pixels + rng.uniform(0.05, 0.15, 30)}
    chosen, decision = keep_default_unless_beaten(rows, "default", paired=better)
    assert chosen == "default"  # ranked by image AUROC, pixel from the rows: a tie keeps the earlier
    rows["sharper"]["pixel_auroc"] = 0.6  # the pooled pixel AUROC ranks it first
    chosen, decision = keep_default_unless_beaten(rows, "default", paired=better)
    assert chosen == "sharper" and decision["pixel_margin"] > decision["pixel_standard_error"] > 0
    noisy = {"default": default_pixels, "sharper": default_pixels + rng.normal(0.0, 0.1, 30)}
    assert keep_default_unless_beaten(rows, "default", paired=noisy)[0] == "default"


def test_per_image_pixel_auroc_is_each_images_own_localisation() -> None:
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    masks[1, :, :4] = True
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0, 2:4, 2:4] = 1.0  # perfect
    maps[1, :, 4:] = 1.0  # inverted
    values = per_image_pixel_auroc(masks, maps)
    assert values[0] == 1.0 and values[1] == 0.0 and np.isnan(values[2])  # the third has no defect pixel
