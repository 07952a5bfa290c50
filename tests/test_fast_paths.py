"""Fast paths give the plain paths' results.

Under ``no_grad`` a model's first convolution folds the encoded image (half the input channels),
and every convolution applies its B-cos scale in place over each slice of its response (the conv
epilogue). With the input needing a gradient neither applies: the two runs compare the fast paths
against the plain ones, on every family.
"""

import pytest
import torch
from conftest import FAMILIES

from transformers_bcos import bcosify_pretrained
from transformers_bcos.layers import BcosConv2d


@pytest.mark.parametrize("family", FAMILIES)
def test_no_grad_inference_matches_the_autograd_path(family, source_folders, mnist_images, monkeypatch):
    model = bcosify_pretrained(source_folders[family]).double().eval()
    encoded = model.encode_inputs(mnist_images[0][:4].double())
    with torch.enable_grad():
        plain = model(encoded_pixel_values=encoded.clone().requires_grad_()).logits

    calls = {"folded": 0, "conv epilogue": 0, "conv": 0}
    for method, name in (("_reads_encoded_image", "folded"), ("forward_with_epilogue", "conv epilogue"), ("forward", "conv")):
        original = getattr(BcosConv2d, method)

        def counted(*args, original=original, name=name):
            result = original(*args)
            calls[name] += bool(result is not False)
            return result

        monkeypatch.setattr(BcosConv2d, method, counted)
    with torch.no_grad():
        fast = model(encoded_pixel_values=encoded).logits

    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)
    # The pixel reader once on the image (ViTs run it once more on zeros, for their learned
    # constants: `rules.LinearizedConstants`), every convolution call through its epilogue.
    assert calls["folded"] == 1
    assert calls["conv epilogue"] == calls["conv"] >= sum(isinstance(m, BcosConv2d) for m in model.modules()) > 0
