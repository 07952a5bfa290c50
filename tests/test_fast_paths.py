"""Fast paths give the plain paths' results.

Under ``no_grad`` a model's first convolution folds the encoded image (half the input channels),
ResNet convolutions apply their batch norm and activation inside the B-cos scale, and MLP linear
layers their activation. With the input needing a gradient none of these applies: the two runs
compare the fast paths against the plain ones, on every family. In explanation mode a ResNet
convolution, batch norm and activation multiply by one constant factor: compared against the
three layers applied one by one.
"""

import pytest
import torch
from conftest import FAMILIES

from transformers_bcos import bcosify_pretrained
from transformers_bcos.layers import BcosBatchNorm2d, BcosConv2d, BcosLinear, BcosMlp
from transformers_bcos.modeling_bcos import BcosConvNextLayer, BcosResNetConvLayer, BcosResNetShortCut


@pytest.mark.parametrize("family", FAMILIES)
def test_no_grad_inference_matches_the_autograd_path(family, source_folders, mnist_images, monkeypatch):
    model = bcosify_pretrained(source_folders[family]).double().eval()
    encoded = model.encode_inputs(mnist_images[0][:4].double())
    with torch.enable_grad():
        plain = model(encoded_pixel_values=encoded.clone().requires_grad_()).logits

    calls = {"folded": 0, "epilogue": 0}
    for layer_type, method, name in (
        (BcosConv2d, "_reads_encoded_image", "folded"),
        (BcosConv2d, "forward_with_epilogue", "epilogue"),
        (BcosLinear, "forward_with_epilogue", "epilogue"),
    ):
        original = getattr(layer_type, method)

        def counted(self, *args, original=original, name=name):
            result = original(self, *args)
            calls[name] += bool(result is not False)
            return result

        monkeypatch.setattr(layer_type, method, counted)
    with torch.no_grad():
        fast = model(encoded_pixel_values=encoded).logits

    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)
    assert calls["folded"] == 1
    # Every convolution followed by a batch norm (ResNet) and every MLP's first linear layer
    # (ViT, DeiT, ConvNeXt) runs what follows it as its epilogue.
    fusion_sites = sum(isinstance(m, (BcosResNetConvLayer, BcosResNetShortCut, BcosMlp, BcosConvNextLayer)) for m in model.modules())
    assert calls["epilogue"] == fusion_sites > 0


@pytest.mark.parametrize("b", [2.0, 1.5])  # b = 2 folds the ReLU gate into the factor; other b apply it
def test_explanation_mode_conv_layers_as_one_factor_match_the_layer_by_layer_path(b, source_folders, mnist_images, monkeypatch):
    """In explain(), a ResNet conv, its batch norm and its activation multiply the response by one
    constant factor; the explanation is the one of the three layers applied one by one."""
    model = bcosify_pretrained(source_folders["resnet"], b=b).double().eval()
    torch.manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, BcosBatchNorm2d):  # gains of both signs
            norm.weight.data.uniform_(-1.0, 1.0)
            norm.running_var.uniform_(0.5, 2.0)
    images = mnist_images[0][:4].double()
    graph_ends = []

    def record(module, inputs, output):
        graph_ends.append((output.grad_fn.name(), output.grad_fn.next_functions[0][0].name()))

    for module in model.modules():
        if isinstance(module, (BcosResNetConvLayer, BcosResNetShortCut)):
            module.register_forward_hook(record)
    one_factor = model.explain(images, target=1)
    # Autograd sees the conv's response times one constant, whatever follows the conv.
    assert set(graph_ends) == {("MulBackward0", "ConvolutionBackward0")}

    monkeypatch.setattr(BcosBatchNorm2d, "inference_gain", lambda self: None)  # every layer on its own
    layer_by_layer = model.explain(images, target=1)
    assert ("MulBackward0", "ConvolutionBackward0") not in set(graph_ends[-len(graph_ends) // 2 :])
    torch.testing.assert_close(one_factor.dynamic_linear_weights, layer_by_layer.dynamic_linear_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(one_factor.logits, layer_by_layer.logits, rtol=1e-10, atol=1e-12)
