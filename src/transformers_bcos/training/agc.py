"""Adaptive gradient clipping (AGC), unit-wise, as in NFNets (Brock et al., 2021) and the B-cos recipe.

Each output unit's gradient (a row of a linear weight, a filter of a convolution, the whole of a
1-D tensor) is rescaled so that its norm is at most ``clip_factor`` times the norm of the unit's
weights: ``g <- g * min(1, clip_factor * max(||w||, eps) / ||g||)``. Large relative updates
are what destabilise B-cos training early on; AGC bounds them without a global threshold.
"""

from typing import Iterable

import torch


def unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (dim 0), broadcastable to ``tensor``; a 0-/1-D tensor is one unit."""
    if tensor.dim() <= 1:
        return torch.linalg.vector_norm(tensor)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.dim())), keepdim=True)


@torch.no_grad()
def adaptive_gradient_clipping_(
    parameters: Iterable[torch.nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3
) -> int:
    """Clip the gradients of ``parameters`` in place, unit-wise. Returns the number of clipped units.

    Args:
        parameters: the parameters whose ``.grad`` to clip (parameters without a gradient are skipped).
        clip_factor: the largest allowed ratio ||grad|| / ||weight|| per unit (0.01 in the B-cos recipe).
        eps: a floor on the weight norm, so that units with (near) zero weights can still move.

    Gradients must be unscaled (call ``accelerator.unscale_gradients()`` first under fp16).
    """
    if clip_factor <= 0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor}.")
    clipped = 0
    for parameter in parameters:
        grad = parameter.grad
        if grad is None:
            continue
        max_norm = unitwise_norm(parameter.detach().float()).clamp_min(eps) * clip_factor
        grad_norm = unitwise_norm(grad.float())
        too_large = grad_norm > max_norm
        if not too_large.any():
            continue
        scale = torch.where(too_large, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        grad.mul_(scale.to(grad.dtype))
        clipped += int(too_large.sum())
    return clipped
