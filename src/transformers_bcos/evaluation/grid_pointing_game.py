"""The grid pointing game (GridPG), the B-cos papers' localisation metric (reference §4).

1. Keep the test images the model classifies correctly *with confidence* (sigmoid(logit) > 0.5 for
   B-cos models; a parameter, so softmax models can use their softmax probability); per class,
   sort them by the class logit, most confident first.
2. Repeatedly sample n = g² distinct classes (g ∈ {2, 3}) with a seeded generator and take each
   class's next most confident image; tile them into a g×g grid.
3. For each cell, explain the grid for that cell's class: the attribution summed over channels,
   optionally smoothed (average pool; 15 px for 224-px cells, none for tiny images), clamped at 0.
   The score is the positive mass inside the cell over the total positive mass (0 if there is
   none). Uniform maps score 1/n, perfect ones 1.

When classes run out of confident images, fewer grids are built: the result says how many and
why, and never raises.
"""

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .accuracy import predict_logits
from .batching import gather_images
from .explainers import Explainer, attribution_maps

logger = logging.getLogger(__name__)


def default_smoothing(cell_size: int) -> int:
    """The average-pool kernel for cells of ``cell_size`` px: 15 at 224 px (the papers), scaled
    proportionally and made odd; 1 (no smoothing) when that is below 3 px (e.g. 28-px digits)."""
    kernel = int(round(15 * cell_size / 224))
    if kernel < 3:
        return 1
    return kernel if kernel % 2 else kernel + 1


def grid_pointing_game_scores(
    attributions: torch.Tensor, grid_size: int, target_cells, smoothing: int = 1
) -> torch.Tensor:
    """GridPG score of each attribution map: positive mass in its target cell / total positive mass.

    Args:
        attributions: (N, H, W) maps or (N, C, H, W) per-channel maps (summed over C); H and W
            must be multiples of ``grid_size``.
        grid_size: g, for a g×g grid.
        target_cells: (N,) the target cell of each map, row-major (0 .. g²-1).
        smoothing: an odd average-pool kernel applied before clamping (1: none).

    Returns:
        (N,) scores in [0, 1]; a map without positive mass scores 0.
    """
    maps = attribution_maps(attributions)
    n, height, width = maps.shape
    if grid_size < 1 or height % grid_size or width % grid_size:
        raise ValueError(f"A {grid_size}×{grid_size} grid does not divide maps of size {height}×{width}.")
    cells = torch.as_tensor(target_cells, dtype=torch.long, device=maps.device).reshape(-1)
    if cells.shape[0] != n:
        raise ValueError(f"Got {cells.shape[0]} target cells for {n} maps.")
    if ((cells < 0) | (cells >= grid_size**2)).any():
        raise ValueError(f"Target cells must lie in 0..{grid_size**2 - 1}, got {cells.tolist()}.")
    if smoothing < 1 or smoothing % 2 == 0:
        raise ValueError(f"smoothing must be an odd kernel size >= 1, got {smoothing}.")
    maps = maps.double()
    if smoothing > 1:
        maps = F.avg_pool2d(maps.unsqueeze(1), smoothing, stride=1, padding=smoothing // 2).squeeze(1)
    positive = maps.clamp_min(0)
    cell_mass = positive.view(n, grid_size, height // grid_size, grid_size, width // grid_size).sum(dim=(2, 4))
    inside = cell_mass.flatten(1).gather(1, cells[:, None]).squeeze(1)
    total = cell_mass.flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(total))


@dataclass
class ConfidentImages:
    """Test images classified correctly with confidence, per class, most confident first."""

    per_class: Dict[int, List[int]]
    num_images: int
    num_correct: int
    criterion: str
    threshold: float

    @property
    def num_confident(self) -> int:
        return sum(len(v) for v in self.per_class.values())

    @property
    def num_classes(self) -> int:
        return sum(1 for v in self.per_class.values() if v)


def select_confident_images(
    classifier,
    images,
    labels,
    threshold: float = 0.5,
    confidence: Union[None, str, Callable] = None,
    batch_size: int = 64,
    progress: bool = True,
    logits: Optional[torch.Tensor] = None,
) -> ConfidentImages:
    """Indices of the images classified correctly with probability > ``threshold``, per class.

    Args:
        classifier: a `PixelClassifier` (or an explainer's ``.classifier``).
        confidence: ``"sigmoid"``, ``"softmax"`` or a callable logits -> probabilities; None uses
            the classifier's own criterion (sigmoid for B-cos models, softmax for standard ones).
        logits: precomputed (N, C) logits of ``images``, to skip the forward pass.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu().long()
    if len(labels) != len(images):
        raise ValueError(f"Got {len(labels)} labels for {len(images)} images.")
    if logits is None:
        logits = predict_logits(classifier, images, batch_size, progress)
    logits = logits.float().cpu()
    criterion = confidence if confidence is not None else classifier.confidence_criterion
    if criterion == "sigmoid":
        probabilities = torch.sigmoid(logits)
    elif criterion == "softmax":
        probabilities = torch.softmax(logits, dim=-1)
    elif callable(criterion):
        probabilities = criterion(logits)
    else:
        raise ValueError(f"confidence must be 'sigmoid', 'softmax' or a callable, got {criterion!r}.")
    rows = torch.arange(len(labels))
    correct = logits.argmax(1) == labels
    confident = correct & (probabilities[rows, labels] > threshold)
    per_class: Dict[int, List[int]] = {}
    for label in sorted(set(labels.tolist())):
        members = torch.nonzero(confident & (labels == label)).flatten()
        order = torch.argsort(logits[members, label], descending=True, stable=True)
        per_class[label] = members[order].tolist()
    name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom")
    return ConfidentImages(per_class, len(labels), int(correct.sum()), name, threshold)


@dataclass
class GridSample:
    """Sampled grids: per grid, the (class, image index) of each cell in row-major order."""

    grids: List[List[Tuple[int, int]]]
    grid_size: int
    num_requested: int
    stop_reason: Optional[str] = None  # why fewer than ``num_requested`` grids were built


def sample_grids(per_class: Mapping[int, Sequence[int]], grid_size: int, num_grids: int, seed: int = 42) -> GridSample:
    """Sample up to ``num_grids`` grids of ``grid_size``² distinct classes, each cell the class's
    next most confident unused image (``per_class`` lists are most confident first).

    The classes of a grid and their cells come from ``random.Random(seed)``: the same inputs and
    seed give the same grids. Sampling stops early, with a reason, when fewer classes than cells
    still have unused images.
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}.")
    cells = grid_size * grid_size
    rng = random.Random(seed)
    queues = {int(c): list(v) for c, v in sorted(per_class.items())}
    used = {c: 0 for c in queues}
    grids: List[List[Tuple[int, int]]] = []
    stop_reason = None
    while len(grids) < num_grids:
        available = [c for c in queues if used[c] < len(queues[c])]
        if len(available) < cells:
            stop_reason = _stop_reason(len(grids), len(available), cells, grid_size)
            break
        chosen = rng.sample(available, cells)
        grids.append([(c, queues[c][used[c]]) for c in chosen])
        for c in chosen:
            used[c] += 1
    return GridSample(grids, grid_size, num_grids, stop_reason)


def _stop_reason(built: int, available: int, cells: int, grid_size: int) -> str:
    need = f"a {grid_size}×{grid_size} grid needs {cells} distinct classes"
    if built == 0 and available == 0:
        return "no test image is classified correctly with confidence, so no grid can be built"
    if built == 0:
        return f"only {available} classes have confidently classified images; {need}"
    return f"after {built} grids only {available} classes still had unused confident images; {need}"


def build_grid(cell_images: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Tile (g², C, h, w) images row-major into one (C, g·h, g·w) image."""
    count, channels, height, width = cell_images.shape
    if count != grid_size * grid_size:
        raise ValueError(f"A {grid_size}×{grid_size} grid needs {grid_size**2} images, got {count}.")
    tiles = cell_images.reshape(grid_size, grid_size, channels, height, width)
    return tiles.permute(2, 0, 3, 1, 4).reshape(channels, grid_size * height, grid_size * width)


def _quantiles(scores: torch.Tensor) -> dict:
    if scores.numel() == 0:
        return {"mean": math.nan, "q1": math.nan, "median": math.nan, "q3": math.nan}
    q1, median, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"mean": scores.double().mean().item(), "q1": q1, "median": median, "q3": q3}


@dataclass
class GridPointingGameResult:
    """GridPG scores (one per explained cell) and a report of how the grids came about."""

    method: str
    grid_size: int
    smoothing: int
    scores: torch.Tensor  # (grids built, g²): the score of each cell, row-major
    num_grids_requested: int
    num_confident_images: int
    num_classes_with_confident_images: int
    stop_reason: Optional[str] = None
    statistics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.statistics = _quantiles(self.scores.flatten())

    @property
    def num_grids_built(self) -> int:
        return int(self.scores.shape[0])

    @property
    def mean(self) -> float:
        return self.statistics["mean"]

    @property
    def median(self) -> float:
        return self.statistics["median"]

    @property
    def q1(self) -> float:
        return self.statistics["q1"]

    @property
    def q3(self) -> float:
        return self.statistics["q3"]

    @property
    def report(self) -> str:
        g = self.grid_size
        text = (
            f"GridPG {g}×{g} ({self.method}): {self.num_grids_built} of {self.num_grids_requested} grids built from "
            f"{self.num_confident_images} confident images in {self.num_classes_with_confident_images} classes"
        )
        if self.stop_reason:
            text += f"; stopped early: {self.stop_reason}"
        if self.num_grids_built:
            text += f". Mean {self.mean:.3f}, median {self.median:.3f} (quartiles {self.q1:.3f}–{self.q3:.3f}); uniform = {1 / g**2:.3f}."
        else:
            text += ". No score."
        return text

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "grid_size": self.grid_size,
            "smoothing": self.smoothing,
            "num_grids_requested": self.num_grids_requested,
            "num_grids_built": self.num_grids_built,
            "num_confident_images": self.num_confident_images,
            "num_classes_with_confident_images": self.num_classes_with_confident_images,
            "stop_reason": self.stop_reason,
            **self.statistics,
            "report": self.report,
        }


def evaluate_grid_pointing_game(
    explainer: Explainer,
    images,
    labels,
    grid_size: int = 2,
    num_grids: int = 500,
    seed: int = 42,
    smoothing: Optional[int] = None,
    threshold: float = 0.5,
    confidence: Union[None, str, Callable] = None,
    batch_size: int = 16,
    progress: bool = True,
    confident: Optional[ConfidentImages] = None,
) -> GridPointingGameResult:
    """Play the grid pointing game with ``explainer`` on ``images`` (see the module docstring).

    Args:
        explainer: any `Explainer` (B-cos or post-hoc); its classifier selects the images.
        images: an indexable of (3, h, w) tensors in [0, 1], all of one size (see `batching`).
        labels: (N,) their classes.
        grid_size: 2 or 3 (n = 4 or 9 classes per grid).
        smoothing: average-pool kernel; None: `default_smoothing` of the cell size.
        confidence, threshold: the confidence criterion (None: the classifier's own).
        batch_size: grids explained per pass.
        confident: a `select_confident_images` result to reuse (e.g. for several methods
            explaining the same model), instead of classifying ``images`` again.
    """
    if confident is None:
        confident = select_confident_images(
            explainer.classifier, images, labels, threshold, confidence, batch_size=max(batch_size, 64), progress=progress
        )
    sample = sample_grids(confident.per_class, grid_size, num_grids, seed)
    cells = grid_size * grid_size
    if smoothing is None:
        smoothing = default_smoothing(min(images[0].shape[-2:])) if len(images) else 1
    scores = torch.zeros(len(sample.grids), cells, dtype=torch.float64)
    jobs = [(g, c) for g in range(len(sample.grids)) for c in range(cells)]
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"GridPG {explainer.name}", disable=not progress, leave=False):
        chunk = jobs[start : start + batch_size]
        grids = {g: build_grid(gather_images(images, [i for _, i in sample.grids[g]]), grid_size) for g in {g for g, _ in chunk}}
        batch = torch.stack([grids[g] for g, _ in chunk])
        targets = torch.tensor([sample.grids[g][c][0] for g, c in chunk])
        attribution = explainer.explain(batch, targets)
        chunk_scores = grid_pointing_game_scores(attribution.maps.detach(), grid_size, [c for _, c in chunk], smoothing).cpu()
        for (g, c), score in zip(chunk, chunk_scores):
            scores[g, c] = score
    result = GridPointingGameResult(
        method=explainer.name,
        grid_size=grid_size,
        smoothing=smoothing,
        scores=scores,
        num_grids_requested=num_grids,
        num_confident_images=confident.num_confident,
        num_classes_with_confident_images=confident.num_classes,
        stop_reason=sample.stop_reason,
    )
    # Fewer grids than asked for is worth a warning: the statistics rest on fewer scores.
    logger.log(logging.WARNING if sample.stop_reason else logging.INFO, result.report)
    return result
