"""Bad input gets a clear error naming the problem, before any work is done."""

import json
import os
import sys

import pytest
import torch

from transformers_bcos import bcosify_pretrained


@pytest.fixture(scope="module")
def vit(source_folders):
    return bcosify_pretrained(source_folders["vit"])


@pytest.fixture(scope="module")
def resnet(source_folders):
    return bcosify_pretrained(source_folders["resnet"])


@pytest.mark.parametrize(
    "pixel_values,error,match",
    [
        (torch.rand(2, 1, 32, 32), ValueError, "must have 3 channels"),
        (torch.rand(2, 6, 32, 32), ValueError, "must have 3 channels"),
        (torch.rand(3, 32, 32), ValueError, r"shape \(N, 3, H, W\), got shape \(3, 32, 32\)"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point.*uint8"),
        (torch.full((2, 3, 32, 32), float("nan")), ValueError, "NaN or infinite"),
        (torch.full((2, 3, 32, 32), float("inf")), ValueError, "NaN or infinite"),
        (torch.randn(2, 3, 32, 32), ValueError, r"must lie in \[0, 1\].*do_normalize=False"),
        ([[0.5]], TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_pixel_values(pixel_values, error, match, resnet):
    with pytest.raises(error, match=match):
        resnet(pixel_values)
    with pytest.raises(error, match=match):
        resnet.explain(pixel_values)


def test_fixed_size_models_name_their_size(vit):
    with pytest.raises(ValueError, match=r"images of size \(32, 32\), got \(48, 48\)"):
        vit(torch.rand(1, 3, 48, 48))


def test_exactly_one_input(resnet):
    with pytest.raises(ValueError, match="exactly one of pixel_values"):
        resnet()
    with pytest.raises(ValueError, match="exactly one of pixel_values"):
        resnet(torch.rand(1, 3, 32, 32), encoded_pixel_values=torch.rand(1, 6, 32, 32))
    with pytest.raises(ValueError, match="encoded_pixel_values must have 6 channels"):
        resnet(encoded_pixel_values=torch.rand(1, 3, 32, 32))


def test_bad_config_values():
    from transformers import BertConfig

    from transformers_bcos import BcosConfig

    with pytest.raises(ValueError, match="exponent b"):
        BcosConfig(b=-2)
    with pytest.raises(ValueError, match="Unsupported backbone 'bert'.*AutoModelForImageClassification"):
        BcosConfig(backbone_config=BertConfig())


# ------------------------------------------------------------------------------ timm not installed
# Core tier and timm tier alike: ``sys.modules["timm"] = None`` makes ``import timm`` fail.


def test_a_timm_source_without_timm_says_what_to_install(tmp_path, monkeypatch):
    """A TimmWrapperForImageClassification folder (what a ``timm/...`` Hub id holds) where timm is
    not installed: one line naming the extra, nothing written, no weights read."""
    monkeypatch.setitem(sys.modules, "timm", None)
    config = {"model_type": "timm_wrapper", "architecture": "resnet18", "num_classes": 3, "label_names": ["a", "b", "c"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportError, match=r"is a timm model: B-cosifying it needs timm\. Install it with pip install 'transformers-bcos\[timm\]'"):
        bcosify_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_bcos_timm_model_without_timm_says_what_to_install(tmp_path, monkeypatch):
    """A saved B-cos timm model names its architecture; loading it where timm is missing says so."""
    from safetensors.torch import save_file

    from transformers_bcos import BcosConfig, BcosForImageClassification
    from transformers_bcos.configuration_bcos import PlainModuleConfig

    monkeypatch.setitem(sys.modules, "timm", None)
    backbone = PlainModuleConfig(library="timm", architecture="resnet18", architecture_kwargs={"num_classes": 3}, image_size=[32, 32])
    BcosConfig(backbone_config=backbone, num_labels=3).save_pretrained(tmp_path)
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(ImportError, match=r"the timm model 'resnet18' B-cosified: loading it needs timm \(pip install 'transformers-bcos\[timm\]'"):
        BcosForImageClassification.from_pretrained(tmp_path)


def test_a_plain_module_config_names_a_known_library():
    from transformers_bcos.configuration_bcos import PlainModuleConfig

    with pytest.raises(ValueError, match="library must be one of timm, torchvision or None, got 'keras'"):
        PlainModuleConfig(library="keras", architecture="resnet18")
