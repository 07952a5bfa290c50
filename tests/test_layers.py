"""B-cos layers: the input norm, the hand-written backward passes, explanation mode."""

import copy

import pytest
import torch
import torch.nn.functional as F

from transformers_bcos import explanation_mode
from transformers_bcos.layers import (
    BcosBatchNorm2d,
    BcosConv2d,
    BcosLayerNorm,
    BcosLinear,
    SeparableMaxPool2d,
    encode_pixel_values,
)

CONV_GEOMETRIES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=6, out_channels=4, kernel_size=7, stride=2, padding=3),  # a ResNet stem
    dict(in_channels=8, out_channels=8, kernel_size=7, padding=3, groups=8),  # ConvNeXt depthwise
    dict(in_channels=4, out_channels=8, kernel_size=7, padding=3, groups=4),
    dict(in_channels=8, out_channels=4, kernel_size=5, padding=2, groups=2, dilation=2),
    dict(in_channels=8, out_channels=4, kernel_size=1, stride=2),  # a ResNet shortcut
    dict(in_channels=8, out_channels=4, kernel_size=1),
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_input_norm_is_the_norm_of_each_receptive_field(geometry):
    torch.manual_seed(0)
    conv = BcosConv2d(**geometry).double()
    x = torch.randn(2, conv.in_channels, 13, 13, dtype=torch.double)
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    patches = patches.view(2, conv.groups, -1, patches.shape[-1])
    expected = patches.pow(2).sum(2).sqrt().repeat_interleave(conv.out_channels // conv.groups, 1)
    norm = conv.input_norm(x)
    torch.testing.assert_close(conv.inverse_input_norm(x), 1 / norm)
    norm = norm.expand(2, conv.out_channels, *norm.shape[-2:]).flatten(2)
    torch.testing.assert_close(norm, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_output_and_gradients_match_autograd_of_the_definition(geometry):
    torch.manual_seed(0)
    conv = BcosConv2d(**geometry).double()
    x = torch.randn(1, conv.in_channels, 6, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: conv(x), (x,))
    out = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(conv(x), out * out.abs() / conv.input_norm(x))


@pytest.mark.parametrize("contiguous", [True, False])  # a linear layer may read a permuted feature map
def test_linear_gradients(contiguous):
    torch.manual_seed(0)
    linear = BcosLinear(5, 3, b=2.0).double()
    x = torch.randn(2, 4, 5, dtype=torch.double) if contiguous else torch.randn(2, 5, 4, dtype=torch.double).transpose(1, 2)
    assert x.is_contiguous() == contiguous
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: linear(x), (x, linear.weight))
    torch.testing.assert_close(BcosLinear.inverse_input_norm(x), 1 / BcosLinear.input_norm(x))
    b15 = BcosLinear(5, 3, b=1.5).double()
    assert torch.autograd.gradcheck(lambda x: b15(x), (x,))


@pytest.mark.parametrize("sliced", [False, True])
def test_uncentered_batchnorm_training_matches_its_definition(sliced, monkeypatch):
    from transformers_bcos import layers

    if sliced:  # the backward pass runs over a few elements at a time
        monkeypatch.setattr(layers, "_SLICE_ELEMENTS", 7)
    torch.manual_seed(0)
    bn = BcosBatchNorm2d(5).double().train()
    reference = torch.nn.BatchNorm2d(5).double().train()
    with torch.no_grad():
        bn.weight.normal_()
    x = torch.randn(4, 5, 3, 3, dtype=torch.double, requires_grad=True)
    y = bn(x)
    expected = x / (x.var(dim=(0, 2, 3), unbiased=False) + bn.eps).sqrt().view(1, -1, 1, 1) * bn.weight.view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, (x, bn.weight), grad), torch.autograd.grad(expected, (x, bn.weight), grad)
    )
    reference(x)  # running statistics follow torch's batch norm (momentum, unbiased variance)
    torch.testing.assert_close(bn.running_var, reference.running_var)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("geometry", [CONV_GEOMETRIES[0], CONV_GEOMETRIES[2], CONV_GEOMETRIES[5]])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sliced_passes_match_the_whole_tensor_ones(geometry, channels_last, monkeypatch):
    """Large activations go through the scale and the sum of squares slice by slice: the same values
    and gradients as in one piece (whose backward the gradchecks above verify)."""
    from transformers_bcos import layers

    torch.manual_seed(0)
    conv = BcosConv2d(**geometry).double()
    linear = BcosLinear(conv.in_channels, 5).double()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, conv.in_channels, 9, 9, dtype=torch.double).contiguous(memory_format=memory_format).requires_grad_(True)
    tokens = torch.randn(2, 7, conv.in_channels, dtype=torch.double, requires_grad=True)

    def outputs_and_gradients():
        y, z = conv(x), linear(tokens)
        grads = torch.autograd.grad(y.pow(2).sum() + z.pow(3).sum(), (x, tokens, conv.weight, linear.weight))
        return (y, z, *grads)

    whole = outputs_and_gradients()
    monkeypatch.setattr(layers, "_SLICE_ELEMENTS", 40)  # a few elements per slice: many slices
    sliced = outputs_and_gradients()
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_passes_are_sliced_only_for_cpu_tensors(monkeypatch):
    """Slicing keeps a pass in the CPU caches; on another device each slice would be a kernel
    launch, so there the pass runs over the whole tensor (the meta device stands in for a GPU)."""
    from transformers_bcos import layers

    monkeypatch.setattr(layers, "_SLICE_ELEMENTS", 64)
    on_cpu = [parts[0].shape for parts in layers._sliced(torch.empty(2, 8, 16, 16))]
    on_meta = [parts[0].shape for parts in layers._sliced(torch.empty(2, 8, 16, 16, device="meta"))]
    assert on_cpu == [(2, 1, 16, 16)] * 8
    assert on_meta == [(2, 8, 16, 16)]


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_explanation_mode_layer_norm_is_the_definition_with_its_std_detached(channels_first, bias):
    """The one-op explanation-mode layer norm: same output as F.layer_norm, and the gradients of
    (x - mean(x))·w/std (+ b) with the std detached, for the input, the weight and the bias."""
    torch.manual_seed(0)
    norm = BcosLayerNorm(6, eps=1e-5, bias=bias, channels_first=channels_first).double()
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        if bias:
            norm.bias.normal_(0, 0.3)
    x = torch.randn(2, 6, 3, 5, dtype=torch.double) if channels_first else torch.randn(2, 4, 6, dtype=torch.double)
    x = (3 * x + 1).requires_grad_()
    grad = torch.randn_like(x)

    def definition(x):
        moved = x.movedim(1, -1) if channels_first else x
        centred = moved - moved.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps).detach() * norm.weight
        y = y + norm.bias if bias else y
        return y.movedim(-1, 1) if channels_first else y

    parameters = [p for p in (norm.weight, norm.bias) if p is not None]
    expected_y = definition(x)
    expected = torch.autograd.grad(expected_y, [x, *parameters], grad)
    with explanation_mode(norm):
        y = norm(x)
    got = torch.autograd.grad(y, [x, *parameters], grad)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # Not the layer-norm gradient: with the std detached, the input gradient differs.
    standard = torch.autograd.grad(norm(x), x, grad)[0]
    assert not torch.allclose(got[0], standard, rtol=1e-3, atol=1e-6)


def test_float16_layer_norm_in_explanation_mode_survives_a_token_of_zero_variance():
    """1/std of a constant token is 1/sqrt(eps) = 1e6 for eps = 1e-12 (ViT's), beyond float16's
    range: the gradients are float32's rounded to float16, not NaN (a DeiT built from a config has
    zero class tokens)."""
    torch.manual_seed(0)
    norm = BcosLayerNorm(8, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
    x = torch.randn(3, 8)
    x[0] = 0.0  # the zero token
    grad = torch.randn(3, 8) * 1e-3

    def gradients(dtype):
        layer = copy.deepcopy(norm).to(dtype)
        inputs = x.to(dtype).requires_grad_()
        with explanation_mode(layer):
            y = layer(inputs)
        return [g.float() for g in torch.autograd.grad(y, (inputs, layer.weight), grad.to(dtype))]

    half, full = gradients(torch.float16), gradients(torch.float32)
    assert all(torch.isfinite(g).all() for g in half)
    for h, f in zip(half, full):
        torch.testing.assert_close(h, f, rtol=2e-3, atol=2e-3 * f.abs().max().item())


@pytest.mark.parametrize(
    "geometry",
    [
        dict(kernel_size=7, stride=2, padding=3),  # the ResNet stem
        dict(kernel_size=4, stride=4),  # ConvNeXt / ViT patches
        dict(kernel_size=3, padding=1, dilation=2, bias=True),
    ],
)
@pytest.mark.parametrize("b", [2.0, 1.0])
def test_first_conv_folds_the_encoded_image(geometry, b):
    """A first convolution given exactly [x, 1 - x] runs on x with folded weights: the same
    response and weight gradients as the six-channel convolution. Any other input, an input that
    needs a gradient, and explanation mode take the six-channel path."""
    torch.manual_seed(0)
    folding = BcosConv2d(6, 5, b=b, encoded_image_input=True, **geometry).double()
    plain = BcosConv2d(6, 5, b=b, **geometry).double()
    plain.load_state_dict(folding.state_dict())
    encoded = encode_pixel_values(torch.rand(2, 3, 12, 12, dtype=torch.double))
    assert folding._reads_encoded_image(encoded)

    def parameters(conv):
        return [p for p in (conv.weight, conv.bias) if p is not None]

    y, expected = folding(encoded), plain(encoded)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, parameters(folding), grad), torch.autograd.grad(expected, parameters(plain), grad), rtol=1e-12, atol=1e-12
    )

    not_encoded = encoded.clone()
    not_encoded[0, 4, 3, 3] += 0.25
    assert not folding._reads_encoded_image(not_encoded)
    assert not folding._reads_encoded_image(encoded.clone().requires_grad_())
    with explanation_mode(folding):
        assert not folding._reads_encoded_image(encoded)
    assert not plain._reads_encoded_image(encoded)


@pytest.mark.parametrize("layer_type", ["conv", "linear"])
def test_fused_input_gradients_under_bf16_autocast(layer_type):
    """In training, a layer's response and its input norm share one autograd node (their input
    gradients are summed in one pass). Under bf16 autocast it computes the response in bf16 as the
    plain layer does, and returns float32 gradients close to those of the definition."""
    torch.manual_seed(0)
    if layer_type == "conv":
        layer = BcosConv2d(4, 6, 3, padding=1, bias=True)
        x = torch.randn(2, 4, 7, 7, requires_grad=True)

        def definition(x):
            out = F.conv2d(x, layer.weight, layer.bias, padding=1)
            norm = F.conv2d(x.float().pow(2).sum(1, keepdim=True), torch.ones(1, 1, 3, 3), padding=1).add(1e-12).sqrt()
            return out * (out.abs() / norm).to(out.dtype)

    else:
        layer = BcosLinear(5, 3, bias=True)
        x = torch.randn(2, 4, 5, requires_grad=True)

        def definition(x):
            out = F.linear(x, layer.weight, layer.bias)
            return out * (out.abs() / x.float().pow(2).sum(-1, keepdim=True).add(1e-12).sqrt()).to(out.dtype)

    inputs = (x, layer.weight, layer.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), definition(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=1e-2)
    grad = torch.randn_like(y)
    got, want = torch.autograd.grad(y, inputs, grad), torch.autograd.grad(expected, inputs, grad)
    assert [g.dtype for g in got] == [torch.float32] * 3
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "kernel_size, stride, padding, size",
    [(3, 2, 1, (2, 3, 9, 11)), (3, 2, 1, (2, 4, 112, 112)), (2, 2, 0, (2, 3, 8, 8)), (3, 1, 1, (1, 2, 7, 6)), (5, 3, 2, (1, 2, 13, 10))],
)
def test_separable_max_pool_is_max_pool2d(kernel_size, stride, padding, size):
    torch.manual_seed(0)
    # Rounded rectified values: windows with several maxima, where the gradient goes to the first.
    x = torch.randn(size).relu_().mul_(2).round_()
    native, separable = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = F.max_pool2d(native, kernel_size, stride, padding)
    got = SeparableMaxPool2d(kernel_size, stride, padding)(separable)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    assert torch.equal(separable.grad, native.grad)
    with torch.no_grad():
        assert torch.equal(SeparableMaxPool2d(kernel_size, stride, padding)(x), expected)
