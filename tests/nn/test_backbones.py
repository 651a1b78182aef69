"""Backbones: the bundled ImageNet weights classify a cat, key matching by name and by order, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data

from edgead.nn.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    bundled_weights_path,
    load_backbone_weights,
)

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    info = load_backbone_weights(model, "imagenet")
    assert info == {"weights": "imagenet", "tensors": 296, "matched": "order"}
    return model


def normalised(rgb: np.ndarray, size: int) -> torch.Tensor:
    pixels = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]


def test_bundled_imagenet_weights_classify_chelsea_as_a_cat(imagenet_lite0: torch.nn.Module) -> None:
    with torch.no_grad():
        logits = imagenet_lite0(normalised(data.chelsea(), 224))
    assert int(logits.argmax()) in CAT_CLASSES


def test_feature_extractor_stages_follow_the_paper_indexing(imagenet_lite0: torch.nn.Module) -> None:
    """Stage i of the paper is timm's ``blocks[i - 1]`` (0 = stem), as ``forward_intermediates`` counts them."""
    extractor = FeatureExtractor("efficientnet_lite0", stages=(0, 3, 4, 5, 6, 7), weights="imagenet")
    assert extractor.channels == [32, 40, 80, 112, 192, 320]
    assert not hasattr(extractor, "conv_head"), "the classifier head is not kept when no stage needs it"
    image = normalised(data.chelsea(), 64)
    with torch.no_grad():
        ours = extractor(image)
        reference = imagenet_lite0.forward_intermediates(
            image, indices=[0, 3, 4, 5, 6, 7], intermediates_only=True, extra_blocks=True
        )
    assert [tuple(f.shape[2:]) for f in ours] == [(32, 32), (8, 8), (4, 4), (4, 4), (2, 2), (2, 2)]
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs)
    head = FeatureExtractor("efficientnet_lite0", stages=(7, 8), weights="random")
    assert head.channels == [320, 1280]
    with pytest.raises(ValueError, match="stages 0..8"):
        FeatureExtractor("efficientnet_lite0", stages=(3, 9), weights="random")
    with pytest.raises(ValueError, match="increasing"):
        FeatureExtractor("efficientnet_lite0", stages=(5, 3), weights="random")


def test_random_weights_are_explicit_and_differ_from_imagenet() -> None:
    torch.manual_seed(0)
    random = FeatureExtractor(weights="random")
    pretrained = FeatureExtractor(weights="imagenet")
    assert random.weights_info["weights"] == "random" and pretrained.weights_info["tensors"] == 296
    assert not torch.equal(random.blocks[0][0].conv_dw.weight, pretrained.blocks[0][0].conv_dw.weight)
    assert not any(p.requires_grad for p in pretrained.parameters()) and not pretrained.training


def test_weights_file_by_name_and_by_order(tmp_path: Path, imagenet_lite0: torch.nn.Module) -> None:
    state = imagenet_lite0.state_dict()
    by_name = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(by_name))
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    assert load_backbone_weights(model, by_name)["matched"] == "name"
    torch.testing.assert_close(model.state_dict()["classifier.weight"], state["classifier.weight"])

    renamed = tmp_path / "renamed.pth"
    torch.save({"state_dict": {f"t{i}": v for i, v in enumerate(state.values())}}, renamed)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    assert load_backbone_weights(model, str(renamed))["matched"] == "order"
    torch.testing.assert_close(model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_wrong_shape_is_refused_naming_the_tensor(tmp_path: Path, imagenet_lite0: torch.nn.Module) -> None:
    state = dict(imagenet_lite0.state_dict())
    state["classifier.weight"] = torch.zeros(10, 1280)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'classifier.weight' has shape \(10, 1280\)"):
        load_backbone_weights(timm.create_model("efficientnet_lite0", pretrained=False), path)
    renamed = tmp_path / "wrong_renamed.pt"
    torch.save({f"t{i}": v for i, v in enumerate(state.values())}, renamed)
    with pytest.raises(ValueError, match=r"'t294' has shape .* 'classifier.weight' \(matched by order\)"):
        load_backbone_weights(timm.create_model("efficientnet_lite0", pretrained=False), renamed)
    too_few = tmp_path / "too_few.pt"
    torch.save({"x": torch.zeros(3)}, too_few)
    with pytest.raises(ValueError, match="1 tensors do not fit the model's 296"):
        load_backbone_weights(timm.create_model("efficientnet_lite0", pretrained=False), too_few)


def test_missing_or_unavailable_weights_have_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--weights .*not found"):
        FeatureExtractor(weights=tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="no bundled ImageNet weights for backbone 'resnet18'"):
        bundled_weights_path("resnet18")
    assert bundled_weights_path("efficientnet_lite0").is_file()


def test_other_architectures_use_timm_feature_stages(tmp_path: Path) -> None:
    torch.manual_seed(1)
    classifier = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    extractor = FeatureExtractor("resnet18", stages=(1, 2), weights=path)
    assert extractor.channels == [64, 128] and extractor.weights_info["matched"] == "name"
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        layer1 = classifier.layer1(classifier.maxpool(classifier.act1(classifier.bn1(classifier.conv1(image)))))
        torch.testing.assert_close(extractor(image)[0], layer1)
