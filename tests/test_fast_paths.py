"""Inference fast paths give the plain path's logits on every family.

Under ``no_grad`` a model's first convolution folds the encoded image (half the input channels)
and ResNet convolutions apply their batch norm and ReLU inside the B-cos scale. With the input
needing a gradient, neither applies: the two runs compare the fast paths against the plain ones.
"""

import pytest
import torch
from conftest import FAMILIES

from transformers_bcos import bcosify_pretrained
from transformers_bcos.layers import BcosConv2d
from transformers_bcos.modeling_bcos import BcosResNetConvLayer, BcosResNetShortCut


@pytest.mark.parametrize("family", FAMILIES)
def test_no_grad_inference_matches_the_autograd_path(family, source_folders, mnist_images, monkeypatch):
    model = bcosify_pretrained(source_folders[family]).double().eval()
    encoded = model.encode_inputs(mnist_images[0][:4].double())
    with torch.enable_grad():
        plain = model(encoded_pixel_values=encoded.clone().requires_grad_()).logits

    calls = {"folded": 0, "epilogue": 0}
    for name, method in (("folded", "_reads_encoded_image"), ("epilogue", "forward_with_epilogue")):
        original = getattr(BcosConv2d, method)

        def counted(self, *args, original=original, name=name):
            result = original(self, *args)
            calls[name] += bool(result is not False)
            return result

        monkeypatch.setattr(BcosConv2d, method, counted)
    with torch.no_grad():
        fast = model(encoded_pixel_values=encoded).logits

    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)
    assert calls["folded"] == 1
    # Every convolution followed by a batch norm (ResNet only) runs it as its epilogue.
    conv_norm_pairs = sum(isinstance(m, (BcosResNetConvLayer, BcosResNetShortCut)) for m in model.modules())
    assert calls["epilogue"] == conv_norm_pairs and (conv_norm_pairs > 0) == (family == "resnet")
