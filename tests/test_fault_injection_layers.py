"""Fault injection into the hand-written kernels of layers.py (issue 16, item 1).

A fast path may never be less safe or less faithful than the plain PyTorch it replaces. Each
hand-written autograd node, and each layer built on them, is run side by side with the plain
expression it stands for, on inputs holding NaN, ±inf, signed zeros and ties: forward values and
gradients must agree (NaN where the plain expression gives NaN, ±inf where it gives ±inf, the
same finite values elsewhere). Max pooling must select the native kernel's indices, since its
backward kernel writes wherever they point (a NaN in a border window once sent it 7 elements
before the image: SIGSEGV or heap corruption in `transformers-bcos explain` and in diverging
training runs).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from transformers_bcos.layers import (
    NORM_EPS,
    BcosBatchNorm2d,
    BcosConv2d,
    BcosLayerNorm,
    BcosLinear,
    SeparableMaxPool2d,
    _BoxSum,
    _LayerNormDetachedStd,
    _ResponseAndSumOfSquares,
    _SeparableMaxPool,
    _SquareScale,
    _SumOfSquares,
    _UncenteredBatchNormTraining,
)

NAN, INF = math.nan, math.inf
# Ties twice over (1.0, 1.0), both zeros, and the non-finite values.
SPECIALS = (NAN, INF, -INF, 0.0, -0.0, 1.0, 1.0)
FINITE = (0.0, -0.0, 1.0, 1.0)


def spiky(shape, fraction, seed, specials=SPECIALS, dtype=torch.float32):
    """Normal values with each of ``specials`` at one random place and a ``fraction`` of the
    others replaced by draws from them. Weights get only finite ties and zeros: an infinite
    weight would turn everything it touches into NaN."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    chosen = torch.rand(shape, generator=generator) < fraction
    picks = torch.tensor(specials, dtype=torch.float64)[torch.randint(len(specials), shape, generator=generator)]
    x = torch.where(chosen, picks, x).flatten()
    places = torch.randperm(x.numel(), generator=generator)[: len(specials)]
    x[places] = torch.tensor(specials, dtype=torch.float64)[: len(places)]
    return x.view(shape).to(dtype)


def assert_same(got, want, rtol=1e-5, atol=1e-6):
    """NaN exactly where ``want`` has NaN, the same infinities, close finite values."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


def forward_and_gradients(function, inputs, grads_seed=0):
    """function(*inputs) and the gradients of every floating input for a random (finite) upstream
    gradient, which is the same for every ``function`` given the same output shapes."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(grads_seed)
    upstream = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
    differentiable = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return outputs, torch.autograd.grad(outputs, differentiable, upstream)


def assert_matches_plain(fast, plain, inputs, rtol=1e-5, atol=1e-6):
    """``fast`` and ``plain`` give the same outputs and input gradients; the comparison covers
    both non-finite and finite results (otherwise it would test nothing)."""
    got_outputs, got_grads = forward_and_gradients(fast, inputs)
    want_outputs, want_grads = forward_and_gradients(plain, inputs)
    for got, want in zip((*got_outputs, *got_grads), (*want_outputs, *want_grads)):
        assert_same(got, want, rtol, atol)
    results = torch.cat([t.detach().flatten().double() for t in (*want_outputs, *want_grads)])
    assert not results.isfinite().all(), "no non-finite result: the injected values went nowhere"
    assert results.isfinite().sum() > results.numel() // 4, "too few finite results to compare"


# ----------------------------------------------------------------------------------------------
# Max pooling: values and indices of the native kernel
# ----------------------------------------------------------------------------------------------

GEOMETRIES = [(1, 1, 0), (2, 2, 0), (2, 1, 1), (3, 2, 1), (3, 1, 1), (3, 3, 0), (4, 2, 2), (5, 3, 2), (5, 1, 2)]


def pooling_input(kind: str, shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    mask = torch.rand(shape, generator=generator)
    if kind == "nan":
        x[mask < 0.15] = NAN
    elif kind == "nan_on_the_border":
        x[..., 0, :] = NAN
        x[..., :, -1] = NAN
    elif kind == "neg_inf":  # windows with only -inf next to the -inf padding
        x[mask < 0.5] = -INF
        x[..., :2, :] = -INF
    elif kind == "all_neg_inf":
        x.fill_(-INF)
    elif kind == "pos_inf":
        x[mask < 0.2] = INF
    elif kind == "ties":  # rounded rectified values: several maxima per window
        x = x.relu_().mul_(2).round_()
    elif kind == "signed_zeros":
        x = torch.where(mask < 0.5, torch.zeros_like(x), -torch.zeros_like(x))
    elif kind == "everything":
        x = spiky(shape, 0.4, seed)
    return x


def native_pool(x, kernel_size, stride, padding):
    return F.max_pool2d(x, kernel_size, stride, padding, return_indices=True)


def assert_equal_with_nan(got, want):
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kind", ["nan", "nan_on_the_border", "neg_inf", "all_neg_inf", "pos_inf", "ties", "signed_zeros", "everything"])
@pytest.mark.parametrize("kernel_size, stride, padding", GEOMETRIES)
def test_max_pool_values_indices_and_gradients_are_the_native_kernels(kernel_size, stride, padding, kind, channels_last):
    x = pooling_input(kind, (2, 3, 9, 8), seed=kernel_size * 100 + stride * 10 + padding)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want, want_indices = native_pool(x, kernel_size, stride, padding)
    pool = SeparableMaxPool2d(kernel_size, stride, padding)
    assert pool._separable(x)  # the fast path is what runs here
    with torch.no_grad():
        assert_equal_with_nan(pool(x), want)
    leaf = x.clone().requires_grad_()
    got = pool(leaf)
    assert_equal_with_nan(got, want)
    # Checked before any backward pass: wrong indices would make the backward kernel write out of bounds.
    _, got_indices = got.grad_fn.saved_tensors
    assert torch.equal(got_indices, want_indices)
    native_leaf = x.clone().requires_grad_()
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    native_pool(native_leaf, kernel_size, stride, padding)[0].backward(upstream)
    got.backward(upstream)
    assert torch.equal(leaf.grad, native_leaf.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_max_pool_indices_in_other_dtypes(dtype):
    for kind in ("nan_on_the_border", "neg_inf", "ties", "everything"):
        x = pooling_input(kind, (2, 4, 10, 10), seed=3).to(dtype)
        want, want_indices = native_pool(x, 3, 2, 1)
        got = SeparableMaxPool2d(3, 2, 1)(x.clone().requires_grad_())
        assert_equal_with_nan(got, want)
        assert torch.equal(got.grad_fn.saved_tensors[1], want_indices)


def test_the_crash_of_issue_16_a_nan_in_a_border_window():
    """Issue 16's case: a NaN in the first row, 3×3 windows, stride 2, padding 1. The native
    kernel's index is the NaN's own; the separable comparisons kept the padding tap (-7)."""
    x = torch.randn(1, 1, 6, 6)
    x[0, 0, 0, 1] = NAN
    got = SeparableMaxPool2d(3, 2, 1)(x.clone().requires_grad_())
    indices = got.grad_fn.saved_tensors[1]
    assert indices.min() >= 0 and indices.max() < 36
    assert torch.equal(indices, native_pool(x, 3, 2, 1)[1])


@pytest.mark.parametrize("kernel_size, stride, padding, size", [(3, 2, 2, 8), (3, 0, 1, 8), (5, 1, 0, 4)])
def test_geometries_the_native_kernel_refuses_are_refused_alike(kernel_size, stride, padding, size):
    x = torch.randn(1, 2, size, size)
    pool = SeparableMaxPool2d(kernel_size, stride, padding)
    assert not pool._separable(x)
    with pytest.raises(RuntimeError) as native:
        torch.nn.MaxPool2d(kernel_size, stride, padding)(x)
    with pytest.raises(RuntimeError) as separable:
        pool(x)
    assert str(separable.value) == str(native.value)


RESNET_WITH_A_NAN_WEIGHT = """
import math, torch
from transformers import ResNetConfig
from transformers_bcos import BcosConfig, BcosForImageClassification
from transformers_bcos.layers import SeparableMaxPool2d

config = BcosConfig(backbone_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), num_labels=3)
model = BcosForImageClassification(config)
assert any(isinstance(m, SeparableMaxPool2d) for m in model.modules())
with torch.no_grad():
    model.backbone.pixel_reader.weight[0, 0, 0, 0] = math.nan
x = torch.rand(4, 3, 32, 32)
for _ in range(3):
    assert model.explain(x, target=0).explained_output.isnan().all()
    model.train()
    loss = model(x, labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    assert loss.isnan()
print("ok")
"""


@pytest.mark.slow
def test_a_resnet_with_a_nan_weight_explains_and_trains_without_a_crash():
    """The reported crash end to end, in a process of its own (a regression would kill pytest):
    a B-cos ResNet (max pooling in its stem) with a NaN weight, explained and trained on CPU.
    Its outputs are NaN, and nothing is written out of bounds."""
    result = subprocess.run(
        [sys.executable, "-c", RESNET_WITH_A_NAN_WEIGHT], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# The autograd nodes against their plain expressions
# ----------------------------------------------------------------------------------------------


def square_scale(out, inv_norm):
    return out * out.abs() * inv_norm


@pytest.mark.parametrize("overwrite", [False, True])
def test_square_scale_node(overwrite):
    """y = out·|out|·inv_norm, whose backward rebuilds |out|·inv_norm from y. inv_norm is
    1/sqrt(Σx² + eps) > 0 here; where it is 0 or NaN the layer tests below cover it."""
    out = spiky((2, 4, 6, 6), 0.1, seed=0)
    inv_norm = spiky((2, 1, 6, 6), 0.3, seed=1, specials=(1e6, 1.0, 1.0, 1e-3)).abs()
    fast = (lambda o, i: _SquareScale.apply(o.clone(), i, True)) if overwrite else (lambda o, i: _SquareScale.apply(o, i, False))
    assert_matches_plain(fast, square_scale, [out, inv_norm])


@pytest.mark.parametrize("dim, shape", [(1, (2, 5, 6, 6)), (-1, (4, 3, 16))])
def test_sum_of_squares_node(dim, shape):
    assert_matches_plain(lambda x: _SumOfSquares.apply(x, dim), lambda x: x.square().sum(dim, keepdim=True), [spiky(shape, 0.05, seed=0)])


@pytest.mark.parametrize("conv", [True, False])
def test_response_and_sum_of_squares_node(conv):
    if conv:
        x, weight, bias = spiky((2, 3, 7, 7), 0.02, seed=0), spiky((4, 3, 3, 3), 0.1, seed=1, specials=FINITE), spiky((4,), 0.3, seed=2, specials=FINITE)
        geometry = ((2, 2), (1, 1), (1, 1))

        def plain(x, w, b):
            return F.conv2d(x, w, b, 2, 1, 1), x.square().sum(1, keepdim=True)

    else:
        x, weight, bias = spiky((3, 5, 8), 0.05, seed=0), spiky((6, 8), 0.1, seed=1, specials=FINITE), spiky((6,), 0.3, seed=2, specials=FINITE)
        geometry = None

        def plain(x, w, b):
            return F.linear(x, w, b), x.square().sum(-1, keepdim=True)

    assert_matches_plain(lambda x, w, b: _ResponseAndSumOfSquares.apply(x, w, b, geometry), plain, [x, weight, bias])


@pytest.mark.parametrize(
    "kernel_size, stride, padding, size",
    [((3, 3), (1, 1), (1, 1), 7), ((3, 3), (2, 2), (1, 1), 8), ((3, 3), (2, 2), (1, 1), 9), ((7, 1), (1, 1), (3, 0), 7), ((2, 2), (2, 2), (0, 0), 9)],
)
def test_box_sum_node(kernel_size, stride, padding, size):
    squares = spiky((2, 3, size, size), 0.03, seed=size, specials=(NAN, INF, 0.0, -0.0, 1.0, 1.0)).abs()

    def plain(s):
        return F.conv2d(s, s.new_ones(3, 1, *kernel_size), None, stride, padding, 1, 3)

    assert_matches_plain(lambda s: _BoxSum.apply(s, kernel_size, stride, padding, (1, 1)), plain, [squares])


def batch_norm_input():
    """Channel 0 clean, 1 ties and zeros, 2 all zeros, 3 an infinity, 4 a NaN."""
    x = torch.randn(4, 5, 5, 5, generator=torch.Generator().manual_seed(0))
    x[:, 1] = x[:, 1].round()
    x[:, 2] = 0.0
    x[1, 3, 2, 2] = INF
    x[2, 4, 0, 3] = NAN
    return x


def test_uncentered_batch_norm_training_node():
    x, weight = batch_norm_input(), torch.tensor([1.5, -0.5, 2.0, 1.0, 0.7])
    buffers = {}

    def fast(x, w):
        buffers["fast"] = (torch.zeros(5), torch.ones(5))
        return _UncenteredBatchNormTraining.apply(x, w, *buffers["fast"], 0.1, 1e-5)

    def plain(x, w):
        # The running statistics are updated as torch's batch norm does (its kernel gives an
        # infinite mean where var_mean gives NaN).
        buffers["plain"] = (torch.zeros(5), torch.ones(5))
        F.batch_norm(x.detach(), *buffers["plain"], training=True, momentum=0.1, eps=1e-5)
        var, _ = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        return x * (w * torch.rsqrt(var + 1e-5)).view(1, -1, 1, 1)

    assert_matches_plain(fast, plain, [x, weight])
    for got, want in zip(buffers["fast"], buffers["plain"]):
        assert_same(got, want)


def test_layer_norm_with_detached_std_node():
    x = spiky((6, 4, 8), 0.0, seed=0)
    x[0, 0] = 0.0  # a row of zeros: std = sqrt(eps)
    x[0, 1] = 2.0  # a row of ties
    weight, bias = spiky((8,), 0.2, seed=1, specials=FINITE), spiky((8,), 0.2, seed=2, specials=FINITE)

    def plain(x, w, b):
        var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-5).detach() * w + b

    assert_matches_plain(lambda x, w, b: _LayerNormDetachedStd.apply(x, w, b, 1e-5), plain, [x, weight, bias])


# ----------------------------------------------------------------------------------------------
# Whole layers (the nodes together, with the inverse norms they really get)
# ----------------------------------------------------------------------------------------------


def plain_bcos_conv(conv):
    """The definition: conv(x)·|conv(x)| / sqrt(Σ_receptive field x² + eps), per group."""

    def plain(x, weight):
        out = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        squares = x.square().unflatten(1, (conv.groups, -1)).sum(2)
        ones = squares.new_ones(conv.groups, 1, *conv.kernel_size)
        norms = F.conv2d(squares, ones, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return square_scale(out, torch.rsqrt(norms + NORM_EPS).repeat_interleave(conv.out_channels // conv.groups, 1))

    return plain


@pytest.mark.parametrize(
    "geometry",
    [
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
        dict(in_channels=4, out_channels=4, kernel_size=7, padding=3, groups=4),  # separable box sums
        dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, groups=2),
        dict(in_channels=3, out_channels=4, kernel_size=1),
    ],
)
@pytest.mark.parametrize("values", ["special", "overflowing"])
def test_bcos_conv_in_training_matches_its_definition(geometry, values):
    """``overflowing``: finite values whose squares overflow (a diverged model's activations):
    the input norm is infinite, its inverse 0, while the responses stay finite."""
    conv = BcosConv2d(**geometry)
    torch.manual_seed(0)
    if values == "special":
        x = spiky((2, conv.in_channels, 9, 9), 0.02, seed=1)
    else:
        x = spiky((2, conv.in_channels, 9, 9), 0.02, seed=1, specials=(3e19, -3e19, 0.0, 1.0))
        x = torch.cat([x, torch.full_like(x, NAN)[:, :, :1]], dim=2)  # and a NaN row
    weight = conv.weight.detach() * (1e-20 if values == "overflowing" else 1.0)
    assert_matches_plain(lambda x, w: torch.func.functional_call(conv, {"weight": w}, (x,)), plain_bcos_conv(conv), [x, weight])


@pytest.mark.parametrize("values", ["special", "overflowing"])
def test_bcos_linear_in_training_matches_its_definition(values):
    linear = BcosLinear(8, 6)
    specials = SPECIALS if values == "special" else (3e19, -3e19, NAN, 0.0, 1.0)
    x = spiky((3, 5, 8), 0.05, seed=0, specials=specials)
    weight = linear.weight.detach() * (1e-20 if values == "overflowing" else 1.0)

    def plain(x, w):
        return square_scale(F.linear(x, w), torch.rsqrt(x.square().sum(-1, keepdim=True) + NORM_EPS))

    assert_matches_plain(lambda x, w: torch.func.functional_call(linear, {"weight": w}, (x,)), plain, [x, weight])


def test_uncentered_batch_norm_layer_in_training_matches_its_definition():
    norm = BcosBatchNorm2d(5).train()

    def plain(x, w):
        var, _ = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        return x * (w * torch.rsqrt(var + norm.eps)).view(1, -1, 1, 1)

    weight = torch.tensor([1.5, -0.5, 2.0, 1.0, 0.7])
    assert_matches_plain(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), plain, [batch_norm_input(), weight])


def test_layer_norm_in_explanation_mode_matches_its_definition():
    norm = BcosLayerNorm(8, bias=True)
    norm.explanation_mode = True
    x = spiky((6, 4, 8), 0.0, seed=0)

    def plain(x, w, b):
        var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + norm.eps).detach() * w + b

    inputs = [x, spiky((8,), 0.2, seed=1, specials=FINITE), spiky((8,), 0.2, seed=2, specials=FINITE)]
    assert_matches_plain(lambda x, w, b: torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,)), plain, inputs)
