"""The energy pointing game (EPG; Wang et al., Score-CAM 2020): the fraction of the positive
attribution mass that falls inside the object's bounding box(es) or segmentation mask. Used, for
example, to score explanations of CLIP text prompts against object boxes.
"""

import math
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .batching import gather_images
from .explainers import Explainer, attribution_maps

BoxesType = Union[torch.Tensor, Sequence[Sequence[Sequence[float]]]]


def boxes_to_masks(boxes: BoxesType, height: int, width: int) -> torch.Tensor:
    """(N, H, W) boolean masks, each the union of its image's (x0, y0, x1, y1) pixel boxes.

    ``boxes`` is an (N, 4) tensor (one box per image) or, per image, a list of boxes. A box covers
    the pixels [x0, x1) × [y0, y1); fractional coordinates are rounded outwards.
    """
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"A boxes tensor must have shape (N, 4) as (x0, y0, x1, y1), got {tuple(boxes.shape)}.")
        boxes = [[box] for box in boxes.tolist()]
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for i, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in image_boxes:
            if x1 < x0 or y1 < y0:
                raise ValueError(f"Box {(x0, y0, x1, y1)} of image {i} has x1 < x0 or y1 < y0.")
            top, left = max(0, math.floor(y0)), max(0, math.floor(x0))
            bottom, right = min(height, math.ceil(y1)), min(width, math.ceil(x1))
            masks[i, top:bottom, left:right] = True
    return masks


def energy_pointing_game_scores(
    attributions: torch.Tensor, masks: Optional[torch.Tensor] = None, boxes: Optional[BoxesType] = None
) -> torch.Tensor:
    """EPG of each map: positive attribution mass inside the mask (or boxes) / total positive mass.

    Args:
        attributions: (N, H, W) maps, or (N, C, H, W) summed over C.
        masks: (N, H, W) booleans (the object's pixels); or
        boxes: (N, 4) pixel boxes (x0, y0, x1, y1), or per image a list of boxes (their union).

    Returns:
        (N,) scores in [0, 1]; a map without positive mass scores 0.
    """
    maps = attribution_maps(attributions)
    if (masks is None) == (boxes is None):
        raise ValueError("Pass exactly one of masks or boxes.")
    if masks is None:
        masks = boxes_to_masks(boxes, maps.shape[1], maps.shape[2])
    masks = torch.as_tensor(masks).to(device=maps.device, dtype=torch.bool)
    if masks.shape != maps.shape:
        raise ValueError(f"masks have shape {tuple(masks.shape)}, the maps {tuple(maps.shape)}.")
    positive = maps.double().clamp_min(0)
    inside = (positive * masks).flatten(1).sum(1)
    total = positive.flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(total))


def evaluate_energy_pointing_game(
    explainer: Explainer,
    images,
    targets,
    masks: Optional[torch.Tensor] = None,
    boxes: Optional[BoxesType] = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Explain every image for its target and score the maps with the energy pointing game.

    Returns a dict with the per-image ``scores`` and their mean and median.
    """
    if (masks is None) == (boxes is None):
        raise ValueError("Pass exactly one of masks or boxes.")
    targets = torch.as_tensor(targets).reshape(-1)
    if len(targets) != len(images):
        raise ValueError(f"Got {len(targets)} targets for {len(images)} images.")
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc=f"EPG {explainer.name}", disable=not progress, leave=False):
        indices = list(range(start, min(start + batch_size, len(images))))
        attribution = explainer.explain(gather_images(images, indices), targets[indices])
        if masks is not None:
            batch_masks = torch.as_tensor(masks)[indices]
            scores.append(energy_pointing_game_scores(attribution.maps.detach(), masks=batch_masks).cpu())
        else:
            batch_boxes = boxes[start : start + len(indices)]
            scores.append(energy_pointing_game_scores(attribution.maps.detach(), boxes=batch_boxes).cpu())
    scores = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
    return {
        "scores": scores,
        "mean": scores.mean().item() if len(scores) else float("nan"),
        "median": scores.median().item() if len(scores) else float("nan"),
    }
