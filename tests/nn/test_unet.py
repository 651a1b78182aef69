"""Score U-Net: presets, feature taps, time conditioning, output scaling and ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgead.nn.unet import ScoreUNet, UNetConfig, count_parameters

PAPER_PARAMS = 17.8e6


def _model(name: str = "tiny", seed: int = 0, **overrides: object) -> ScoreUNet:
    torch.manual_seed(seed)
    data = UNetConfig.preset(name).to_dict() | overrides
    return ScoreUNet(UNetConfig.from_dict(data)).eval()


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_output_shape_matches_input(name: str) -> None:
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x, torch.tensor([0.2, 0.9]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_parameter_counts() -> None:
    assert count_parameters(_model("tiny")) < 1_000_000
    assert 1_000_000 < count_parameters(_model("small")) < 10_000_000
    paper = _model("paper")
    assert abs(count_parameters(paper) - PAPER_PARAMS) <= 0.05 * PAPER_PARAMS
    with torch.no_grad():
        out = paper(torch.randn(1, 3, 32, 32), torch.tensor([0.5]))
    assert out.shape == (1, 3, 32, 32)


def test_single_channel_preset() -> None:
    model = ScoreUNet(UNetConfig.preset("tiny", in_channels=1))
    assert model(torch.randn(1, 1, 32, 32), torch.tensor(0.5)).shape == (1, 1, 32, 32)


def test_feature_taps_match_feature_shapes() -> None:
    model = _model("tiny")
    size = (32, 64)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out, features = model(x, torch.tensor([0.1, 0.7]), return_features=True)
    expected = model.feature_shapes(size)
    levels = len(model.config.channel_mult)
    names = [f"enc{i}" for i in range(levels)] + ["mid"] + [f"dec{i}" for i in reversed(range(levels - 1))]
    assert list(features) == list(expected) == names
    for name, feature in features.items():
        assert tuple(feature.shape) == (2, *expected[name]), name
    assert expected["dec0"][1:] == size and expected["mid"][1:] == (4, 8)
    assert model.feature_names()["enc3"] == (32, 8)
    torch.testing.assert_close(out, model(x, torch.tensor([0.1, 0.7])))


def test_paper_feature_widths_follow_the_halving_decoder() -> None:
    model = ScoreUNet(UNetConfig.preset("paper"))
    shapes = model.feature_shapes(256)
    assert shapes["enc4"] == shapes["mid"] == (512, 16, 16)
    assert [shapes[f"dec{i}"][0] for i in (3, 2, 1, 0)] == [256, 128, 64, 64]


@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_time_conditioning_changes_output(embedding: str) -> None:
    model = _model("tiny", time_embedding=embedding)
    x = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model(x, torch.tensor([0.05, 0.95]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    with torch.no_grad():
        scalar_t = model(x, torch.tensor(0.3))
        batch_t = model(x, torch.full((2,), 0.3))
    torch.testing.assert_close(scalar_t, batch_t)


def test_fourier_weights_are_seeded_and_saved() -> None:
    a, b, c = _model(seed=1), _model(seed=2), _model(seed=3, fourier_seed=1)
    weight = "time_embed.0.weight"
    assert weight in a.state_dict()
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    assert a.state_dict()[weight].std() > 5.0  # scale 16


def test_sigma_output_scaling() -> None:
    plain, scaled = _model(), _model(output_scaling="sigma")
    scaled.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.6])
    sigma = torch.tensor([0.5, 4.0])
    with torch.no_grad():
        expected = plain(x, t) / sigma[:, None, None, None]
        torch.testing.assert_close(scaled(x, t, sigma), expected)
        torch.testing.assert_close(scaled(x, t, torch.tensor(2.0)), plain(x, t) / 2.0)
    with pytest.raises(ValueError, match="sigma"):
        scaled(x, t)


def test_backward_reaches_every_parameter_and_input_untouched() -> None:
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    x_copy = x.clone()
    model(x, torch.rand(2)).square().mean().backward()
    assert torch.equal(x, x_copy)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(base_channels=12, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), embed_dim=16)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(2,), embed_dim=16)
    with pytest.raises(ValueError, match="time_embedding"):
        UNetConfig.from_dict(UNetConfig.preset("tiny").to_dict() | {"time_embedding": "learned"})
    with pytest.raises(ValueError, match="preset"):
        UNetConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible by 8"):
        _model()(torch.randn(1, 3, 60, 60), torch.tensor([0.5]))


def test_config_json_roundtrip() -> None:
    config = UNetConfig.preset("paper")
    restored = UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and restored.out_channels == 3
    assert isinstance(restored.channel_mult, tuple) and isinstance(restored.decoder_mult, tuple)


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model()
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([0.3, 0.9])
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        model,
        (x, t),
        str(path),
        opset_version=18,
        dynamo=True,
        input_names=["x", "t"],
        output_names=["score"],
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Fresh inputs: t must be a graph input, not a constant folded at export time.
    x2, t2 = torch.randn(2, 3, 64, 64), torch.tensor([0.05, 0.6])
    (onnx_out,) = session.run(None, {"x": x2.numpy(), "t": t2.numpy()})
    with torch.no_grad():
        torch_out = model(x2, t2).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=0)
