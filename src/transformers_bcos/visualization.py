"""Pictures of explanations: heat maps of contributions and labelled panels
(input | contribution map with its colour scale | B-cos RGBA rendering of W(x)).

Only numpy and Pillow: no plotting library needed.
"""

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# explanation_panels' layout, in pixels.
CELL_SIZE = 192
GAP = 4
TITLE_HEIGHT = 24  # one line of title above everything (only when titles are given)
HEADER_HEIGHT = 30  # the two-line label of each column
LEGEND_HEIGHT = 34  # the colour scale of the contribution map and its three ticks
COLUMN_LABELS = (
    "input",
    "contributions W(x)x\nred: for the class, blue: against",
    "W(x), B-cos RGBA rendering\ncolour: weights, opacity: |W(x)|",
)


def contribution_limit(contributions, percentile: float = 99.5) -> float:
    """The value at which `contribution_heatmap` saturates: the percentile of |contribution|."""
    c = contributions.detach().float().cpu().numpy() if isinstance(contributions, torch.Tensor) else np.asarray(contributions, dtype=np.float32)
    return max(float(np.percentile(np.abs(c), percentile)), 1e-12)


def bwr(values: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> uint8 RGB on the symmetric blue-white-red scale (matplotlib's ``bwr``)."""
    v = np.clip(values, -1.0, 1.0)[..., None]
    white = np.ones(3)
    red, blue = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    return (rgb * 255).round().astype(np.uint8)


def contribution_heatmap(contributions, percentile: float = 99.5) -> np.ndarray:
    """(H, W) contributions -> (H, W, 3) uint8 on a symmetric blue-white-red scale.

    Clipped at the given percentile of |contribution| (the reference recipe); red is positive
    evidence for the explained output, blue negative.
    """
    c = contributions.detach().float().cpu().numpy() if isinstance(contributions, torch.Tensor) else np.asarray(contributions, dtype=np.float32)
    return bwr(c / contribution_limit(c, percentile))


def rgba_on_background(rgba: np.ndarray, background: float = 0.0) -> np.ndarray:
    """Composite an (H, W, 4) float RGBA explanation over a plain background -> uint8 RGB."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return ((rgb * alpha + background * (1 - alpha)) * 255).round().astype(np.uint8)


def share_on_mask(maps, mask) -> torch.Tensor:
    """(N,) share of each non-negative (N, H, W) map's mass that lies on the (N, H, W) bool mask.

    With the positive part of the contributions (or the RGBA opacity) as ``maps`` and the object's
    pixels as ``mask``: how much of the explanation sits on the object (uniform = the object's area).
    """
    maps = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).double()
    if (maps < 0).any():
        raise ValueError("share_on_mask takes non-negative maps (e.g. contributions.clamp_min(0), or an opacity).")
    mask = torch.as_tensor(mask).bool()
    return (maps * mask).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-300)


def _to_uint8_image(pixel_values: torch.Tensor) -> np.ndarray:
    return (pixel_values.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _legend(width: int, limit: float) -> Image.Image:
    """The contribution map's colour scale: -limit (blue) .. 0 (white) .. +limit (red), with ticks."""
    legend = Image.new("RGB", (width, LEGEND_HEIGHT), "white")
    bar = np.repeat(bwr(np.linspace(-1.0, 1.0, width))[None], 10, axis=0)
    legend.paste(Image.fromarray(bar), (0, 2))
    draw, font = ImageDraw.Draw(legend), _font(11)
    ticks = (f"-{limit:.2g}", "0", f"+{limit:.2g}")
    for tick, anchor, x in zip(ticks, ("la", "ma", "ra"), (0, width // 2, width - 1)):
        draw.text((x, 15), tick, fill="black", font=font, anchor=anchor)
    return legend


def explanation_panels(
    pixel_values: torch.Tensor,
    explanation,
    titles: Optional[Sequence[str]] = None,
    cell_size: int = CELL_SIZE,
) -> list:
    """One PIL image per input, every column labelled: input | contribution map (with its colour
    scale, clipped at the 99.5th percentile of |contribution|) | the B-cos reference RGBA rendering
    of W(x) over black; an optional title line above.

    ``pixel_values`` (N, 3, H, W) in [0, 1]; ``explanation`` a `BcosExplanationOutput` of them.
    """
    rgba = explanation.to_rgba()
    title_height = TITLE_HEIGHT if titles else 0
    width = 3 * cell_size + 2 * GAP
    font = _font(11)
    panels = []
    for i in range(pixel_values.shape[0]):
        contributions = explanation.contributions[i]
        cells = [_to_uint8_image(pixel_values[i]), contribution_heatmap(contributions), rgba_on_background(rgba[i])]
        panel = Image.new("RGB", (width, title_height + HEADER_HEIGHT + cell_size + LEGEND_HEIGHT), "white")
        draw = ImageDraw.Draw(panel)
        if titles:
            draw.text((4, 5), titles[i], fill="black", font=_font(13))
        for j, (cell, label) in enumerate(zip(cells, COLUMN_LABELS)):
            x = j * (cell_size + GAP)
            draw.multiline_text((x + 2, title_height + 1), label, fill="black", font=font, spacing=2)
            panel.paste(Image.fromarray(cell).resize((cell_size, cell_size), Image.NEAREST), (x, title_height + HEADER_HEIGHT))
        legend = _legend(cell_size, contribution_limit(contributions))
        panel.paste(legend, (cell_size + GAP, title_height + HEADER_HEIGHT + cell_size))
        panels.append(panel)
    return panels


def evidence_on_object(explanation, object_mask) -> dict:
    """How much of each explanation lies on the object's pixels (``object_mask``, (N, H, W) bool).

    Returns (N,) tensors: "contribution", the share of the positive contributions on the object,
    and "opacity", the share of the RGBA rendering's opacity on it; "area", the object's share of
    the pixels (what a uniform map would score).
    """
    mask = torch.as_tensor(object_mask).bool().cpu()
    rgba = explanation.to_rgba()
    return {
        "contribution": share_on_mask(explanation.contributions.detach().cpu().clamp_min(0), mask),
        "opacity": share_on_mask(torch.from_numpy(rgba[..., 3]), mask),
        "area": mask.double().flatten(1).mean(1),
    }
