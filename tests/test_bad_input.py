"""Bad input gets a clear error naming the problem, before any work is done."""

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
