"""The explanation core: explanation mode, dynamic linear weights, and rendering.

In explanation mode a B-cos network computes y = W(x)·x exactly, so one backward pass of the
explained scalar gives W(x) and the contributions W(x) ⊙ x, which sum to y.

This file travels with saved checkpoints (``trust_remote_code``): it imports torch,
transformers and the standard library only.
"""

import difflib
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .layers import DifferentiableFactors, ExplainableModule



@dataclass(frozen=True)
class Unit:
    """A unit inside the network to explain instead of a class: a channel of the output of the
    module named ``module`` (a name of ``model.named_modules()``), summed over its positions, or
    at one ``position``.

    The channel axis is dimension 1 of a feature map (N, C, H, W) or a vector (N, C), the last one
    of tokens (N, T, C); ``position`` is (h, w) in a feature map or a token index. Or ``select``:
    a function from the module's output to one value per image (N,), for anything else. In
    explanation mode every B-cos module's output is linear in the input, so the contributions sum
    to the unit's value exactly (without additive terms, as for classes); for an activation
    module that is its output, the gated value, not the input before the gate.
    """

    module: str
    channel: Optional[int] = None
    position: Optional[Union[int, tuple]] = None
    select: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __post_init__(self):
        if not isinstance(self.module, str) or not self.module:
            raise TypeError(f"Unit.module must be a module name of the model, got {self.module!r}.")
        if (self.channel is None) == (self.select is None):
            raise ValueError("A Unit needs exactly one of channel (an int) or select (a function of the module's output).")
        if self.channel is not None and (isinstance(self.channel, bool) or not isinstance(self.channel, int) or self.channel < 0):
            raise ValueError(f"Unit.channel must be a channel index >= 0, got {self.channel!r}.")

    def value(self, output: torch.Tensor) -> torch.Tensor:
        """The unit's value per image, (N,), from the module's output; a ValueError naming the
        module when the channel or position does not exist there."""
        if self.select is not None:
            value = self.select(output)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (output.shape[0],):
                raise ValueError(f"Unit.select must return one value per image, shape ({output.shape[0]},), got {getattr(value, 'shape', type(value).__name__)}.")
            return value
        tokens = output.dim() == 3
        channels = output.shape[-1] if tokens else output.shape[1]
        if output.dim() not in (2, 3, 4):
            raise ValueError(f"{self.module} outputs shape {tuple(output.shape)}: pass select= to say which value to explain.")
        if self.channel >= channels:
            raise ValueError(f"Channel {self.channel} is out of range: {self.module} has {channels} channels (0..{channels - 1}).")
        unit = output[..., self.channel] if tokens else output[:, self.channel]
        if self.position is None:
            return unit.reshape(unit.shape[0], -1).sum(1)
        position = (self.position,) if isinstance(self.position, int) else tuple(self.position)
        grid = tuple(unit.shape[1:])
        if len(position) != len(grid) or not all(0 <= p < g for p, g in zip(position, grid)):
            raise ValueError(f"Position {self.position!r} is outside {self.module}'s output grid {grid}.")
        return unit[(slice(None), *position)]


    def find_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module of ``model`` named ``module``, or a ValueError naming similar ones."""
        modules = dict(model.named_modules())
        if self.module not in modules:
            close = difflib.get_close_matches(self.module, [name for name in modules if name], n=5, cutoff=0.6)
            hint = f" Similar names: {', '.join(close)}." if close else " See model.named_modules()."
            raise ValueError(f"The model has no module named {self.module!r}.{hint}")
        return modules[self.module]


def is_unit(target) -> bool:
    """Whether ``target`` is a `Unit`, of this module or of another copy of it: a model or pipeline
    loaded with remote code has its own copy of the classes. Read by attributes, not by class."""
    return all(callable(getattr(target, name, None)) for name in ("find_module", "value")) and hasattr(target, "module")


@contextmanager
def captured_output(module: torch.nn.Module):
    """While active, the returned dict holds ``module``'s last output under "output" (the first
    tensor of a tuple or ModelOutput)."""
    captured = {}

    def hook(_, args, output):
        if not isinstance(output, torch.Tensor):
            output = output[0] if isinstance(output, (tuple, list)) else next(v for v in output.values() if isinstance(v, torch.Tensor))
        captured["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


TargetType = Union[None, int, str, Sequence[Union[int, str]], torch.Tensor, Unit]


@contextmanager
def explanation_mode(model: torch.nn.Module, enabled: bool = True):
    """Switch every B-cos layer of ``model`` into (or out of) explanation mode, and restore it."""
    layers = [m for m in model.modules() if isinstance(m, ExplainableModule)]
    previous = [m.explanation_mode for m in layers]
    for m in layers:
        m.explanation_mode = enabled
    try:
        yield model
    finally:
        for m, mode in zip(layers, previous):
            m.explanation_mode = mode


def resolve_targets(target: TargetType, logits: torch.Tensor, label2id: Optional[dict] = None) -> torch.Tensor:
    """Turn a user ``target`` into a (N,) long tensor of class indices, validating it first.

    ``None`` takes the predicted class; an int or a label name applies to every image; a sequence
    or tensor gives one target per image.
    """
    n, num_classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    label2id = label2id or {}

    def index_of(t) -> int:
        if isinstance(t, str):
            if t not in label2id:
                known = ", ".join(repr(k) for k in list(label2id)[:20])
                raise ValueError(f"Unknown label {t!r}; the model's labels include: {known}.")
            return int(label2id[t])
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"A target must be an int class index or a label name, got {type(t).__name__}.")
        return t

    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"A target tensor must hold integer class indices, got dtype {target.dtype}.")
        targets = target.reshape(-1).tolist()
        if target.dim() == 0:
            targets = targets * n
    elif isinstance(target, (list, tuple)):
        targets = [index_of(t) for t in target]
    else:
        targets = [index_of(target)] * n
    if len(targets) != n:
        raise ValueError(f"Got {len(targets)} targets for a batch of {n} images.")
    bad = [t for t in targets if not 0 <= t < num_classes]
    if bad:
        raise ValueError(f"Target {bad[0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1}).")
    return torch.tensor(targets, dtype=torch.long, device=logits.device)


@contextmanager
def _differentiable_factors(factors: Optional[DifferentiableFactors]):
    """Make explanation mode record and replay ``factors`` (None: a plain explanation)."""
    previous = ExplainableModule.differentiable_factors
    ExplainableModule.differentiable_factors = factors
    try:
        yield
    finally:
        ExplainableModule.differentiable_factors = previous


def dynamic_linear_weights(
    model: torch.nn.Module,
    encoded_inputs: torch.Tensor,
    explained_output: Callable[[torch.Tensor], torch.Tensor],
    create_graph: bool = False,
):
    """Run ``model`` in explanation mode and return ``(W(x), y, aux)``.

    ``explained_output(x6)`` returns ``(y, aux)`` with y of shape (N, ...): one scalar per image
    and output slot, each depending on its own image only. The gradient of a weighted sum of y
    over a batch is therefore every image's W(x) at once (times its weight), and it is taken with
    respect to the input only: no parameter gradient is accumulated. For several outputs per image (N, T), the
    weights come back as (N, T, C, H, W), one backward pass per slot.

    Each image's output is weighted by the power of two 2^-k that brings it into [0.5, 1)
    (`_unit_seeds`), and W(x) divided by it afterwards: exact in binary floating point,
    and the gradients inside the network then have the magnitudes of a unit output whatever the
    model's output scale (a freshly converted model's 1e-5 would otherwise put W(x) below the
    smallest float16 number). W(x) and y come back in at least float32, so that the contributions
    summed from them lose nothing more to rounding.

    ``create_graph``: W(x) comes back with a graph to the parameters, whose gradient is the total
    derivative of the function θ -> W(x; θ) that the plain call computes. The dynamic factors are
    constant in the input, as always, but keep their dependence on the parameters: a first
    forward pass of x detached records them with autograd, and the explained pass of x replays
    them (`layers.DifferentiableFactors`). The parameters stay trainable; nothing is accumulated
    in their ``.grad``. Twice the forward cost, and every path the input gradient takes must be
    differentiable twice: the layers take their reference expressions there.
    """
    was_training = model.training
    # Only the input needs a gradient: with the parameters frozen meanwhile, autograd keeps no
    # activations for weight gradients, which halves explain()'s memory.
    trainable = [] if create_graph else [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        for p in trainable:
            p.requires_grad_(False)
        factors = DifferentiableFactors() if create_graph else None
        with torch.enable_grad(), explanation_mode(model), _differentiable_factors(factors):
            if factors is not None:
                explained_output(encoded_inputs.detach())  # records the factors
                factors.replaying = True
            x = encoded_inputs.detach().requires_grad_(True)
            y, aux = explained_output(x)
            if factors is not None and factors.replayed != len(factors.factors):
                raise RuntimeError("The explained forward pass used fewer dynamic factors than the first pass recorded.")
            _warn_below_float16_range(y.detach())
            flat = y.reshape(y.shape[0], -1)
            seeds = _unit_seeds(flat.detach())
            dtype = torch.promote_types(x.dtype, torch.float32)
            slots = []
            for j in range(flat.shape[1]):
                (w,) = torch.autograd.grad(flat[:, j], x, seeds[:, j], retain_graph=create_graph or j + 1 < flat.shape[1], create_graph=create_graph)
                slots.append(w.to(dtype).div_(seeds[:, j].to(dtype).view(-1, *[1] * (x.dim() - 1))))
            weights = (slots[0].unsqueeze(1) if len(slots) == 1 else torch.stack(slots, dim=1)).reshape(*y.shape, *x.shape[1:])
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return weights if create_graph else weights.detach(), y.detach().to(dtype), aux


def _warn_below_float16_range(y: torch.Tensor) -> None:
    """float16 holds numbers below its smallest normal one, 6.1e-5, with few significant bits:
    an explained output there (a freshly converted model's often is) and its contributions can
    differ by tens of percent. Said, since nothing else shows it."""
    if y.dtype != torch.float16:
        return
    small = int((y.abs() < torch.finfo(torch.float16).tiny).sum())
    if small:
        warnings.warn(
            f"{small} of {y.numel()} explained outputs lie below float16's smallest normal number (6.1e-05), "
            "where it keeps few digits: their contributions may miss them by tens of percent. Explain in "
            "bfloat16 or float32 for exact sums.",
            stacklevel=4,
        )


def _unit_seeds(y: torch.Tensor) -> torch.Tensor:
    """Powers of two 2^-k, in y's dtype, with |y|·2^-k in [0.5, 1) where y is finite and not 0
    (1 elsewhere), the exponent bounded so that the seed itself is a finite number of the dtype."""
    _, exponent = torch.frexp(y)
    largest = math.frexp(torch.finfo(y.dtype).max)[1] - 1
    exponent = exponent.neg_().clamp_(-largest, largest).masked_fill_(~torch.isfinite(y) | (y == 0), 0)
    return torch.pow(2.0, exponent.double()).to(y.dtype)


def rgba_explanation(weights: torch.Tensor, encoded_inputs: torch.Tensor, smoothing: Optional[int] = None, percentile: float = 99.5) -> torch.Tensor:
    """Render (N, 6, H, W) dynamic linear weights as (N, H, W, 4) RGBA images in [0, 1].

    The B-cos reference recipe: colour = the weights' own colour channels, opacity = their norm
    where the contribution is positive, scaled to the given percentile.
    ``smoothing`` is an odd average-pool kernel for the opacity (None: 15 px per 224 px, none
    below 45 px).
    """
    w = weights.detach().float()
    contributions = (w * encoded_inputs.detach().float()).sum(1, keepdim=True)
    w_n = (w / (w.abs().amax(1, keepdim=True) + 1e-12)).clamp_min(0)
    rgb = w_n[:, :3] / (w_n[:, :3] + w_n[:, 3:] + 1e-12)
    alpha = w.norm(dim=1, keepdim=True) * (contributions >= 0)
    if smoothing is None:  # the reference's 15 px at 224 px, scaled; none for tiny images
        smoothing = int(15 * w.shape[-1] / 224)
        smoothing -= 1 - smoothing % 2
    if smoothing > 1:
        # Zero padding counted in the mean, as in the reference (B-cos-v2's avg_pool2d default):
        # opacity fades towards the border.
        alpha = F.avg_pool2d(alpha, smoothing, stride=1, padding=smoothing // 2, count_include_pad=True)
    scale = torch.quantile(alpha.flatten(1), percentile / 100.0, dim=1).clamp_min(1e-12)
    alpha = (alpha / scale.view(-1, 1, 1, 1)).clamp(0, 1)
    return torch.cat([rgb, alpha], dim=1).permute(0, 2, 3, 1)


@dataclass
class BcosExplanationOutput(ModelOutput):
    """The explanation of one scalar output per image.

    Args:
        contributions: (N, H, W) per-pixel contributions, ``(W(x) ⊙ x)`` summed over the 6 input
            channels. They sum to ``explained_output`` (completeness).
        dynamic_linear_weights: (N, 6, H, W) W(x), the gradient of the explained output with
            respect to the encoded input [r, g, b, 1-r, 1-g, 1-b].
        target: (N,) the explained class of each image.
        explained_output: (N,) the explained scalar: the target's logit without the fixed logit
            bias (the model's ``bias_free_logits``, never a difference with the bias).
        logits: (N, C) the model's logits.
        encoded_pixel_values: (N, 6, H, W) the explained input in the 6-channel encoding.
    """

    contributions: torch.Tensor = None
    dynamic_linear_weights: torch.Tensor = None
    target: torch.Tensor = None
    explained_output: torch.Tensor = None
    logits: torch.Tensor = None
    encoded_pixel_values: torch.Tensor = None

    def to_rgba(self, smoothing: Optional[int] = None, percentile: float = 99.5):
        """(N, H, W, 4) float numpy RGBA images of the explanations (reference recipe)."""
        return rgba_explanation(self.dynamic_linear_weights, self.encoded_pixel_values, smoothing, percentile).cpu().numpy()
