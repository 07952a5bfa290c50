"""B-cos layers.

Every layer here is a drop-in for its standard PyTorch counterpart and carries an
``explanation_mode`` flag. In explanation mode a layer detaches its input-dependent factors
(the B-cos scale, the normalisation std, the activation gate), so the network becomes the
dynamic linear map y = W(x)·x whose gradient with respect to the input is W(x).

This file travels with saved checkpoints (``trust_remote_code``): it imports torch and the
standard library only.
"""

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Added inside the square root of the input norm so that an all-zero patch gets a zero scale
# rather than 0/0. Far below the reference's 1e-6: B-cos activations can be ~1e-3 (b=2 shrinks
# them layer by layer), where 1e-6 would distort the norm and break homogeneity.
NORM_EPS = 1e-12


class ExplainableModule(nn.Module):
    """A module whose dynamic (input-dependent, non-linear) factors can be detached.

    ``explanation_mode`` is switched for a whole model by ``explanation.explanation_mode``.
    ``differentiable_factors`` (one for all modules, set by
    ``explanation.dynamic_linear_weights(create_graph=True)``): where explanation mode takes its
    dynamic factors from in a differentiable explanation (`explanation_constant`).
    """

    explanation_mode: bool = False
    differentiable_factors: Optional["DifferentiableFactors"] = None


class DifferentiableFactors:
    """The dynamic factors of a differentiable explanation, from two forward passes in
    explanation mode: the first, of the input detached, records each factor computed with
    autograd (a function of the parameters); the second, of the explained input, replays them in
    the order they were recorded. For the second pass each factor is then constant in the input
    (its input gradient is still W(x)) but keeps its dependence on the parameters."""

    def __init__(self):
        self.factors = []
        self.replayed = 0
        self.replaying = False

    def __call__(self, compute, *tensors: torch.Tensor) -> torch.Tensor:
        if self.replaying:
            if self.replayed == len(self.factors):
                raise RuntimeError("The explained forward pass asked for more dynamic factors than the first pass recorded.")
            self.replayed += 1
            return self.factors[self.replayed - 1]
        # Copies: the callers scale their activations in place, which autograd would find changed
        # under the factor's graph.
        factor = compute(*(t.clone() for t in tensors))
        self.factors.append(factor)
        return factor


def differentiable_explanation() -> bool:
    """Whether explanation mode computes a differentiable explanation (`DifferentiableFactors`):
    its input gradient must then be differentiable again, and the layers take their reference
    expressions, not the hand-written backward passes of their fast paths."""
    return ExplainableModule.differentiable_factors is not None


def explanation_constant(compute, *tensors: torch.Tensor) -> torch.Tensor:
    """``compute(*tensors)``: a dynamic factor of the explanation (a B-cos scale, a norm's std, an
    activation gate, an attention matrix), which the explanation holds constant in the input.

    Computed without autograd: a constant; in a differentiable explanation, recorded or replayed
    by `DifferentiableFactors`.
    """
    factors = ExplainableModule.differentiable_factors
    if factors is None:
        with torch.no_grad():
            return compute(*tensors)
    return factors(compute, *tensors)


def encode_pixel_values(pixel_values: torch.Tensor) -> torch.Tensor:
    """[r, g, b] in [0, 1] -> [r, g, b, 1-r, 1-g, 1-b]: pixels of every colour carry evidence."""
    return torch.cat([pixel_values, 1.0 - pixel_values], dim=1)


# The element-wise passes next to a convolution (the B-cos scale, the channel sum of squares) are
# memory-bound: run one after another over a whole activation larger than the caches, each pass
# streams it from memory again. Run slice by slice (about 1 MiB of float32 each), the later passes
# over a slice find it in cache: 1.4-2x faster on ResNet-50's activations (CPU, measured).
_SLICE_ELEMENTS = 1 << 18


def _sliced(*tensors):
    """Matching slices of ``tensors`` (broadcastable to the first) along one dimension of the first.

    The slicing dimension follows the memory layout (channels, or height for channels_last), so that
    a slice is a few long contiguous runs. A tensor of size 1 along it comes whole with every slice.
    Small tensors, tensors off the CPU (the point is the CPU caches; on a GPU each slice would be a
    kernel launch) and traced code (the compiler fuses the passes itself) get one slice.
    """
    first = tensors[0]
    # Checked before any arithmetic on the shape, which dynamo would guard on (recompiling for
    # every batch size of a model compiled with dynamic shapes).
    if first.device.type != "cpu" or torch.compiler.is_compiling():
        yield tensors
        return
    if first.dim() == 4 and not first.is_contiguous() and first.is_contiguous(memory_format=torch.channels_last):
        dim = 2
    else:
        dim = 1 if first.dim() > 2 else 0
    size = first.shape[dim] if first.dim() else 1
    step = max(1, _SLICE_ELEMENTS * size // max(first.numel(), 1))
    if step >= size:
        yield tensors
        return
    for start in range(0, size, step):
        length = min(step, size - start)
        yield tuple(t if t.shape[dim] == 1 else t.narrow(dim, start, length) for t in tensors)


def _square_scale_in_place(out: torch.Tensor, inv_norm: torch.Tensor, from_squares: bool = False) -> torch.Tensor:
    """out·|out|·inv_norm over out itself, slice by slice.

    ``from_squares``: ``inv_norm`` holds the sums of squares instead, a fresh tensor that this
    overwrites. A depthwise layer's norms have the shape of out: each slice of them is inverted
    in cache (inverting the whole tensor first took two passes over memory) and becomes the factor
    |out|·inv_norm in place, with no temporary for |out|. ConvNeXt-T's depthwise layers at
    inference (batch 8, CPU, measured): 11.3 -> 11.0 ms at stage 1, 2.24 -> 1.92 ms at stage 3.
    """
    if from_squares and inv_norm.shape != out.shape:
        inv_norm, from_squares = _inverse_norm(inv_norm), False
    for o, n in _sliced(out, inv_norm):
        if from_squares:
            o.mul_(_inverse_norm(n).mul_(o).abs_())
        else:
            o.mul_(o.abs()).mul_(n)
    return out


def _output_buffer(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor shaped like ``like`` for a sliced pass to write into (``out=``): in like's
    layout, so that the slices of both match; contiguous in traced code, where there is one slice
    and dynamo refuses ``out=`` into a strided tensor."""
    layout = torch.contiguous_format if torch.compiler.is_compiling() else torch.preserve_format
    return torch.empty_like(like, dtype=dtype, memory_format=layout)


def _fuses_epilogue(layer) -> bool:
    """Whether a B-cos conv or linear layer may run what follows it inside its scale: b = 2, no
    autograd (inference), outside explanation mode."""
    return layer.b == 2 and not torch.is_grad_enabled() and not layer.explanation_mode


class _SquareScale(torch.autograd.Function):
    """y = out·|out|·inv_norm (the b = 2 B-cos non-linearity, inv_norm = 1/norm) with a
    hand-written backward.

    The backward needs only y and inv_norm: |out|·inv_norm = sqrt(|y|·inv_norm). The output y is
    what the next layer keeps for its own backward anyway, so the non-linearity adds no activation
    memory beyond inv_norm (one channel for ungrouped layers), where autograd through the plain
    expression kept out, |out| and the quotient alive.

    With ``overwrite`` (the layers' own call, where out is their temporary) y is written over out:
    no allocation of a fresh activation (whose first touch costs page faults) and one pass less.

    For NaN, ±inf, zeros and ties the gradients are those of autograd through out·|out|·inv_norm
    (tests/test_fault_injection_layers.py), except towards inv_norm where it is 0 or NaN, which
    only an input holding a NaN, an infinity or a value whose square overflows makes: there
    out|out| = y/inv_norm is lost (see backward), and the whole layer's gradients are autograd's.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, inv_norm: torch.Tensor, overwrite: bool) -> torch.Tensor:
        # Not while tracing: dynamo cannot trace mark_dirty here, and compiled code plans its own buffers.
        if overwrite and not torch.compiler.is_compiling():
            ctx.mark_dirty(out)
            y = _square_scale_in_place(out, inv_norm)
        else:
            y = out.abs().mul_(out).mul_(inv_norm)
        ctx.save_for_backward(y, inv_norm)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, inv_norm = ctx.saved_tensors
        # Where i = 0, y is 0 (finite out) or NaN, and out|out| = y/i is lost; 0/0 made the
        # gradient to i NaN even for a finite out. Dividing by the smallest normal number instead
        # gives 0 or NaN, which the only producer of i, rsqrt's backward, multiplies by i³ = 0 as
        # it does autograd's Σ g·out|out|. No other i changes: i = 1/sqrt(Σx² + eps) is at least
        # 1/sqrt(largest number) of its dtype, far above the smallest normal one.
        inv_norm = inv_norm.clamp_min(torch.finfo(inv_norm.dtype).tiny)
        grad_out = _output_buffer(y, grad.dtype)
        # d(out|out|·i)/di = y/i: Σ g·y over the dims i broadcasts along, divided by i afterwards.
        summed = [torch.zeros_like(inv_norm)] if ctx.needs_input_grad[1] else []
        for t, g, gy, n, *s in _sliced(y, grad, grad_out, inv_norm, *summed):
            torch.mul(t, n, out=gy).abs_().sqrt_().mul_(g).mul_(2.0)  # 2·g·|out|·i = 2·g·sqrt(|y|·i)
            if s:
                s[0].add_((g * t).sum_to_size(s[0].shape))
        grad_inv_norm = summed[0].div_(inv_norm) if summed else None
        return grad_out, grad_inv_norm, None


def _linear_gradients(grad_response: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs) -> tuple:
    """Gradients of x·Wᵀ (+ bias) for x, W and the bias (None where ``needs`` says none)."""
    needs_x, needs_weight, needs_bias = needs
    flat = grad_response.flatten(0, -2)
    grad_x = grad_response.matmul(weight) if needs_x else None
    grad_weight = flat.t().matmul(x.flatten(0, -2)) if needs_weight else None
    grad_bias = flat.sum(0) if needs_bias else None
    return grad_x, grad_weight, grad_bias


def _sum_of_squares(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σx² over dim 1 (channels of a conv input) or -1 (features of a linear input), keepdim.

    Sums accumulate in at least float32, so bf16 inputs lose nothing to slicing.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if torch.compiler.is_compiling():  # one reduction the compiler fuses (a norm would add sqrt, square)
        return x.square().sum(dim, keepdim=True, dtype=dtype)
    if dim == -1:  # the contiguous last dim: vector_norm reduces it in one fused pass
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).square_()
    # Channels of NCHW: pow + sum, slice by slice (vector_norm(dim=1) reduces across the strided
    # channel dim, up to 15x slower, measured on CPU).
    summed = x.new_zeros((x.shape[0], 1, *x.shape[2:]), dtype=dtype)
    for part, total in _sliced(x, summed):
        total.add_(part.square().sum(1, keepdim=True, dtype=dtype))
    return summed


def _add_sum_of_squares_gradient(grad_x: torch.Tensor, x: torch.Tensor, grad_squares: torch.Tensor) -> torch.Tensor:
    """grad_x += 2·x·grad_squares (the gradient of Σx², broadcast over the summed dim), in place."""
    doubled = (2.0 * grad_squares).to(x.dtype)
    for gx, part, g in _sliced(grad_x, x, doubled):
        gx.addcmul_(part, g)
    return grad_x


class _SumOfSquares(torch.autograd.Function):
    """`_sum_of_squares` as an autograd node whose backward, 2·x·g, is one pass, where autograd
    through pow + sum or vector_norm took several (the norm's also divides and masks zero norms).
    It saves x, which the linear map beside it keeps anyway.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _sum_of_squares(x, dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return x * (2.0 * grad).to(x.dtype), None


class _ResponseAndSumOfSquares(torch.autograd.Function):
    """A layer's linear response (conv2d, or linear for ``conv_geometry=None``) and Σx² of its
    input (for the input norm) as one autograd node.

    Both read x, so both send it a gradient. As two nodes that costs the product 2·x·g, a fresh
    tensor and autograd's sum of the two; here the norm's part is added into the response's input
    gradient in one fused pass. Under autocast the response runs in the autocast dtype, as the
    plain layer's would: the inputs are cast here, their gradients cast back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], conv_geometry):
        device_type = x.device.type
        cast = [x, weight, bias]
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            cast = [t.to(dtype) if t is not None else None for t in cast]
        with torch.autocast(device_type, enabled=False):
            if conv_geometry is None:
                # Written into a tensor of its own: F.linear of a batch of sequences returns a view,
                # which the B-cos scale could not then overwrite. One matrix product over all
                # positions: matmul of a non-contiguous batch would be a batched product.
                cast_x, cast_weight, cast_bias = cast
                response = cast_x.new_empty((*x.shape[:-1], weight.shape[0]))
                torch.mm(cast_x.reshape(-1, x.shape[-1]), cast_weight.t(), out=response.view(-1, weight.shape[0]))
                if cast_bias is not None:
                    response.add_(cast_bias)
            else:
                response = F.conv2d(*cast, *conv_geometry)
        ctx.save_for_backward(x, cast[0], cast[1])
        ctx.conv_geometry = conv_geometry
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return response, _sum_of_squares(x, -1 if conv_geometry is None else 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_response: torch.Tensor, grad_squares: torch.Tensor):
        x, cast_x, cast_weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_response = grad_response.to(cast_weight.dtype)
        if ctx.conv_geometry is None:
            grad_x, grad_weight, grad_bias = _linear_gradients(grad_response, cast_x, cast_weight, (needs_x, needs_weight, needs_bias))
        else:
            stride, padding, dilation = ctx.conv_geometry
            bias_sizes = [cast_weight.shape[0]] if ctx.dtypes[1] is not None else None
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_response, cast_x, cast_weight, bias_sizes, stride, padding, dilation, False, [0, 0], 1, [needs_x, needs_weight, needs_bias]
            )
        if needs_x:
            grad_x = _add_sum_of_squares_gradient(grad_x.to(x.dtype), x, grad_squares)
        weight_dtype, bias_dtype = ctx.dtypes
        grad_weight = grad_weight.to(weight_dtype) if needs_weight else None
        grad_bias = grad_bias.to(bias_dtype) if needs_bias else None
        return grad_x, grad_weight, grad_bias, None


class _BoxSum(torch.autograd.Function):
    """Per-channel sums over a conv's receptive fields, with its adjoint as the backward.

    The sum is linear, so its backward is the transposed convolution with the same ones kernel
    and needs no saved input; autograd through ``conv2d`` would keep the summed input (a full
    activation for depthwise layers) alive.
    """

    @staticmethod
    def forward(ctx, squared, kernel_size, stride, padding, dilation):
        channels = squared.shape[1]
        ctx.geometry = (kernel_size, stride, padding, dilation, tuple(squared.shape[-2:]))
        ones = squared.new_ones(channels, 1, *kernel_size)
        return F.conv2d(squared, ones, None, stride, padding, dilation, channels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        kernel_size, stride, padding, dilation, input_size = ctx.geometry
        channels = grad.shape[1]
        output_padding = [
            input_size[i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel_size[i] - 1) + 1)
            for i in range(2)
        ]
        ones = grad.new_ones(channels, 1, *kernel_size)
        grad_input = F.conv_transpose2d(grad, ones, None, stride, padding, output_padding, channels, dilation)
        return grad_input, None, None, None, None


def _bcos_scale(out: torch.Tensor, inv_norm: torch.Tensor, b: float, detach: bool, overwrite: bool) -> torch.Tensor:
    """``out * |cos(x, w)|^(b-1) * ||w||^(b-1)``, the B-cos non-linearity, from the linear response
    ``out`` = w·x (+ bias) and ``inv_norm`` = 1/||input patch||.

    With ``detach`` (explanation mode) the scale is a constant and y is linear in ``out``.
    ``overwrite``: out is the caller's temporary, which the scale may reuse (the linear maps that
    produce it do not keep their output)."""
    if b == 2 and not detach:
        return _SquareScale.apply(out, inv_norm, overwrite)
    if detach:
        factor = _detached_bcos_factor(out, inv_norm, b)
        return out.mul_(factor) if overwrite else out * factor
    # Other exponents in training: autograd of the definition; +1e-6 keeps the gradient of the
    # power finite where the response is 0. The norm is summed in at least float32: under
    # autocast the output keeps the response's dtype.
    return out * (out.abs() * inv_norm + 1e-6).pow(b - 1).to(out.dtype)


def _detached_bcos_factor(out: torch.Tensor, inv_norm: torch.Tensor, b: float) -> torch.Tensor:
    """The factor by which the B-cos non-linearity multiplies ``out``, as a constant of the
    explanation (`explanation_constant`), in one temporary (fresh temporaries of activation size
    cost page faults)."""

    def factor(out, inv_norm):
        if b == 2:
            return out.abs().mul_(inv_norm)
        return (out.abs() * inv_norm).add_(1e-6).pow_(b - 1).to(out.dtype)

    return explanation_constant(factor, out, inv_norm)


def _inverse_norm(sum_of_squares: torch.Tensor) -> torch.Tensor:
    """1/sqrt(Σx² + eps), in place over the caller's fresh ``sum_of_squares``: the B-cos scale
    multiplies by it, and one in-place pass replaces three (add, sqrt, reciprocal) and their
    allocations. Autograd keeps only the result, which the scale keeps anyway."""
    return sum_of_squares.add_(NORM_EPS).rsqrt_()


def _graph_unless(explanation_mode: bool):
    """No autograd graph for what is a constant of the explanation (input norms, attention
    queries and keys): it would be detached anyway, and its graph kept activations alive. A
    differentiable explanation records them with it: they keep their dependence on the parameters."""
    factors = ExplainableModule.differentiable_factors
    if explanation_mode and (factors is None or factors.replaying):
        return torch.no_grad()
    return contextlib.nullcontext()


def _check_b(b: float) -> float:
    if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or b <= 0:
        raise ValueError(f"The B-cos exponent b must be a finite number > 0, got {b!r}.")
    return float(b)


def _conv_of_encoded_image(encoded: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation) -> torch.Tensor:
    """conv2d of an encoded image [x, 1 - x] computed from x: W·[x; 1 - x] = (W_x - W_inv)·x + W_inv·1.

    The convolution reads half the channels. The constant term W_inv·1 is the same for every
    image and varies only where a receptive field reaches into the zero padding: one
    single-channel convolution of an all-ones image.
    """
    channels = encoded.shape[1] // 2
    direct, inverse = weight[:, :channels], weight[:, channels:]
    out = F.conv2d(encoded[:, :channels], direct - inverse, bias, stride, padding, dilation)
    ones = encoded.new_ones(1, 1, *encoded.shape[2:])
    return out.add_(F.conv2d(ones, inverse.sum(1, keepdim=True), None, stride, padding, dilation))


class BcosConv2d(ExplainableModule, nn.Conv2d):
    """B-cos 2D convolution: ``conv(x) * |conv(x) / ||patch(x)|| |^(b-1)``.

    With ``b=1`` it is a plain convolution (with the bias, if any). ``normalize_weights`` uses
    unit-norm filters (B-cos v2); B-cosified models keep the raw pretrained filters, which only
    rescales each output channel.

    ``encoded_image_input`` marks a model's first convolution, which reads the encoded image
    [x, 1 - x]. When its input is exactly that encoding and needs no gradient, the convolution
    runs on x with folded weights (half the input channels, the same response); explanations
    (which need the gradient for all six channels) and any other input take the plain path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        b: float = 2.0,
        normalize_weights: bool = False,
        encoded_image_input: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.b = _check_b(b)
        self.normalize_weights = normalize_weights
        self.encoded_image_input = encoded_image_input

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, b={self.b}, normalize_weights={self.normalize_weights}"

    def _weight(self) -> torch.Tensor:
        if not self.normalize_weights:
            return self.weight
        return self.weight / self.weight.flatten(1).norm(dim=1).clamp_min(NORM_EPS).view(-1, 1, 1, 1)

    def _reads_encoded_image(self, x: torch.Tensor) -> bool:
        """Whether x is exactly [x, 1 - x] and the folded convolution may replace the plain one."""
        if not self.encoded_image_input or self.explanation_mode or x.requires_grad or self.groups != 1:
            return False
        if torch.compiler.is_compiling() or x.shape[1] % 2:  # the check is data-dependent: not traced
            return False
        channels = x.shape[1] // 2
        return torch.equal(x[:, channels:], 1.0 - x[:, :channels])

    def input_norm(self, x: torch.Tensor) -> torch.Tensor:
        """L2 norm of each receptive field (per group), broadcastable to the conv output."""
        return (self._receptive_field_squares(x) + NORM_EPS).sqrt()

    def inverse_input_norm(self, x: torch.Tensor) -> torch.Tensor:
        """1 / ``input_norm(x)``: what the forward pass multiplies by."""
        return _inverse_norm(self._receptive_field_squares(x))

    def _receptive_field_squares(self, x: torch.Tensor) -> torch.Tensor:
        """Σx² over each receptive field (per group), broadcastable to the conv output; a fresh tensor."""
        if self.groups == 1:
            squared = _SumOfSquares.apply(x, 1)
        else:
            squared = x.pow(2)
            if self.in_channels != self.groups:
                squared = squared.unflatten(1, (self.groups, -1)).sum(2)
        summed = self._receptive_field_sum(squared)
        if self.groups > 1 and self.out_channels != self.groups:
            summed = summed.repeat_interleave(self.out_channels // self.groups, dim=1)
        return summed

    def _receptive_field_sum(self, squared: torch.Tensor) -> torch.Tensor:
        """Sum ``squared`` (one channel per group) over each receptive field of the conv."""
        if self.kernel_size == (1, 1) and self.padding in ("valid", (0, 0)):  # the norm is per position
            return squared[..., :: self.stride[0], :: self.stride[1]]
        if isinstance(self.padding, str):  # "same"/"valid": let conv2d resolve the padding
            ones = squared.new_ones(squared.shape[1], 1, *self.kernel_size)
            return F.conv2d(squared, ones, None, self.stride, self.padding, self.dilation, squared.shape[1])
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if self.stride == (1, 1) and self.dilation == (1, 1) and kh * kw > 9:
            # A box filter is separable: a k×1 then a 1×k sum costs 2k instead of k² per output,
            # which matters for large depthwise kernels (ConvNeXt's 7×7).
            rows = _BoxSum.apply(squared, (kh, 1), (1, 1), (ph, 0), (1, 1))
            return _BoxSum.apply(rows, (1, kw), (1, 1), (0, pw), (1, 1))
        return _BoxSum.apply(squared, self.kernel_size, self.stride, self.padding, self.dilation)

    def _response(self, x: torch.Tensor) -> torch.Tensor:
        if self._reads_encoded_image(x):
            return _conv_of_encoded_image(x, self._weight(), self.bias, self.stride, self.padding, self.dilation)
        return F.conv2d(x, self._weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.b != 1 and self._fuses_input_gradients(x):
            out, squares = _ResponseAndSumOfSquares.apply(x, self._weight(), self.bias, (self.stride, self.padding, self.dilation))
            return _bcos_scale(out, _inverse_norm(self._receptive_field_sum(squares)), self.b, False, overwrite=True)
        if self.can_fuse_epilogue():  # inference (b = 2)
            return self.forward_with_epilogue(x)
        out = self._response(x)
        if self.b == 1:
            return out
        with _graph_unless(self.explanation_mode):
            inv_norm = self.inverse_input_norm(x)
        return _bcos_scale(out, inv_norm, self.b, self.explanation_mode, overwrite=True)

    def _fuses_input_gradients(self, x: torch.Tensor) -> bool:
        """Whether x gets gradients from the conv and its norm, summed in one node (training)."""
        fusable = self.groups == 1 and not isinstance(self.padding, str) and not self.explanation_mode
        return fusable and x.requires_grad and torch.is_grad_enabled()

    def can_fuse_epilogue(self) -> bool:
        """Whether `forward_with_epilogue` applies: b = 2, no autograd, outside explanation mode."""
        return _fuses_epilogue(self)

    def forward_with_epilogue(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` for inference (`can_fuse_epilogue`): the B-cos scale applied to each
        slice of the response in place, from the sums of squares (`_square_scale_in_place`)."""
        return _square_scale_in_place(self._response(x), self._receptive_field_squares(x), from_squares=True)


class BcosLinear(ExplainableModule, nn.Linear):
    """B-cos linear layer over the last dimension (also used per position as a 1×1 conv)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        b: float = 2.0,
        normalize_weights: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.b = _check_b(b)
        self.normalize_weights = normalize_weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, b={self.b}, normalize_weights={self.normalize_weights}"

    def _weight(self) -> torch.Tensor:
        if not self.normalize_weights:
            return self.weight
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)

    @staticmethod
    def input_norm(x: torch.Tensor) -> torch.Tensor:
        """L2 norm of x over the features."""
        return (_SumOfSquares.apply(x, -1) + NORM_EPS).sqrt()

    @staticmethod
    def inverse_input_norm(x: torch.Tensor) -> torch.Tensor:
        """1 / ``input_norm(x)``: what the forward pass multiplies by."""
        return _inverse_norm(_SumOfSquares.apply(x, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.b == 1:
            return F.linear(x, self._weight(), self.bias)
        if not self.explanation_mode and torch.is_grad_enabled() and x.requires_grad:
            # x gets gradients from the response and its norm: summed in one node.
            out, squares = _ResponseAndSumOfSquares.apply(x, self._weight(), self.bias, None)
            return _bcos_scale(out, _inverse_norm(squares), self.b, False, overwrite=True)
        with _graph_unless(self.explanation_mode):
            inverse_input_norm = self.inverse_input_norm(x)
        out = F.linear(x, self._weight(), self.bias)
        return _bcos_scale(out, inverse_input_norm, self.b, self.explanation_mode, overwrite=True)


class _UncenteredBatchNormTraining(torch.autograd.Function):
    """y = x · weight / std_batch(x) with batch statistics, through the native batch-norm kernels.

    Computing the statistics with ``var_mean`` and letting autograd differentiate it was 2-3× slower
    on CPU than the fused kernels of standard batch norm; here the native kernels compute the
    statistics (and update the running buffers) and the per-channel sums of the backward pass.
    With x̂ = (x - μ)·s and s = 1/std: dL/dx = w·s·(g - x̂·(mean(g·x̂) + μ·s·mean(g))) and
    dL/dw = Σ g·x̂ + μ·s·Σ g.
    """

    @staticmethod
    def forward(ctx, x, weight, running_mean, running_var, momentum, eps):
        centred, mean, invstd = torch.native_batch_norm(x, weight, None, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return centred.add_((mean * invstd * weight).to(centred.dtype).view(1, -1, 1, 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        _, sum_grad_xhat, sum_grad = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        count = x.numel() // x.shape[1]
        mean_s = mean * invstd
        correction = (sum_grad_xhat + mean_s * sum_grad) / count
        gain = weight * invstd
        # dL/dx = g·gain - (x - μ)·gain·s·correction, as g·gain + x·slope + offset per channel:
        # one fused pass per slice instead of four full passes.
        slope = gain * invstd * correction
        coefficients = [c.to(grad.dtype).view(1, -1, 1, 1) for c in (gain, -slope, slope * mean)]
        grad_x = _output_buffer(grad, grad.dtype)
        for gx, g, xs, g_gain, x_slope, offset in _sliced(grad_x, grad, x, *coefficients):
            torch.mul(g, g_gain, out=gx).addcmul_(xs, x_slope).add_(offset)
        grad_weight = sum_grad_xhat + mean_s * sum_grad
        return grad_x, grad_weight, None, None, None, None


class BcosBatchNorm2d(ExplainableModule, nn.BatchNorm2d):
    """Batch norm whose std is detached in explanation mode.

    ``centered=False`` (B-cos): ``x / std * weight`` with no mean subtraction and no bias, so the
    layer is linear in x given its statistics. ``centered=True`` is the standard batch norm, used
    to reproduce a source model exactly.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, centered: bool = False, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, device=device, dtype=dtype)
        if not centered:
            self.register_parameter("bias", None)

    @property
    def centered(self) -> bool:
        return self.bias is not None

    def _momentum(self) -> float:
        """The running-average factor of this step (cumulative average when momentum is None)."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centered and not self.explanation_mode:
            return super().forward(x)
        if self.training and not self.explanation_mode and not self.centered:
            self.num_batches_tracked.add_(1)
            return _UncenteredBatchNormTraining.apply(x, self.weight, self.running_mean, self.running_var, self._momentum(), self.eps)
        if self.training:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = torch.rsqrt(var + self.eps)
        if self.explanation_mode:
            inv_std = inv_std.detach()
        gain = (inv_std * self.weight).to(x.dtype).view(1, -1, 1, 1)
        if not self.centered:
            return x * gain
        return (x - mean.to(x.dtype).view(1, -1, 1, 1)) * gain + self.bias.view(1, -1, 1, 1)


class _LayerNormDetachedStd(torch.autograd.Function):
    """Layer norm over the last dim whose 1/std is a constant for the backward pass.

    The forward is the fused layer-norm kernel; the backward is that of the linear map
    x -> (x - mean(x))·(1/std)·w (+ b) with 1/std fixed: the centring projection is its own
    adjoint, so dx = (1/std)·(g·w - mean(g·w)). One op instead of the five that autograd recorded
    (and whose intermediates it kept) for the same explanation-mode layer norm.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
        y, _, inv_std = torch.native_layer_norm(x, weight.shape, weight, bias, eps)
        if inv_std.dtype == torch.float16:
            # float16's 1/std overflows for a token of (nearly) zero variance, 1/sqrt(eps) > 65504
            # (the zero-initialised class tokens of a DeiT built from a config): kept in float32.
            inv_std = torch.rsqrt(x.float().var(-1, unbiased=False, keepdim=True) + eps)
        # x only serves the weight gradient (explain() freezes the weights: nothing kept then).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, inv_std)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, inv_std = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            weighted = grad * weight
            centred = weighted - weighted.mean(-1, keepdim=True)
            if centred.dtype == inv_std.dtype:
                grad_input = centred.mul_(inv_std)
            else:  # a float16 layer's float32 1/std, multiplied before rounding to float16
                grad_input = (centred.to(inv_std.dtype) * inv_std).to(centred.dtype)
        if ctx.needs_input_grad[1]:
            normalized = (x - x.mean(-1, keepdim=True)).to(inv_std.dtype) * inv_std
            grad_weight = (grad.to(inv_std.dtype) * normalized).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum_to_size(weight.shape)
        return grad_input, grad_weight, grad_bias, None


class BcosLayerNorm(ExplainableModule, nn.LayerNorm):
    """Layer norm over the channel dimension whose std is detached in explanation mode.

    Centring (subtracting the mean over channels) is a linear map of x and stays. ``bias=False``
    drops the additive term. ``channels_first`` normalises dim 1 of an (N, C, H, W) tensor.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = False, channels_first: bool = False, device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, bias=bias, device=device, dtype=dtype)
        self.channels_first = channels_first

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels_first={self.channels_first}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        if self.explanation_mode and differentiable_explanation():
            # The reference expression, which autograd differentiates twice (the fused node's
            # backward is not differentiable).
            inv_std = explanation_constant(lambda t: torch.rsqrt(t.var(-1, unbiased=False, keepdim=True) + self.eps), x)
            y = (x - x.mean(-1, keepdim=True)) * inv_std * self.weight
            y = y if self.bias is None else y + self.bias
        elif self.explanation_mode:
            y = _LayerNormDetachedStd.apply(x, self.weight, self.bias, self.eps)
        else:
            y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1) if self.channels_first else y


def _window_views(x: torch.Tensor, dim: int, kernel_size: int, stride: int, length: int) -> list:
    """The ``kernel_size`` strided views of x along ``dim`` whose j-th holds element j of each of
    ``length`` pooling windows."""
    return [x[(slice(None),) * dim + (slice(j, j + stride * (length - 1) + 1, stride),)] for j in range(kernel_size)]


def _max_along(x: torch.Tensor, dim: int, kernel_size: int, stride: int, length: int, with_indices: bool):
    """Max over 1-D windows along ``dim``; with the index of each window's first maximum (uint8)."""
    views = _window_views(x, dim, kernel_size, stride, length)
    maximum, index = views[0], None
    for j, view in enumerate(views[1:], start=1):
        if with_indices:
            # The running maximum only grows: the first maximum is the last tap that strictly
            # exceeded it, max_j(j·[tap j > running max]). (masked_fill_ was 5× slower.)
            greater = torch.gt(view, maximum).view(torch.uint8)
            index = greater if index is None else torch.maximum(index, greater.mul_(j), out=index)
        maximum = torch.maximum(maximum, view)
    if with_indices and index is None:  # windows of one element
        index = torch.zeros(maximum.shape, dtype=torch.uint8, device=x.device)
    return maximum, index


def _pooled_sizes(x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> tuple:
    """(height, width) of max pooling's output, without ceil mode."""
    return tuple((size + 2 * padding - kernel_size) // stride + 1 for size in x.shape[-2:])


class _SeparableMaxPool(torch.autograd.Function):
    """2-D max pooling as a max over rows, then over columns, for square windows without dilation.

    The values are max_pool2d's; so are the indices of each window's first maximum (row-major),
    from which max_pool2d's own backward kernel routes the gradient. Windows with a NaN or only
    -inf take their indices from max_pool2d itself.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
        with_indices = ctx.needs_input_grad[0]
        padded = F.pad(x, (padding,) * 4, value=-math.inf) if padding else x
        out_h, out_w = _pooled_sizes(x, kernel_size, stride, padding)
        rows, column_tap = _max_along(padded, 3, kernel_size, stride, out_w, with_indices)
        out, row_tap = _max_along(rows, 2, kernel_size, stride, out_h, with_indices)
        if with_indices:
            if out.amin() > -math.inf:
                # Padded row and column of each window's first maximum: the row's first, in the
                # first row that holds it (column_tap has one entry per padded row).
                window_starts = torch.arange(0, stride * max(out_h, out_w), stride, device=x.device)
                row = row_tap.long().add_(window_starts[:out_h].view(-1, 1))
                column = column_tap.gather(2, row).long().add_(window_starts[:out_w])
                indices = row.sub_(padding).mul_(x.shape[-1]).add_(column).sub_(padding)
            else:
                # A window holding a NaN or only -inf (a diverging model): max_pool2d's kernel
                # selects the last NaN (each NaN replaces its running maximum) or the first element
                # inside the image, where the comparisons above keep an earlier tap or the -inf
                # padding, an index outside the image that the backward kernel would write to.
                # The values agree; the indices come from the native kernel. Telling costs one
                # reduction over the output.
                indices = torch.ops.aten.max_pool2d_with_indices(x, [kernel_size] * 2, [stride] * 2, [padding] * 2)[1]
            ctx.save_for_backward(x, indices)
            ctx.geometry = (kernel_size, stride, padding)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, indices = ctx.saved_tensors
        kernel_size, stride, padding = ctx.geometry
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, [kernel_size] * 2, [stride] * 2, [padding] * 2, [1, 1], False, indices
        )
        return grad_input, None, None, None


class SeparableMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` computed as two 1-D passes of element-wise maxima on CPU.

    Max pooling is piecewise linear (it selects), so it needs no explanation mode. On CPU the native
    kernel compares one element at a time: for ResNet's 3×3/2 pooling of the stem output the two
    vectorised passes take 11 ms against 49 ms forward, 30 ms against 52 ms with the backward pass
    (batch 8, measured). The values, indices and gradients are those of max_pool2d for every input
    (tests/test_fault_injection_layers.py). Other devices, dilation, ceil_mode, returned indices,
    traced code and geometries max_pool2d refuses take the native kernel.
    """

    def _separable(self, x: torch.Tensor) -> bool:
        square = all(isinstance(v, int) for v in (self.kernel_size, self.stride, self.padding))
        plain = square and self.dilation == 1 and not self.ceil_mode and not self.return_indices
        usual = x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.numel() > 0
        # A differentiable explanation differentiates the pooling twice: the native kernel's
        # backward is differentiable, this one's is not.
        if not (plain and usual) or torch.compiler.is_compiling() or differentiable_explanation():
            return False
        # Geometries the native kernel refuses go to it for its error message; the taps of a
        # window are counted in uint8.
        valid = 0 < self.kernel_size <= 256 and self.stride > 0 and 0 <= self.padding <= self.kernel_size // 2
        return valid and min(_pooled_sizes(x, self.kernel_size, self.stride, self.padding)) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._separable(x):
            return super().forward(x)
        return _SeparableMaxPool.apply(x, self.kernel_size, self.stride, self.padding)
