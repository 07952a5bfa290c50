"""The conversion's run-time guarantee: a converted model's explanations are complete.

`check_exactness` runs the converted model once in float64 on a small random image: the
contributions of its explanation must sum to the explained output, and a b = 1 model with biases
must reproduce the source. When they do not, `nonlinear_modules` finds the modules to blame: in
explanation mode every module must be a linear map of its input x given the detached factors,
so Σ x ⊙ ∂(u·f(x))/∂x = u·f(x) (Euler's identity) for any u; the innermost modules where it fails
are named with their relative error.
"""

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from ..explanation import explanation_mode
from ..layers import ExplainableModule
from ..modeling_bcos import logits_of

# Relative errors in float64 are ~1e-15 for exact conversions. A module that breaks exactness
# can weigh little in a freshly converted model (B-cos layers shrink what passes through them):
# DINOv2's SwiGLU MLPs in a tiny random model gave 3e-7.
COMPLETENESS_TOLERANCE = 1e-10
# b = 1 with biases against the source: the folded first layer is stored in the model's dtype,
# whose rounding (6e-8 in float32) the float64 pass sees.
EQUIVALENCE_TOLERANCE = 1e-6
# The side of the random check image, where the model accepts other sizes than its own.
CHECK_IMAGE_SIZE = 64
# Where the rules families' source architecture sits in a B-cos model.
UNCONVERTED_PREFIX = "backbone.model."


class ExactnessError(ValueError):
    """A converted model whose explanations would not be exact (the message names the modules)."""


def relative_error(value: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> float:
    return float((value - reference).abs().max() / scale.abs().max().clamp_min(torch.finfo(scale.dtype).tiny))


def _own_image_size(model) -> tuple:
    config = model.config.backbone_config
    size = getattr(getattr(config, "vision_config", config), "image_size", 224)
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def check_exactness(model: nn.Module, source: Optional[nn.Module] = None, mean=None, std=None) -> dict:
    """Raise an `ExactnessError` unless ``model``'s explanations are complete in float64 (for a
    model without additive terms) and, with ``source``, its logits are the source's on the same
    image normalised by mean/std.

    Modules that no rule converted (``model.backbone.unconverted``) and that run in the forward
    are refused by name. Returns the measured relative errors.
    """
    check_model, x, logits, convolutions, probes = _checked_copy(model)
    _refuse_unconverted(logits, probes)
    _check_pixel_reader(check_model, convolutions)
    errors = {}
    if not check_model.config.use_bias:  # additive terms are not attributed to pixels
        explanation = check_model.explain(x)
        if not explanation.contributions.any():
            warnings.warn(
                "The converted model's output on the check image is exactly 0 in float64 (each B-cos layer shrinks the "
                "signal by |cos(w, x)|; without norms to rescale it, it can underflow): completeness could not be "
                "measured. Re-estimate its batch-norm statistics or fine-tune it before relying on its explanations.",
                stacklevel=3,
            )
        scale = torch.maximum(explanation.explained_output.abs(), explanation.contributions.abs().sum((1, 2)))
        errors["completeness"] = relative_error(explanation.contributions.sum((1, 2)), explanation.explained_output, scale)
    if source is not None:
        reference = copy.deepcopy(source).double().eval()
        # The source as the converted model runs it: position embeddings interpolated to x's size.
        options = {"interpolate_pos_encoding": True} if getattr(check_model.backbone, "interpolate_pos_encoding", False) else {}
        with torch.no_grad():
            expected = logits_of(reference(normalised(x, mean, std), **options))
        errors["equivalence"] = relative_error(logits.detach(), expected, expected)
    raise_if_inexact(errors, lambda: nonlinear_modules(check_model, check_model.encode_inputs(x)))
    return errors


def normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``x`` as the source model reads it: normalised by its per-channel mean and std."""
    return (x - torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)) / torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)


def raise_if_inexact(errors: dict, find_culprits) -> None:
    """Raise an `ExactnessError` if the measured ``errors`` ("completeness", "equivalence") exceed
    their tolerances; ``find_culprits()`` names the modules to blame for incompleteness."""
    if not errors.get("completeness", 0.0) <= COMPLETENESS_TOLERANCE:
        named = "; ".join(f"{name} ({kind}, relative error {error:.1e})" for name, kind, error in find_culprits()) or "none found"
        raise ExactnessError(
            f"The converted model's explanations are not complete: relative error {errors['completeness']:.1e} (float64, "
            f"tolerance {COMPLETENESS_TOLERANCE:g}). Modules that are not linear in explanation mode: {named}. A non-linearity "
            "written as a function in the source's forward has no B-cos rule; pass check=False to keep the model anyway."
        )
    if not errors.get("equivalence", 0.0) <= EQUIVALENCE_TOLERANCE:
        raise ExactnessError(
            f"The converted model (b=1, keep_bias=True) does not reproduce the source: relative error of the outputs "
            f"{errors['equivalence']:.1e} (float64, tolerance {EQUIVALENCE_TOLERANCE:g})."
        )


def _probed_forward(model, x: torch.Tensor):
    """One forward pass of the float64 ``model`` on ``x``, recording the convolutions in the order
    they run and scaling the output of every unconverted module by a probe (1, with a gradient).

    Returns (logits, convolutions run, {unconverted entry: probe})."""
    modules = dict(model.named_modules())
    convolutions, probes = [], {}

    def probe(entry):
        def hook(module, args, output):
            scale = torch.ones((), dtype=torch.float64, requires_grad=True)
            probes[entry] = scale
            return (output[0] * scale, *output[1:]) if isinstance(output, tuple) else output * scale

        return hook

    hooks = [m.register_forward_pre_hook(lambda m, args: convolutions.append(m)) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [modules[UNCONVERTED_PREFIX + entry[0]].register_forward_hook(probe(entry)) for entry in getattr(model.backbone, "unconverted", [])]
    try:
        with torch.enable_grad():
            return model(x).logits, convolutions, probes
    finally:
        for hook in hooks:
            hook.remove()


def _checked_copy(model: nn.Module) -> tuple:
    """(float64 copy of ``model``, random image, and `_probed_forward`'s results on it): the image
    of `CHECK_IMAGE_SIZE` px if the model takes it, else of its own size. A fresh copy per try:
    a model can be left broken by an input it refused (Swin keeps the smaller window it set)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(CHECK_IMAGE_SIZE, CHECK_IMAGE_SIZE), _own_image_size(model)]
    for attempt, size in enumerate(sizes):
        check_model = copy.deepcopy(model).double().eval()
        x = torch.rand(1, model.config.num_channels, *size, dtype=torch.float64, generator=generator)
        try:
            return (check_model, x, *_probed_forward(check_model, x))
        # A fixed-size model (ViT, BEiT, SigLIP) refuses other sizes; timm's patch embedding asserts it.
        except (ValueError, RuntimeError, AssertionError):
            if attempt == len(sizes) - 1:
                raise


def _check_pixel_reader(model, convolutions: list) -> None:
    """The convolution the rules took for the pixel reader must be the first the forward runs."""
    reader = getattr(model.backbone, "pixel_reader", None)
    if reader is None:
        return
    if not convolutions or convolutions[0] is not reader:
        names = {m: n for n, m in model.named_modules()}
        first = names[convolutions[0]] if convolutions else "none"
        raise ExactnessError(
            f"The model's first convolution ({names[reader]}) is not the first one its forward runs ({first}): the module "
            "that reads the pixels cannot be found, so the input normalisation cannot be folded into it."
        )


def _refuse_unconverted(logits: torch.Tensor, probes: dict) -> None:
    """Raise naming the unconverted modules whose output reaches the logits (modules that run
    but feed nothing the classifier reads, such as SigLIP's unused pooling head, are fine)."""
    if not probes:
        return
    gradients = torch.autograd.grad(logits.sum(), list(probes.values()), allow_unused=True)
    reaching = [entry for entry, gradient in zip(probes, gradients) if gradient is not None]
    if reaching:
        listed = "; ".join(f"{UNCONVERTED_PREFIX}{name} ({kind}: {reason})" for name, kind, reason in reaching)
        raise ExactnessError(f"The source model's output depends on modules that no B-cos rule covers: {listed}.")


def _is_input(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 1


def nonlinear_modules(model: nn.Module, encoded: torch.Tensor, forward=None) -> list:
    """[(qualified name, type name, relative error)] of the innermost modules of ``model`` that
    are not linear in their tensor inputs in explanation mode (Euler's identity, float64), run
    by ``forward(encoded_pixel_values=encoded)`` (default: the model's forward)."""
    calls = {}

    def record(module, args, kwargs):
        if module not in calls and any(_is_input(a) for a in (*args, *kwargs.values())):
            calls[module] = (args, kwargs)

    # Modules that a rule wrapped (the activation inside a gated activation) are checked as the
    # wrapper, which is what the model runs.
    wrapped = {id(inner) for outer in model.modules() if isinstance(outer, ExplainableModule) for inner in outer.modules() if inner is not outer}
    names = {module: name for name, module in model.named_modules() if name and id(module) not in wrapped}
    hooks = [module.register_forward_pre_hook(record, with_kwargs=True) for module in names]
    try:
        with torch.no_grad(), explanation_mode(model):
            (forward or model)(encoded_pixel_values=encoded)
    finally:
        for hook in hooks:
            hook.remove()
    failing = {}
    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad(), explanation_mode(model):
        for module, (args, kwargs) in calls.items():
            # Linear in all its tensor inputs jointly (a residual block takes two).
            args = [a.detach().requires_grad_(True) if _is_input(a) else a for a in args]
            kwargs = {k: a.detach().requires_grad_(True) if _is_input(a) else a for k, a in kwargs.items()}
            inputs = [a for a in (*args, *kwargs.values()) if _is_input(a)]
            out = module(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                continue
            u = torch.randn(out.shape, dtype=out.dtype, generator=generator)
            value = (u * out).sum()
            gradients = torch.autograd.grad(value, inputs, allow_unused=True)
            euler = sum(float((g * a).sum().detach()) for g, a in zip(gradients, inputs) if g is not None)
            error = abs(euler - float(value.detach())) / max(float((u * out).abs().sum().detach()), 1e-300)
            if error > COMPLETENESS_TOLERANCE:
                failing[module] = error
    innermost = [
        (names[m], type(m).__name__, error)
        for m, error in failing.items()
        if not any(other is not m and other in failing for other in m.modules())
    ]
    return sorted(innermost)
