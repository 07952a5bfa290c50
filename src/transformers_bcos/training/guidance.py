"""Model guidance (Rao et al., "Using Explanations to Guide Models", ICCV 2023): a loss on the
B-cos explanation of the labelled class that teaches a model to be right for the right reasons,
from bounding boxes of the object on some of the training images.

The explanation is `explain(..., create_graph=True)`: the contributions (W(x) ⊙ x summed over
the input channels, exact) with a graph to the parameters, whose gradient is the total derivative
of the plain explanation (see `BcosForImageClassification.explain`). The losses, per annotated
image, averaged over the annotated images of a batch (A: the contributions, M: the boxes' mask):

* ``"energy"`` (the paper's choice): 1 − Σ A⁺·M / Σ A⁺, one minus the energy pointing game;
* ``"l1"`` (GRADIA's loss, as compared in the paper): mean |A⁺ / max A⁺ − M|;
* ``"rrr"`` (RRR*, Right for the Right Reasons on the explanation): Σ (A·(1 − M))², which
  depends on the scale of the logits.
"""

from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..evaluation.energy_pointing_game import energy_pointing_game_scores

GUIDANCE_LOSSES = ("energy", "l1", "rrr")


def energy_loss(contributions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over images of 1 − (positive contribution inside the mask) / (positive contribution);
    1 for an image without positive contribution."""
    positive = contributions.clamp_min(0).flatten(1)
    inside = (positive * masks.flatten(1)).sum(1)
    total = positive.sum(1)
    share = torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))
    return (1 - share).mean()


def l1_loss(contributions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the positive contributions scaled to a maximum of 1 and the mask."""
    positive = contributions.clamp_min(0).flatten(1)
    scaled = positive / positive.amax(1, keepdim=True).clamp_min(torch.finfo(positive.dtype).tiny)
    return (scaled - masks.flatten(1).to(scaled.dtype)).abs().mean()


def rrr_loss(contributions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over images of the squared contributions outside the mask, summed."""
    outside = contributions.flatten(1) * (~masks.flatten(1)).to(contributions.dtype)
    return outside.square().sum(1).mean()


LOSS_FUNCTIONS = {"energy": energy_loss, "l1": l1_loss, "rrr": rrr_loss}


def guidance_loss(kind: str, model, pixel_values: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The guidance loss ``kind`` of the explanations of ``labels`` (N images, masks (N, H, W)),
    differentiable in ``model``'s parameters. ``model`` is the B-cos classifier itself (not a
    DDP wrapper: its forward passes here are the explanation's own)."""
    if kind not in LOSS_FUNCTIONS:
        raise ValueError(f"Unknown guidance loss {kind!r}; choose one of {', '.join(GUIDANCE_LOSSES)}.")
    explanation = model.explain(pixel_values=pixel_values, target=labels, create_graph=True)
    return LOSS_FUNCTIONS[kind](explanation.contributions, masks.to(explanation.contributions.device))


def annotated_rows(num_rows: int, has_boxes, fraction: float, seed: int) -> list:
    """The row indices whose boxes guide training: a seeded random ``fraction`` (at least one row)
    of the rows for which ``has_boxes(index)`` is true, sorted."""
    candidates = [index for index in range(num_rows) if has_boxes(index)]
    count = max(1, round(fraction * len(candidates))) if candidates else 0
    chosen = np.random.default_rng(seed).permutation(len(candidates))[:count]
    return sorted(candidates[i] for i in chosen)


def foreground_box(image: Image.Image, threshold: float = 0.5) -> Optional[list]:
    """The ``[x, y, width, height]`` box (the ``datasets`` object-detection convention) around the
    pixels whose grey level is at least ``threshold`` × 255: a digit on a dark background, say;
    None when no pixel is that bright."""
    grey = np.asarray(image.convert("L"))
    rows, columns = np.nonzero(grey >= threshold * 255)
    if rows.size == 0:
        return None
    return [int(columns.min()), int(rows.min()), int(columns.max() - columns.min() + 1), int(rows.max() - rows.min() + 1)]


@torch.no_grad()
def eval_loader_energy_pointing_game(accelerator, model, dataloader) -> Optional[float]:
    """The mean energy pointing game of the labelled class's explanation over the evaluation images
    with boxes (all processes gathered); None when no batch has boxes. ``model`` is the prepared
    model; its B-cos classifier is explained."""
    explained = accelerator.unwrap_model(model)
    scores = []
    for batch in dataloader:
        if "annotated" not in batch:
            return None
        annotated = batch["annotated"]
        batch_scores = torch.full(annotated.shape, float("nan"), dtype=torch.float64, device=accelerator.device)
        if annotated.any():
            with accelerator.autocast():
                explanation = explained.explain(pixel_values=batch["pixel_values"][annotated], target=batch["labels"][annotated])
            batch_scores[annotated] = energy_pointing_game_scores(explanation.contributions, masks=batch["guidance_masks"][annotated])
        scores.append(accelerator.gather_for_metrics(batch_scores))
    if not scores:
        return None
    scores = torch.cat(scores)
    scores = scores[~scores.isnan()]
    return scores.mean().item() if len(scores) else None
