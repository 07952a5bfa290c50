"""Fast paths give the plain paths' results.

Under ``no_grad`` a model's first convolution folds the encoded image (half the input channels),
ResNet convolutions apply their batch norm and activation inside the B-cos scale, and MLPs run
chunk by chunk of rows. With the input needing a gradient none of these applies: the two runs
compare the fast paths against the plain ones, on every family. In explanation mode a ResNet
convolution, batch norm and activation multiply by one constant factor: compared against the
three layers applied one by one.
"""

import pytest
import torch
from conftest import FAMILIES

from transformers_bcos import bcosify_pretrained, layers
from transformers_bcos.layers import BcosBatchNorm2d, BcosConv2d, BcosLinear, BcosMlp
from transformers_bcos.modeling_bcos import BcosConvNextLayer, BcosResNetConvLayer, BcosResNetShortCut


@pytest.mark.parametrize("family", FAMILIES)
def test_no_grad_inference_matches_the_autograd_path(family, source_folders, mnist_images, monkeypatch):
    model = bcosify_pretrained(source_folders[family]).double().eval()
    encoded = model.encode_inputs(mnist_images[0][:4].double())
    with torch.enable_grad():
        plain = model(encoded_pixel_values=encoded.clone().requires_grad_()).logits

    calls = {"folded": 0, "conv epilogue": 0, "conv epilogue with gain": 0, "linear epilogue": 0, "chunked": 0}
    for owner, method, name in (
        (BcosConv2d, "_reads_encoded_image", "folded"),
        (BcosConv2d, "forward_with_epilogue", "conv epilogue"),
        (BcosLinear, "forward_with_epilogue", "linear epilogue"),
        (layers, "_chunked_feed_forward", "chunked"),
    ):
        original = getattr(owner, method)

        def counted(*args, original=original, name=name):
            result = original(*args)
            calls[name] += bool(result is not False)
            if name == "conv epilogue" and len(args) > 2 and args[2] is not None:
                calls["conv epilogue with gain"] += 1
            return result

        monkeypatch.setattr(owner, method, counted)
    with torch.no_grad():
        fast = model(encoded_pixel_values=encoded).logits

    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)
    assert calls["folded"] == 1
    # Every convolution runs its B-cos scale as an epilogue, those followed by a batch norm
    # (ResNet) with the norm and the activation inside; every MLP (ViT, DeiT, ConvNeXt) runs
    # chunk by chunk of rows, and no linear layer falls back to its own epilogue.
    assert calls["conv epilogue"] == sum(isinstance(m, BcosConv2d) for m in model.modules()) > 0
    assert calls["conv epilogue with gain"] == sum(isinstance(m, (BcosResNetConvLayer, BcosResNetShortCut)) for m in model.modules())
    assert calls["chunked"] == sum(isinstance(m, (BcosMlp, BcosConvNextLayer)) for m in model.modules())
    assert calls["linear epilogue"] == 0


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias, normalize_weights", [(False, False), (True, True)])
def test_mlp_in_chunks_of_rows_matches_the_layer_by_layer_mlp(bias, normalize_weights, dtype, monkeypatch):
    """At inference an MLP runs chunk by chunk of rows (here 5 rows, the last chunk shorter)."""
    torch.manual_seed(0)
    mlp = BcosMlp(12, 48, "gelu", bias=bias, normalize_weights=normalize_weights).to(dtype).eval()
    x = torch.randn(7, 3, 12, dtype=dtype).transpose(0, 1)  # 21 rows, not contiguous
    layer_by_layer = mlp.fc2(mlp.activation(mlp.fc1(x.clone().requires_grad_()))).detach()

    chunks = []
    original = layers._chunked_feed_forward
    monkeypatch.setattr(layers, "_FEED_FORWARD_CHUNK_ELEMENTS", 5 * 48)
    monkeypatch.setattr(layers, "_chunked_feed_forward", lambda *args: chunks.append(args[-1].shape) or original(*args))
    monkeypatch.setattr(layers, "_linear_into", lambda out, *args, original=layers._linear_into: chunks.append(out.shape) or original(out, *args))
    with torch.no_grad():
        chunked = mlp(x)

    assert chunks[0] == (3, 7, 12)
    assert chunks[1:] == [(5, 48), (5, 12)] * 4 + [(1, 48), (1, 12)]  # both products of every chunk
    if dtype == torch.float64:
        torch.testing.assert_close(chunked, layer_by_layer, rtol=1e-12, atol=1e-12)
    else:  # rounded at different points: within a few bf16 steps (2^-8) of the output's scale
        torch.testing.assert_close(chunked, layer_by_layer, rtol=0, atol=2e-2 * layer_by_layer.abs().max().item())
