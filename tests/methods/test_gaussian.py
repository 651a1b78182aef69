"""gaussian (OPCA): component selection, Mahalanobis against float64 NumPy, the graph, ONNX parity, real data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from edgead.config import RunConfig, TrainConfig
from edgead.data.preprocess import PreprocessConfig
from edgead.export.fp16 import HalfNetwork, mixed_precision_graph
from edgead.export.onnx import export_onnx
from edgead.methods.base import FitContext
from edgead.methods.gaussian.graph import GaussianGraph, PositionGaussians, StageGaussian
from edgead.methods.gaussian.method import GaussianOPCA
from edgead.methods.gaussian.positions import (
    PositionMoments,
    fit_position_gaussians,
    fit_stage_positions,
    ledoit_wolf,
)
from edgead.methods.gaussian.statistics import fit_gaussian, select_components
from edgead.train.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SIZE = 64


def make_method(run_dir: Path | None, image_size: int = SIZE, channels: int = 3, **params: Any) -> GaussianOPCA:
    config = RunConfig(
        method="gaussian",
        preprocess=PreprocessConfig(image_size=image_size, channels=channels).to_dict(),
        method_params={**GaussianOPCA.default_params(), **params},
    )
    return GaussianOPCA(config, run_dir)


def textures(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    """Smooth random images in [0, 1]: low-resolution noise upsampled, a stand-in for normal images."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 8, 8, generator=generator)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> GaussianOPCA:
    run_dir = tmp_path_factory.mktemp("gaussian-run")
    method = make_method(run_dir)
    summary = method.fit(FitContext(textures(32, seed=0), TrainConfig(batch_size=16), CPU, progress=False))
    assert [s["stage"] for s in summary["stages"]] == [3, 4, 5, 6, 7]
    assert summary["weights"]["weights"] == "imagenet" and summary["fit_seconds"] < 30
    assert all(1 <= s["image_kept"] <= s["channels"] for s in summary["stages"])
    return method


def test_select_components_keeps_the_least_variance_share() -> None:
    eigenvalues = np.array([0.3, 0.5, 1.2, 2.0, 4.0, 8.0, 24.0, 60.0])  # ascending, sum 100
    # Ascending cumulative shares 0.3, 0.8, 2.0, 4.0, 8.0 %: reaching 5 % needs the five smallest.
    assert select_components(eigenvalues, "opca", 0.05).tolist() == [0, 1, 2, 3, 4]
    assert select_components(eigenvalues, "opca", 0.004).tolist() == [0, 1]
    assert select_components(eigenvalues, "opca", 0.04).tolist() == [0, 1, 2, 3], "a share reached exactly counts"
    # Descending cumulative 60, 84, 92, 96 %: PCA-0.95 keeps the four largest.
    assert select_components(eigenvalues, "pca", 0.05).tolist() == [4, 5, 6, 7]
    assert select_components(eigenvalues, "none", 0.05).tolist() == list(range(8))
    with pytest.raises(ValueError, match="ascending"):
        select_components(eigenvalues[::-1], "opca", 0.05)
    with pytest.raises(ValueError, match="opca_fraction"):
        select_components(eigenvalues, "opca", 1.5)


def test_opca_recovers_the_least_variance_subspace_of_a_known_covariance() -> None:
    rng = np.random.default_rng(0)
    eigenvalues = np.array([60.0, 24.0, 8.0, 4.0, 2.0, 1.2, 0.5, 0.3])
    basis, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    samples = rng.normal(size=(20000, 8)) * np.sqrt(eigenvalues) @ basis.T + 3.0
    fit = fit_gaussian(samples, "opca", 0.05, "full")
    assert fit.kept.size == 5 and fit.shrinkage < 0.01
    true_kept = basis[:, 3:]  # eigenvalues 4, 2, 1.2, 0.5, 0.3
    recovered = fit.whitening / np.linalg.norm(fit.whitening, axis=0)
    np.testing.assert_allclose(recovered @ recovered.T, true_kept @ true_kept.T, atol=0.03)
    np.testing.assert_allclose(
        np.sort(1.0 / np.linalg.norm(fit.whitening, axis=0) ** 2), [0.3, 0.5, 1.2, 2, 4], rtol=0.05
    )


@pytest.mark.parametrize("projection", ["none", "opca", "pca"])
def test_mahalanobis_matches_a_float64_reference(projection: str) -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) + rng.normal(size=24)
    test = rng.normal(size=(2, 5, 24)) @ rng.normal(size=(24, 24)) * 1.5
    lw = LedoitWolf().fit(train)
    centred = test - lw.location_
    if projection == "none":  # eq. 3 with the shrunk covariance
        expected = np.sqrt(np.einsum("...i,ij,...j->...", centred, np.linalg.inv(lw.covariance_), centred))
    else:
        lam, vec = np.linalg.eigh(lw.covariance_)
        kept = select_components(lam, projection, 0.05)
        expected = np.sqrt(((centred @ vec[:, kept]) ** 2 / lam[kept]).sum(-1))
    gaussian = fit_gaussian(train, projection, 0.05, "full").module()
    got = gaussian(torch.tensor(test, dtype=torch.float32)).double().numpy()
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_paper_fit_order_fits_the_shrinkage_gaussian_in_the_kept_subspace() -> None:
    # Few samples for the channels: strong shrinkage, where the two orders part.
    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(40, 40)) * np.linspace(0.1, 3.0, 40)
    train = rng.normal(size=(60, 40)) @ mixing.T + 1.0
    test = rng.normal(size=(7, 40)) @ mixing.T * 1.3 + 1.0
    # Hand computation of the paper's order: eq. 2's sample covariance, its least-variance components
    # (Sec. 3.2), then Ledoit-Wolf on the projected features (Sec. 3.3) and eq. 3 in the kept subspace.
    mean = train.mean(axis=0)
    lam, vec = np.linalg.eigh(np.cov(train, rowvar=False))
    kept = select_components(lam, "opca", 0.05)
    lw = LedoitWolf(assume_centered=True).fit((train - mean) @ vec[:, kept])
    projected = (test - mean) @ vec[:, kept]
    expected = np.sqrt(np.einsum("ni,ij,nj->n", projected, np.linalg.inv(lw.covariance_), projected))
    paper = fit_gaussian(train, "opca", 0.05, order="paper")
    np.testing.assert_allclose(paper.distances(test), expected, rtol=1e-9)
    np.testing.assert_array_equal(paper.kept, kept)
    assert paper.shrinkage == pytest.approx(lw.shrinkage_)
    got = paper.module()(torch.tensor(test, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # The full order shrinks all 40 eigenvalues towards their mean first: the smallest grow, so the 5 % share
    # covers fewer of them and the kept variances are larger (smaller distances). Same shape contract.
    full = fit_gaussian(train, "opca", 0.05, order="full")
    assert full.kept.size < paper.kept.size
    assert np.all(full.distances(test) < paper.distances(test))
    assert full.whitening.shape[0] == paper.whitening.shape[0] == 40
    with pytest.raises(ValueError, match="fit_order"):
        fit_gaussian(train, "opca", 0.05, order="reverse")


def test_both_fit_orders_agree_without_shrinkage() -> None:
    # Many samples, few channels: Ledoit-Wolf barely shrinks, so the two orders give the same Gaussian
    # (up to sklearn's 1/m against eq. 2's 1/(m - 1), a constant factor on every distance).
    rng = np.random.default_rng(3)
    train = rng.normal(size=(20000, 6)) * np.array([2.0, 1.5, 1.2, 1.0, 0.8, 0.6])
    test = rng.normal(size=(5, 6))
    paper = fit_gaussian(train, "opca", 0.05, order="paper")
    full = fit_gaussian(train, "opca", 0.05, order="full")
    assert paper.shrinkage < 0.01 and full.shrinkage < 0.01
    np.testing.assert_array_equal(paper.kept, full.kept)
    np.testing.assert_allclose(paper.distances(test), full.distances(test), rtol=5e-3)


def test_graph_sums_stage_distances_and_averages_upsampled_maps(fitted: GaussianOPCA) -> None:
    graph = fitted.build_graph()
    images = textures(3, seed=5)
    anomaly_map, score = graph(images)
    again_map, again_score = graph(images)
    assert anomaly_map.shape == (3, SIZE, SIZE) and score.shape == (3,)
    assert torch.equal(anomaly_map, again_map) and torch.equal(score, again_score)
    assert torch.isfinite(score).all() and bool((anomaly_map.amax(dim=(1, 2)) > anomaly_map.amin(dim=(1, 2))).all())
    with torch.no_grad():
        features = graph.stage_features(images)
        expected_score = sum(g(f.mean(dim=(2, 3))) for g, f in zip(graph.image_gaussians, features, strict=True))
        maps = [
            F.interpolate(g(f.permute(0, 2, 3, 1))[:, None], size=(SIZE, SIZE), mode="bilinear")
            for g, f in zip(graph.map_gaussians, features, strict=True)
        ]
    torch.testing.assert_close(score, expected_score)
    torch.testing.assert_close(anomaly_map, torch.cat(maps, dim=1).mean(dim=1))
    # Batch composition does not change an image's result (fixed, per-image ops only).
    single_map, single_score = graph(images[1:2])
    torch.testing.assert_close(single_score, score[1:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single_map, anomaly_map[1:2], rtol=1e-5, atol=1e-5)


def test_load_rebuilds_the_same_graph(fitted: GaussianOPCA) -> None:
    loaded = GaussianOPCA.load(fitted.run_dir, fitted.config)
    images = textures(2, seed=6)
    for got, want in zip(loaded.build_graph()(images), fitted.build_graph()(images), strict=True):
        torch.testing.assert_close(got, want)
    rng_state = torch.get_rng_state()
    GaussianOPCA.load(fitted.run_dir, fitted.config)
    assert torch.equal(torch.get_rng_state(), rng_state), "loading must not consume the caller's random numbers"


def test_grayscale_pooled_and_random_variants(tmp_path: Path) -> None:
    method = make_method(tmp_path, channels=1, weights="random", projection="pca", map_statistics="pooled")
    summary = method.fit(FitContext(textures(12, seed=2, channels=1), TrainConfig(batch_size=6), CPU, progress=False))
    assert summary["weights"]["weights"] == "random"
    assert all(s["map_kept"] == s["image_kept"] for s in summary["stages"])
    anomaly_map, score = method.build_graph()(textures(2, seed=3, channels=1))
    assert anomaly_map.shape == (2, SIZE, SIZE) and torch.isfinite(score).all()
    with pytest.raises(ValueError, match="projection"):
        make_method(None, projection="reverse").params  # noqa: B018 - the property validates
    with pytest.raises(RuntimeError, match="fit"):
        make_method(None).build_graph()


def test_fp16_graph_keeps_the_distances_in_fp32(fitted: GaussianOPCA) -> None:
    mixed = mixed_precision_graph(fitted.build_graph())
    assert isinstance(mixed.backbone, HalfNetwork)
    assert all(buffer.dtype == torch.float32 for buffer in mixed.image_gaussians.buffers())
    assert mixed.adapter.scale.dtype == torch.float32


def test_onnx_export_matches_torch(fitted: GaussianOPCA, tmp_path: Path) -> None:
    graph: GaussianGraph = fitted.build_graph()
    images = textures(2, seed=9)
    info = export_onnx(graph, tmp_path / "gaussian.onnx", tuple(images.shape))
    assert info["opset"] >= 18
    session = ort.InferenceSession(str(tmp_path / "gaussian.onnx"), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run(None, {"image": images.numpy()})
    with torch.no_grad():
        torch_map, torch_score = graph(images)
    np.testing.assert_allclose(onnx_score, torch_score.numpy(), rtol=1e-4)
    np.testing.assert_allclose(onnx_map, torch_map.numpy(), rtol=1e-3, atol=1e-3 * float(torch_map.max()))


def hand_position_distances(train: np.ndarray, test: np.ndarray, projection: str, order: str, kept: int) -> np.ndarray:
    """Per-position statistics by hand, one position at a time with sklearn: ``train (N, C, h, w)``,
    ``test (B, h, w, C) -> (B, h, w)``, each position keeping ``kept`` components (the least-variance ones;
    the largest for pca)."""
    _, channels, height, width = train.shape
    index = slice(channels - kept, channels) if projection == "pca" else slice(0, kept)
    out = np.zeros(test.shape[:3])
    for i in range(height):
        for j in range(width):
            x, y = train[:, :, i, j].astype(np.float64), test[:, i, j].astype(np.float64)
            mean = x.mean(axis=0)
            if order == "paper":  # eq. 2, the kept components, then Ledoit-Wolf in the kept subspace
                _, vec = np.linalg.eigh(np.cov(x, rowvar=False))
                basis = vec[:, index]
                covariance = LedoitWolf(assume_centered=True).fit((x - mean) @ basis).covariance_
            else:  # Ledoit-Wolf on all channels, then the kept components of the shrunk covariance
                lam, vec = np.linalg.eigh(LedoitWolf().fit(x).covariance_)
                basis, covariance = vec[:, index], np.diag(lam[index])
            z = (y - mean) @ basis
            out[:, i, j] = np.sqrt(np.einsum("bi,ij,bj->b", z, np.linalg.inv(covariance), z))
    return out


def position_features(n: int, seed: int) -> np.ndarray:
    """``(n, 6, 2, 3)`` features whose channel variances differ from position to position, so the positions
    choose different kept counts."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.05, 3.0, size=(1, 6, 2, 3))
    return rng.normal(size=(n, 6, 6, 1, 1)).sum(axis=2) * 0.1 + rng.normal(size=(n, 6, 2, 3)) * scales + 1.0


@pytest.mark.parametrize("samples", [(7, 10), (50, 3), (20, 1)])
@pytest.mark.parametrize("assume_centered", [True, False])
def test_batched_ledoit_wolf_equals_sklearn(samples: tuple[int, int], assume_centered: bool) -> None:
    rng = np.random.default_rng(samples[0])
    x = rng.normal(size=(4, *samples)) * rng.uniform(0.1, 3.0, size=samples[1]) + 2.0  # 7 < 10: m < K too
    covariance, shrinkage = ledoit_wolf(torch.tensor(x), assume_centered=assume_centered)
    assert covariance.shape == (4, samples[1], samples[1]) and shrinkage.shape == (4,)
    for batch in range(4):
        lw = LedoitWolf(assume_centered=assume_centered).fit(x[batch])
        np.testing.assert_allclose(covariance[batch].numpy(), lw.covariance_, rtol=1e-10, atol=1e-13)
        assert shrinkage[batch].item() == pytest.approx(lw.shrinkage_, abs=1e-12)
    if samples == (7, 10):  # fewer samples than dimensions: still positive definite
        assert float(torch.linalg.eigvalsh(covariance).min()) > 0.0 and float(shrinkage.min()) > 0.1


@pytest.mark.parametrize("order", ["paper", "full"])
def test_per_position_distances_match_a_hand_computation(order: str) -> None:
    train, test = position_features(30, seed=3), position_features(4, seed=1).transpose(0, 2, 3, 1)
    fit = fit_position_gaussians(train, "opca", 0.2, order)
    # Each position's own count (Sec. 3.2 on its covariance), and K = their (upper) median for all positions.
    counts = []
    for i in range(2):
        for j in range(3):
            x = train[:, :, i, j]
            covariance = np.cov(x, rowvar=False) if order == "paper" else LedoitWolf().fit(x).covariance_
            counts.append(select_components(np.maximum(np.linalg.eigvalsh(covariance), 0.0), "opca", 0.2).size)
    assert fit.counts.tolist() == counts
    assert sorted(counts)[2] < sorted(counts)[3], "the case must tell the upper median from the lower one"
    assert fit.kept == sorted(counts)[3] and fit.bounded_from is None
    assert fit.whitening.shape == (6, 6, fit.kept) and fit.mean.shape == (6, 6)
    expected = hand_position_distances(train, test, "opca", order, fit.kept)
    np.testing.assert_allclose(fit.distances(test), expected, rtol=1e-8)
    module = fit.module()
    assert isinstance(module, PositionGaussians)
    got = module(torch.tensor(test, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    record = fit.map_record()
    assert record["map_kept"] == fit.kept and record["map_positions"] == 6 and "map_kept_bound" not in record
    assert record["map_kept_by_position"] == {"min": min(counts), "median": fit.kept, "max": max(counts)}


@pytest.mark.parametrize("projection", ["opca", "pca"])
def test_memory_bound_reduces_the_kept_count(projection: str) -> None:
    train, test = position_features(30, seed=2), position_features(3, seed=3).transpose(0, 2, 3, 1)
    free = fit_position_gaussians(train, projection, 0.1, "paper")
    assert free.kept > 2
    bounded = fit_position_gaussians(train, projection, 0.1, "paper", max_floats=6 * 6 * 2 + 5)
    assert bounded.kept == 2 and bounded.bounded_from == free.kept
    # opca keeps the least-variance components, pca its largest ones: the ones its projection ranks first.
    expected = hand_position_distances(train, test, projection, "paper", 2)
    np.testing.assert_allclose(bounded.distances(test), expected, rtol=1e-8)
    assert bounded.map_record()["map_kept_bound"] == {"max_position_floats": 77, "kept_before": free.kept, "kept": 2}
    unbound = fit_position_gaussians(train, projection, 0.1, "paper", max_floats=6 * 6 * free.kept)
    assert unbound.bounded_from is None and unbound.kept == free.kept, "a bound that fits changes nothing"


@pytest.mark.parametrize(("projection", "order"), [("opca", "paper"), ("opca", "full"), ("pca", "paper")])
def test_streamed_per_position_fit_equals_the_fit_on_all_maps(projection: str, order: str) -> None:
    """The two passes over uneven batches (as the backbone streams them) fit what the fit on all maps does."""
    train, test = position_features(31, seed=4), position_features(3, seed=5).transpose(0, 2, 3, 1)
    whole = fit_position_gaussians(train, projection, 0.2, order)
    # Shifted far from zero: the moments are summed around the first batch's mean, so this costs no precision.
    shifted = torch.tensor(train + 1e4)
    batches = [[shifted[start : start + size]] for start, size in [(0, 1), (1, 7), (8, 13), (21, 10)]]
    moments = PositionMoments()
    for (batch,) in batches:
        moments.add(batch)
    assert moments.count == 31 and moments.shape == (6, 2, 3)
    (streamed,) = fit_stage_positions([moments], reversed(batches), projection, 0.2, order)
    assert streamed.kept == whole.kept and streamed.counts.tolist() == whole.counts.tolist()
    np.testing.assert_allclose(streamed.shrinkage, whole.shrinkage, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(streamed.distances(test + 1e4), whole.distances(test), rtol=1e-6)
    with pytest.raises(ValueError, match="pass 2 saw 8 images' features, pass 1 31"):
        fit_stage_positions([moments], batches[:2], projection, 0.2, order)
    with pytest.raises(ValueError, match=r"changed shape from \(6, 2, 3\) to \(6, 3, 3\)"):
        moments.add(torch.zeros(2, 6, 3, 3))


#: Per-position floats of the fixture run: binds the deep stages of a 64 px run, not the shallow ones.
POSITION_BOUND = 100_000


@pytest.fixture(scope="module")
def per_position(tmp_path_factory: pytest.TempPathFactory) -> tuple[GaussianOPCA, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("gaussian-per-position")
    method = make_method(
        run_dir, weights="random", map_statistics="per_position", opca_fraction=0.05,
        max_position_floats=POSITION_BOUND,
    )  # fmt: skip
    summary = method.fit(FitContext(textures(12, seed=1), TrainConfig(batch_size=6), CPU, progress=False))
    return method, summary


def test_per_position_fit_records_its_counts_and_the_bound(per_position: tuple[GaussianOPCA, dict[str, Any]]) -> None:
    method, summary = per_position
    assert "map_statistics_selection" not in summary and "opca_selection" not in summary
    bounded = []
    for stage, module in zip(summary["stages"], method.build_graph().map_gaussians, strict=True):
        positions = stage["feature_size"][0] * stage["feature_size"][1]
        assert isinstance(module, PositionGaussians) and stage["map_positions"] == positions
        assert tuple(module.whitening.shape) == (positions, stage["channels"], stage["map_kept"])
        assert stage["map_vectors"] == 12, "every training image at every position"
        before = stage["map_kept_by_position"]["median"]
        if positions * stage["channels"] * before > POSITION_BOUND:
            assert stage["map_kept_bound"]["kept_before"] == before
            assert stage["map_kept"] == POSITION_BOUND // (positions * stage["channels"]) < before
            bounded.append(stage["stage"])
        else:
            assert "map_kept_bound" not in stage and stage["map_kept"] == before
        assert module.whitening.numel() <= max(POSITION_BOUND, positions * stage["channels"])
    assert 0 < len(bounded) < len(summary["stages"]), f"the bound should cut some stages, not all: {bounded}"


def test_per_position_fit_without_the_maps_runs_the_backbone_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the bound on kept maps, pass 2 of the per-position fit reruns the backbone: the same statistics
    (more images than channels, so every kept component has training variance and the fit is well posed)."""
    from edgead.methods.gaussian import features
    from edgead.methods.gaussian import method as method_module

    calls = []
    original = features.stage_batches

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("label", "features"))
        return original(*args, **kwargs)

    monkeypatch.setattr(features, "stage_batches", counted)
    monkeypatch.setattr(method_module, "stage_batches", counted)
    images, fits = textures(100, seed=1), []
    for keep_bytes in (features.KEEP_MAPS_BYTES, 0):
        monkeypatch.setattr(features, "KEEP_MAPS_BYTES", keep_bytes)
        method_module._FEATURE_CACHE.clear()
        method = make_method(
            tmp_path / str(keep_bytes), weights="random", map_statistics="per_position", opca_fraction=0.05,
            stages=[3, 4],
        )  # fmt: skip
        summary = method.fit(FitContext(images, TrainConfig(batch_size=16 if keep_bytes else 7), CPU, progress=False))
        fits.append((method.build_graph(), summary, bool(method_module._FEATURE_CACHE["value"].maps)))
    assert calls == ["features", "features", "per-position statistics, pass 2"], "pass 2 reran the backbone"
    (kept, kept_summary, had_maps), (streamed, streamed_summary, streamed_maps) = fits
    assert had_maps and not streamed_maps
    for got, expected in zip(streamed_summary["stages"], kept_summary["stages"], strict=True):
        assert got["map_shrinkage"] == pytest.approx(expected["map_shrinkage"], abs=1e-4)
        assert {**got, "map_shrinkage": 0} == {**expected, "map_shrinkage": 0}
    test = textures(2, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(streamed(test), kept(test), rtol=1e-4, atol=1e-4)


def test_per_position_graph_exports_to_onnx(per_position: tuple[GaussianOPCA, dict[str, Any]], tmp_path: Path) -> None:
    graph: GaussianGraph = per_position[0].build_graph()
    images = textures(2, seed=9)
    with torch.no_grad():
        torch_map, torch_score = graph(images)
    export_onnx(graph, tmp_path / "per_position.onnx", tuple(images.shape))  # the export users run (opset 18)
    session = ort.InferenceSession(str(tmp_path / "per_position.onnx"), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run(None, {"image": images.numpy()})
    np.testing.assert_allclose(onnx_score, torch_score.numpy(), rtol=1e-4)
    np.testing.assert_allclose(onnx_map, torch_map.numpy(), rtol=1e-3, atol=1e-3 * float(torch_map.max()))
    # The per-position distances alone through the TorchScript tracer at opset 17: fixed shapes, a MatMul.
    module = graph.map_gaussians[0]
    with torch.no_grad():
        features = graph.stage_features(images)[0].permute(0, 2, 3, 1).contiguous()
        expected = module(features).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (features,), str(tmp_path / "positions17.onnx"), opset_version=17, dynamo=False)
    model = onnx.load(str(tmp_path / "positions17.onnx"))
    assert model.opset_import[0].version == 17 and "MatMul" in {node.op_type for node in model.graph.node}
    session = ort.InferenceSession(str(tmp_path / "positions17.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: features.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.max()))


def test_per_position_run_loads_identically(per_position: tuple[GaussianOPCA, dict[str, Any]]) -> None:
    method = per_position[0]
    loaded = GaussianOPCA.load(method.run_dir, method.config).build_graph()
    assert all(isinstance(module, PositionGaussians) for module in loaded.map_gaussians)
    images = textures(2, seed=6)
    with torch.no_grad():
        (anomaly_map, score), (want_map, want_score) = loaded(images), method.build_graph()(images)
        # The map: each stage's per-position distances, upsampled and averaged as for "positions".
        features = loaded.stage_features(images)
        stage_maps = [
            F.interpolate(g(f.permute(0, 2, 3, 1))[:, None], size=(SIZE, SIZE), mode="bilinear")
            for g, f in zip(loaded.map_gaussians, features, strict=True)
        ]
    assert torch.equal(anomaly_map, want_map) and torch.equal(score, want_score)
    torch.testing.assert_close(anomaly_map, torch.cat(stage_maps, dim=1).mean(dim=1))


def test_auto_choices_without_a_held_out_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    method = make_method(tmp_path, weights="random")  # opca_fraction and map_statistics "auto"
    passes = []
    original = GaussianOPCA.stage_features
    monkeypatch.setattr(GaussianOPCA, "stage_features", lambda *a: passes.append(1) or original(*a))
    summary = method.fit(FitContext(textures(16, seed=4), TrainConfig(batch_size=8), CPU, progress=False))
    opca, maps = method.config.state["opca_selection"], method.config.state["map_statistics_selection"]
    # No held-out split: the base class falls back to the training images, and the records say so.
    assert opca["validation"] == maps["validation"] == "16 training images (no held-out split)"
    tried = opca["calibration"]["reference_auroc_by_strength"]
    assert len(passes) == len(tried), "the chosen set's features come from the calibration, not a new pass"
    assert opca["pseudo_validation_image_auroc"]["0.05"] == tried[str(opca["strength"])]
    assert opca["decision"]["default"] == 0.05 and opca["selected"] == opca["decision"]["chosen"]
    assert method.params.opca_fraction == opca["selected"] and "kept_default" in opca["decision"]
    assert set(maps["pseudo_validation"]) == {"positions", "pooled", "per_position"}
    decision = maps["decision"]
    assert decision["default"] == "positions" and maps["selected"] == decision["chosen"] == method.params.map_statistics
    # eq. 4's pooled score gives every candidate the same image AUROC: only the paired localisation can move
    # the choice away from the default, and then by more than its standard error
    assert len({row["image_auroc"] for row in maps["pseudo_validation"].values()}) == 1
    if decision["kept_default"]:
        assert maps["selected"] == "positions"
    else:
        assert decision["pixel_margin"] > decision["pixel_standard_error"]
    assert summary["map_statistics_selection"] == maps
    per_position = maps["selected"] == "per_position"
    assert ("map_positions" in summary["stages"][0]) == per_position
    assert isinstance(method.build_graph().map_gaussians[0], StageGaussian) != per_position


REAL_DATA_ROOT = os.environ.get("EDGEAD_DATA_ROOT")


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA_ROOT, reason="EDGEAD_DATA_ROOT is not set")
def test_pretrained_features_beat_random_ones_on_magnetic_tile(tmp_path: Path) -> None:
    from edgead.data.mvtec import list_test, list_train, load_images
    from edgead.metrics import image_auroc

    root = Path(str(REAL_DATA_ROOT)) / "magnetic_tile"
    train = list_train(root)
    train = [train[i] for i in np.linspace(0, len(train) - 1, 120).round().astype(int)]
    test = list_test(root)
    good = [s for s in test if s.label == 0]
    bad = [s for s in test if s.label == 1]
    test = [good[i] for i in np.linspace(0, len(good) - 1, 60).round().astype(int)]
    test += [bad[i] for i in np.linspace(0, len(bad) - 1, 60).round().astype(int)]
    labels = np.array([s.label for s in test])
    results = {}
    for weights in ("imagenet", "random"):
        method = make_method(tmp_path / weights, image_size=128, weights=weights)
        pre = method.preprocess_config
        method.fit(
            FitContext(torch.from_numpy(load_images(train, pre)), TrainConfig(batch_size=30), CPU, progress=False)
        )
        with torch.no_grad():
            _, scores = method.build_graph()(torch.from_numpy(load_images(test, pre)))
        results[weights] = image_auroc(labels, scores.numpy())
    print(f"magnetic_tile image AUROC (120 train, 120 test, 128 px): {results}")
    assert results["imagenet"] >= results["random"] + 0.1, results


def test_input_scaling_follows_the_weights() -> None:
    from edgead.nn.backbones import input_normalisation

    assert input_normalisation("efficientnet_lite0", "imagenet") == "inception"  # the TF Lite0 release: [-1, 1]
    assert input_normalisation("efficientnet_lite0", "random") == "imagenet"
    assert input_normalisation("resnet18", "weights.safetensors") == "imagenet"


def test_auto_settings_are_resolved_and_recorded(tmp_path: Path) -> None:
    from edgead.data.synthetic import generate_dataset
    from edgead.pipeline import train_run
    from edgead.spec import RunSpec

    data = generate_dataset(tmp_path / "data", size=32, n_train=30, n_test_good=2, n_test_defect=2, seed=3)
    spec = RunSpec(method="gaussian", data=[data], image_size=32, runs_root=tmp_path / "runs", device="cpu")
    run_dir, summary = train_run(spec, progress=False)
    config = RunConfig.load(run_dir)
    selection = config.state["opca_selection"]
    assert config.method_params["input_scaling"] == "inception" and summary["input_scaling"] == "inception"
    assert set(selection["pseudo_validation_image_auroc"]) == {"0.01", "0.02", "0.05", "0.1"}
    # The paper's 0.05 stays unless the best beats it by more than one standard error; the run keeps the chosen.
    decision = selection["decision"]
    assert decision["default"] == 0.05 and decision["chosen"] == selection["selected"]
    figures = selection["pseudo_validation_image_auroc"]
    assert figures[str(decision["best"])] == max(figures.values())
    assert config.method_params["opca_fraction"] == selection["selected"]
    assert selection["n_normal"] == selection["n_pseudo"] == 3 and selection["validation"] == "3 held-out normal images"
    assert config.method_params["fit_order"] == "paper"
    # map_statistics="auto": the three candidates' graphs scored by the service on the same calibrated set.
    maps = config.state["map_statistics_selection"]
    assert set(maps["pseudo_validation"]) == {"positions", "pooled", "per_position"}
    assert config.method_params["map_statistics"] == maps["selected"] == summary["map_statistics_selection"]["selected"]
    assert maps["decision"]["chosen"] == maps["selected"] and maps["decision"]["default"] == "positions"
    assert (maps["strength"], maps["kinds"]) == (selection["strength"], selection["kinds"]), "one calibrated set"
    rows = maps["pseudo_validation"]
    assert len({row["image_auroc"] for row in rows.values()}) == 1, "eq. 4 does not use the map"
    assert maps["selected"] == "positions" and maps["decision"]["kept_default"], "equal image AUROCs keep the default"

    # The choice the pseudo-validation service made, recomputed by hand: the same calibrated set (the run's
    # held-out normals + pseudo-anomalies of the recorded kinds and strength, seed 0), eq. 4's pooled score per
    # candidate, image AUROC rounded to four digits, then the one-standard-error rule around 0.05.
    from edgead.data.holdout import load_holdout
    from edgead.data.pseudo import pseudo_validation_set
    from edgead.methods import load_method
    from edgead.methods.gaussian.method import _FEATURE_CACHE, collect_features
    from edgead.methods.validation import keep_default_unless_beaten
    from edgead.metrics import image_auroc

    graph = load_method(run_dir).build_graph()
    rgb, _ = load_holdout(run_dir, config.data["holdout"])
    pre = PreprocessConfig.from_dict(config.preprocess)
    images, labels, _ = pseudo_validation_set(
        rgb, pre, seed=0, kinds=selection["kinds"], strength=selection["strength"]
    )
    pooled_train = _FEATURE_CACHE["value"].pooled  # the fit's training features
    pooled_val = collect_features(graph.adapter, graph.backbone, torch.from_numpy(images),
                                  batch_size=TrainConfig().batch_size,
                                  device=torch.device("cpu"), max_map_vectors=0, seed=0).pooled  # fmt: skip
    candidates = [0.01, 0.02, 0.05, 0.1]
    expected = {}
    for fraction in candidates:
        scores = sum(
            fit_gaussian(t, "opca", fraction, config.method_params["fit_order"]).distances(v)
            for t, v in zip(pooled_train, pooled_val, strict=True)
        )
        expected[str(fraction)] = round(float(image_auroc(labels, scores)), 4)
    assert figures == expected
    # The set was calibrated on the default: its reference AUROC at the chosen strength is 0.05's figure.
    assert selection["calibration"]["reference_auroc_by_strength"][str(selection["strength"])] == figures["0.05"]
    rows = {f: {"image_auroc": expected[str(f)], "n_normal": 3, "n_pseudo": 3} for f in candidates}
    assert selection["selected"] == keep_default_unless_beaten(rows, 0.05)[0]
