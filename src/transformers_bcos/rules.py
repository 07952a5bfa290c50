"""B-cosification as rules per kind of module, applied to a model's own modules and forward.

A model of any family is made a B-cos model by replacing each module by its B-cos counterpart
according to the module's *type* (never its name): convolutions and linear layers become B-cos
layers, normalisations detach their statistics in explanation mode, activations and gates detach
their gates, and attention, through transformers' `AttentionInterface`, detaches its
probabilities. The family's own forward code runs unchanged, so every family built only of
covered module types is covered, with no code of its own. timm's module types (its norm-activation
layers, layer norms, activation classes, inline attention and the tokens its `VisionTransformer`
adds) have rules of their own, looked up only where timm is imported.

Two rules need to know where the pixels enter:

* the module that reads the pixels (the first convolution) reads the encoding [x, 1 - x], twice
  the channels of the source;
* the module around it that adds learned constants (class and register tokens, position
  embeddings) makes them linear in the input (`LinearizedConstants`), so explanations stay
  complete.

This file travels with saved checkpoints (``trust_remote_code``): it imports torch,
transformers and the standard library only.
"""

import contextlib
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.activations import ACT2CLS

from .layers import (
    BcosBatchNorm2d,
    BcosConv2d,
    BcosLayerNorm,
    BcosLinear,
    ExplainableModule,
    SeparableMaxPool2d,
    differentiable_explanation,
    explanation_constant,
)

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError:  # pragma: no cover
    AttentionInterface = sdpa_attention_forward = None

# The name under which the B-cos attention function is registered in `AttentionInterface`.
BCOS_ATTENTION = "bcos"

# Modules with a non-linearity of their own that no rule makes explainable: left as they are and
# reported, so that the conversion can refuse a model whose output depends on them.
UNSUPPORTED_MODULES = (
    nn.MultiheadAttention,
    nn.Softmax,
    nn.Softmin,
    nn.LogSoftmax,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
    nn.Tanh,
    nn.Softplus,
    nn.ELU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Mish,
)


# ----------------------------------------------------------------------------------------------
# Activations and gates
# ----------------------------------------------------------------------------------------------


def out_of_place(module: nn.Module) -> nn.Module:
    """``module`` made to return a new tensor: a B-cos convolution or linear layer saves its output
    for its backward pass, which an in-place activation or gate right after it (VGG's
    ``nn.ReLU(inplace=True)``, the squeeze-excitation activations of EfficientNet) would overwrite.
    The values are the same."""
    if getattr(module, "inplace", False):
        module.inplace = False
    return module


class GatedActivation(ExplainableModule):
    """An element-wise activation f written as f(x) = (f(x) / x) · x, whose gate f(x) / x is a
    constant in explanation mode.

    It wraps the source's own activation module, so every activation (ReLU, ReLU6, GELU and its
    approximations, SiLU, quick GELU, ...) is covered by this one rule. The activation runs out of
    place (`out_of_place`).
    """

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = out_of_place(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A ReLU is piecewise linear: its own gradient already is its (constant) gate [x > 0], so
        # it runs as it is. The gate as relu(x) / x (a comparison, a division and a selection per
        # activation) took about 180 ms of ResNet-50's 2.9 s explain() (BENCHMARKS.md).
        if not self.explanation_mode or type(self.activation) is nn.ReLU:
            return self.activation(x)
        return explanation_constant(self._gate, x) * x

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        # Where x = 0 the product is 0 whatever the gate: 0 avoids 0/0. A differentiable
        # explanation also divides by 1 there: the unselected 0/0 would make the gradient NaN.
        zero = x == 0
        denominator = x.masked_fill(zero, 1.0) if differentiable_explanation() else x
        return torch.where(zero, torch.zeros_like(x), self.activation(x) / denominator)


class DetachedGate(ExplainableModule):
    """A gating non-linearity (the sigmoid of squeeze-excitation) whose output is a constant in
    explanation mode: the product it gates is then linear in the gated features."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = out_of_place(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.explanation_mode:
            return self.gate(x)
        return explanation_constant(self.gate, x)


class BcosGlobalResponseNorm(ExplainableModule):
    """ConvNeXtV2's global response normalisation, x + γ·(x·N(x)) (+ β), with the normaliser
    N(x) (a ratio of spatial norms) a constant in explanation mode and no β in B-cos models."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter]):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normaliser = explanation_constant(self._normaliser, x) if self.explanation_mode else self._normaliser(x)
        out = self.weight * (x * normaliser) + x
        return out if self.bias is None else out + self.bias

    @staticmethod
    def _normaliser(x: torch.Tensor) -> torch.Tensor:
        spatial_norm = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)


def _is_gating_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sigmoid, nn.Hardsigmoid, *_timm_types("Sigmoid", "HardSigmoid")))


def _activation_classes() -> tuple:
    """Element-wise activations f with f(0) = 0: torch's and transformers' ``ACT2FN`` classes."""
    torch_activations = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)
    ours = []
    for name, entry in ACT2CLS.items():
        cls = entry[0] if isinstance(entry, tuple) else entry
        # Sigmoid/tanh-like entries are not activations with f(0) = 0; they are gates or refused.
        if isinstance(cls, type) and issubclass(cls, nn.Module) and not issubclass(cls, (nn.Sigmoid, nn.Tanh, nn.Identity)):
            if name not in ("linear", "sigmoid", "tanh", "leaky_relu", "prelu", "mish", "softmax"):
                ours.append(cls)
    return tuple(dict.fromkeys(torch_activations + tuple(ours)))


ACTIVATION_CLASSES = _activation_classes()


def activation_classes() -> tuple:
    """`ACTIVATION_CLASSES` and, where timm is imported, timm's own activation classes."""
    return ACTIVATION_CLASSES + _timm_types("GELU", "GELUTanh", "QuickGELU", "Swish", "HardSwish")


# ----------------------------------------------------------------------------------------------
# timm's module types
# ----------------------------------------------------------------------------------------------


def _timm_types(*names: str) -> tuple:
    """The classes of ``timm.layers`` with these names where timm is imported, else (). A timm
    model exists only once timm is imported, and this file must not import it: it travels with
    checkpoints that do not need it."""
    if "timm" not in sys.modules:
        return ()
    import timm.layers

    return tuple(getattr(timm.layers, name) for name in names if hasattr(timm.layers, name))


def _timm_vision_transformer() -> tuple:
    if "timm" not in sys.modules:
        return ()
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer,)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _explaining(module: nn.Module) -> bool:
    """Whether the B-cos projections of an attention module are in explanation mode. Read by
    attribute, not by class: a model loaded with remote code has its own copy of the classes."""
    return any(getattr(child, "explanation_mode", False) for child in module.modules())


def constant_probability_attention(query, key, value, scaling: float, mask=None) -> tuple:
    """(probabilities · value, probabilities) with the probabilities softmax(q·kᵀ·scaling + mask)
    a constant of the explanation: they weigh the values linearly. A boolean ``mask`` marks the
    keys each query may attend to; a float one is added to the scores."""

    def attention_probabilities(query, key):
        scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        # In at least float32 (float64 models keep their precision: the explanation's
        # derivative in the parameters is checked against finite differences there).
        return F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)

    probabilities = explanation_constant(attention_probabilities, query, key)
    return torch.matmul(probabilities, value), probabilities


def bcos_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention whose probabilities are a constant in explanation mode: softmax(q·kᵀ) then
    weighs the values linearly. Elsewhere it is SDPA, the same function computed faster."""
    if not _explaining(module):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    attn_output, probabilities = constant_probability_attention(query, key, value, scaling, attention_mask)
    return attn_output.transpose(1, 2).contiguous(), probabilities


def _scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` with its probabilities a constant of the explanation."""
    if enable_gqa:
        raise NotImplementedError("Grouped-query attention (enable_gqa=True) has no B-cos rule.")
    mask = attn_mask
    if is_causal:
        mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, probabilities = constant_probability_attention(query, key, value, scale, mask)
    return out if dropout_p == 0.0 else torch.matmul(F.dropout(probabilities, dropout_p), value)


class _ConstantAttentionProbabilities(TorchFunctionMode):
    """Within the forward of an attention module that computes its probabilities inline:
    softmax and `F.scaled_dot_product_attention` hold the probabilities constant."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.softmax, F.softmax, torch.Tensor.softmax):
            return explanation_constant(lambda t: func(t, *args[1:], **kwargs), args[0])
        if func is F.scaled_dot_product_attention:
            return _scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


class InlineAttention(ExplainableModule):
    """Mixed into an attention module whose forward computes its probabilities itself (timm's
    `Attention`, with `F.scaled_dot_product_attention` or a softmax): that forward runs as it is,
    in explanation mode with the probabilities constant. Its projections are B-cos linear layers
    by their own rule."""

    def forward(self, *args, **kwargs):
        if not self.explanation_mode:
            return super().forward(*args, **kwargs)
        with _ConstantAttentionProbabilities():
            return super().forward(*args, **kwargs)


if AttentionInterface is not None:
    AttentionInterface.register(BCOS_ATTENTION, bcos_attention_forward)


def use_bcos_attention(model: nn.Module) -> None:
    """Route every attention of ``model`` that goes through `AttentionInterface` to the B-cos
    attention function."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    for config in configs.values():
        config._attn_implementation_internal = BCOS_ATTENTION
        for key in getattr(config, "sub_configs", {}):
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                sub._attn_implementation_internal = BCOS_ATTENTION


# ----------------------------------------------------------------------------------------------
# Learned constants
# ----------------------------------------------------------------------------------------------


def token_units(encoded_pixels: torch.Tensor, reader: nn.Conv2d, num_tokens: int) -> torch.Tensor:
    """(N, num_tokens, 1): per token, the mean of x_c + (1 - x_c) over the pixels it belongs to.

    Identically 1 for an encoded image, yet linear in the input. The last H'·W' tokens are the
    patches of ``reader``'s output grid (their receptive fields); any tokens before them (class,
    register, distillation tokens) belong to the whole image. A layout of tokens other than
    that (fewer tokens than patches) is refused.
    """
    channels = encoded_pixels.shape[1] // 2
    ones = (encoded_pixels[:, :channels] + encoded_pixels[:, channels:]).mean(1, keepdim=True)
    padding = reader.padding if not isinstance(reader.padding, str) else 0
    per_patch = F.avg_pool2d(ones, reader.kernel_size, reader.stride, padding, count_include_pad=False).flatten(1)
    prefix = num_tokens - per_patch.shape[1]
    if prefix < 0:
        raise ValueError(f"Cannot place {num_tokens} tokens on a grid of {per_patch.shape[1]} patches.")
    per_image = ones.mean(dim=(1, 2, 3)).unsqueeze(1).expand(-1, prefix)
    return torch.cat([per_image, per_patch], dim=1).unsqueeze(-1)


class LinearizedConstants:
    """A forward hook on the module that turns pixels into tokens and adds learned constants.

    Its output is E(x) = P(x) + c with P homogeneous (the B-cos patch projection) and c the
    constants (E(0)). The hook returns P(x) + c·u(x), where u = `token_units` is 1 for an
    encoded image: the value is unchanged, but the constants are linear in the input and the
    explanation attributes each uniformly to the pixels of its token. A token-free output
    (a feature map) gets u from the pixels under each position.
    """

    def __init__(self, reader: nn.Conv2d):
        self.reader = reader
        self._computing_constants = False

    def __call__(self, module, args, kwargs, output):
        tokens = output[0] if isinstance(output, tuple) else output
        if self._computing_constants or not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            return output
        if args:
            encoded, zeros_args, zeros_kwargs = args[0], (torch.zeros_like(args[0]), *args[1:]), kwargs
        else:  # the pixels passed by keyword: the first 4-D tensor
            key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() == 4)
            encoded, zeros_args, zeros_kwargs = kwargs[key], (), {**kwargs, key: torch.zeros_like(kwargs[key])}
        self._computing_constants = True
        try:
            # Constant in the input; a differentiable explanation keeps their graph to the parameters.
            with contextlib.nullcontext() if differentiable_explanation() else torch.no_grad():
                constants = module(*zeros_args, **zeros_kwargs)
        finally:
            self._computing_constants = False
        constants = constants[0] if isinstance(constants, tuple) else constants
        units = token_units(encoded, self.reader, tokens.shape[1]).to(tokens.dtype)
        linear = tokens + constants * (units - 1)
        return (linear, *output[1:]) if isinstance(output, tuple) else linear


class LinearizedPositionEmbedding:
    """Mixed into timm's `VisionTransformer`, which adds its class and register tokens and its
    position embeddings to the patch tokens in its ``_pos_embed`` method, on the model itself:
    the constants are made linear in the input there, as `LinearizedConstants` does. The encoded
    pixels come from the pixel reader (`PixelInputRecorder`)."""

    pixel_input: "PixelInputRecorder"

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = super()._pos_embed(x)
        with contextlib.nullcontext() if differentiable_explanation() else torch.no_grad():
            constants = super()._pos_embed(torch.zeros_like(x))
        units = token_units(self.pixel_input.encoded, self.pixel_input.reader, tokens.shape[1]).to(tokens.dtype)
        return tokens + constants * (units - 1)


class PixelInputRecorder:
    """A forward pre-hook on the pixel reader keeping the encoded pixels of the current forward."""

    def __init__(self, reader: nn.Conv2d):
        self.reader = reader
        self.encoded = None

    def __call__(self, module, args):
        self.encoded = args[0]


def _holds_constants(module: nn.Module) -> bool:
    own = any(p is not None for p in module._parameters.values())
    return own or any(isinstance(child, nn.Embedding) for child in module.children())


def constants_module(model: nn.Module, reader: nn.Conv2d) -> Optional[nn.Module]:
    """The innermost module around the pixel reader that holds learned constants of its own
    (parameters, or an embedding table of positions), or None."""
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    module = parents.get(id(reader))
    while module is not None and module is not model:
        if _holds_constants(module):
            return module
        module = parents.get(id(module))
    return None


# ----------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------


def _swap_class(module: nn.Module, cls: type) -> None:
    """Make ``module`` an instance of its B-cos counterpart ``cls``, keeping its tensors."""
    module.__class__ = cls


def _own_forward(module: nn.Module, base: type) -> bool:
    """Whether a subclass of ``base`` replaces its forward (then no rule for ``base`` applies)."""
    return type(module).forward is not base.forward


def _drop(module: nn.Module, name: str, keep_bias: bool) -> None:
    if not keep_bias and getattr(module, name, None) is not None:
        module.register_parameter(name, None)
        # transformers initialises the tensors a checkpoint lacks with the source architecture's
        # own `_init_weights`, which may assume the bias (ResNet's batch norm: zeros_(module.bias)).
        # A B-cos module's tensors come from the source, from its initialisation before the rules
        # or from the checkpoint, whose missing keys loading reports: never from there.
        module._is_hf_initialized = True


def _convert_conv(module: nn.Conv2d, b: float, keep_bias: bool) -> Optional[str]:
    if _own_forward(module, nn.Conv2d):
        return "a subclass with a forward of its own"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    _swap_class(module, BcosConv2d)
    module.b, module.normalize_weights, module.encoded_image_input = float(b), False, False
    _drop(module, "bias", keep_bias)
    return None


def _convert_linear(module: nn.Linear, b: float, keep_bias: bool) -> Optional[str]:
    # timm's Linear only casts its bias under TorchScript.
    if _own_forward(module, nn.Linear) and not isinstance(module, _timm_types("Linear")):
        return "a subclass with a forward of its own"
    _swap_class(module, BcosLinear)
    module.b, module.normalize_weights = float(b), False
    _drop(module, "bias", keep_bias)
    return None


def _uncovered_batchnorm(module: nn.BatchNorm2d) -> Optional[str]:
    if module.weight is None or not module.track_running_stats:
        return "no affine weight or no running statistics"
    return None


def _convert_batchnorm(module: nn.BatchNorm2d, b: float, keep_bias: bool) -> Optional[str]:
    if _own_forward(module, nn.BatchNorm2d) and type(module).forward is not nn.modules.batchnorm._BatchNorm.forward:
        return "a subclass with a forward of its own"
    reason = _uncovered_batchnorm(module)
    if reason is None:
        _swap_class(module, BcosBatchNorm2d)
        _drop(module, "bias", keep_bias)
    return reason


class BcosBatchNormAct2d(BcosBatchNorm2d):
    """timm's `BatchNormAct2d` (batch norm, dropout and activation in one module) B-cosified: the
    B-cos batch norm, then its own dropout and activation (wrapped by the activation rule)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _convert_batchnorm_act(module: nn.BatchNorm2d, b: float, keep_bias: bool) -> Optional[str]:
    reason = _uncovered_batchnorm(module)
    if reason is None:
        _swap_class(module, BcosBatchNormAct2d)
        _drop(module, "bias", keep_bias)
    return reason


def _convert_layernorm(module: nn.LayerNorm, b: float, keep_bias: bool) -> Optional[str]:
    if module.weight is None:
        return "no affine weight"
    # timm's LayerNorm2d normalises the channels of (N, C, H, W) as ConvNeXt's "channels_first"
    # layer norms do; timm's LayerNorm is nn.LayerNorm with an optional fused kernel.
    channels_first = getattr(module, "data_format", "channels_last") == "channels_first" or isinstance(module, _timm_types("LayerNorm2d"))
    if _own_forward(module, nn.LayerNorm) and not hasattr(module, "data_format") and not isinstance(module, _timm_types("LayerNorm", "LayerNorm2d")):
        # ConvNeXt's layer norms only add a data format; any other forward of their own is unknown.
        return "a subclass with a forward of its own"
    if len(module.normalized_shape) != 1:
        return f"normalized_shape {tuple(module.normalized_shape)} (one dimension is supported)"
    _swap_class(module, BcosLayerNorm)
    module.channels_first = channels_first
    _drop(module, "bias", keep_bias)
    return None


def _convert_maxpool(module: nn.MaxPool2d, b: float, keep_bias: bool) -> Optional[str]:
    """Max pooling is piecewise linear (it selects) and needs no B-cos counterpart; plain
    ``nn.MaxPool2d`` takes the faster kernel of `SeparableMaxPool2d` (the same values, indices and
    gradients). Any other pooling stays as it is."""
    if type(module) is nn.MaxPool2d:
        _swap_class(module, SeparableMaxPool2d)
    return None


_MIXED_CLASSES = {}


def _mix_in(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of its own class with ``mixin`` in front (one class per pair)."""
    key = (mixin, type(module))
    if key not in _MIXED_CLASSES:
        _MIXED_CLASSES[key] = type(f"Bcos{type(module).__name__}", key, {})
    _swap_class(module, _MIXED_CLASSES[key])


def _convert_inline_attention(module: nn.Module, b: float, keep_bias: bool) -> Optional[str]:
    _mix_in(module, InlineAttention)
    return None


def _convert_timm_vision_transformer(module: nn.Module, b: float, keep_bias: bool) -> Optional[str]:
    _mix_in(module, LinearizedPositionEmbedding)
    return None


# (module types, rule) in the order they are tried; a rule returns None, or why it cannot apply.
STANDARD_RULES = (
    (nn.Conv2d, _convert_conv),
    (nn.Linear, _convert_linear),
    (nn.BatchNorm2d, _convert_batchnorm),
    (nn.LayerNorm, _convert_layernorm),
    (nn.MaxPool2d, _convert_maxpool),
)


def in_place_rules() -> tuple:
    """`STANDARD_RULES` preceded, where timm is imported, by the rules of timm's module types."""
    timm_rules = (
        (_timm_types("BatchNormAct2d"), _convert_batchnorm_act),
        (_timm_types("Attention"), _convert_inline_attention),
        (_timm_vision_transformer(), _convert_timm_vision_transformer),
    )
    return tuple(rule for rule in timm_rules if rule[0]) + STANDARD_RULES


def _wrapping_rule(module: nn.Module, keep_bias: bool) -> Optional[nn.Module]:
    """The module that replaces ``module`` in its parent, or None."""
    if isinstance(module, ExplainableModule):
        return None
    if isinstance(module, activation_classes()):
        return GatedActivation(module)
    if _is_gating_module(module):
        return DetachedGate(module)
    if type(module).__name__.endswith("GRN") and isinstance(getattr(module, "weight", None), nn.Parameter):
        return BcosGlobalResponseNorm(module.weight, module.bias if keep_bias else None)
    return None


def bcosify_modules(model: nn.Module, b: float, keep_bias: bool, normalize_weights: bool = False) -> list:
    """Apply the rules to every module of ``model``, in place; ``normalize_weights``: the B-cos
    layers use unit-norm filters (B-cos v2, for models trained from scratch). Returns the modules
    left as they are because no rule covers them: ``[(qualified name, type name, reason)]``."""
    left = []
    replacements = {}
    rules = in_place_rules()
    for name, module in list(model.named_modules()):
        if isinstance(module, (ExplainableModule, LinearizedPositionEmbedding)):
            continue
        for base, rule in rules:
            if isinstance(module, base):
                reason = rule(module, b, keep_bias)
                if reason:
                    left.append((name, type(module).__name__, reason))
                break
        else:
            replacement = _wrapping_rule(module, keep_bias)
            if replacement is not None:
                replacements[id(module)] = replacement
            elif isinstance(module, UNSUPPORTED_MODULES):
                left.append((name, type(module).__name__, "no B-cos rule for this module type"))
    # Found first, replaced after: a replacement holds the module it replaces as its child.
    slots = [(parent, key) for parent in model.modules() for key, child in parent._modules.items() if id(child) in replacements]
    for parent, key in slots:
        parent._modules[key] = replacements[id(parent._modules[key])]
    for module in model.modules():
        if isinstance(module, (BcosConv2d, BcosLinear)):
            module.normalize_weights = normalize_weights
    use_bcos_attention(model)
    return left


def find_pixel_reader(model: nn.Module, channels: int, encoded: bool = False) -> nn.Conv2d:
    """The module that reads the pixels: the first convolution of ``model`` (in the order its
    modules are built) with ``channels`` input channels (twice the pixel channels if ``encoded``).

    Found without running the model: models are built on the meta device, where a forward pass
    would leave meta tensors in the source code's caches (BEiT caches its relative position
    indices per window size). The conversion check confirms it is the first convolution the
    forward runs (`conversion.exactness`).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == channels:
            return module
    pixels = f"{channels // 2}-channel pixels (encoded as [x, 1 - x]: {channels} channels)" if encoded else f"{channels}-channel pixels"
    raise ValueError(
        f"{type(model).__name__} has no convolution that reads its {pixels}: B-cosification folds the input "
        "normalisation into that first convolution (a model whose pixels go first through a linear layer or a "
        "convolution of other channels has no rule yet)."
    )


def prepare_reader(model: nn.Module, reader: BcosConv2d) -> None:
    """Mark the pixel reader and make the constants around it linear in the input."""
    reader.encoded_image_input = True
    if isinstance(model, LinearizedPositionEmbedding):
        model.pixel_input = PixelInputRecorder(reader)
        reader.register_forward_pre_hook(model.pixel_input)
    holder = constants_module(model, reader)
    if holder is not None:
        holder.register_forward_hook(LinearizedConstants(reader), with_kwargs=True)
