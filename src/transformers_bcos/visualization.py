"""Pictures of explanations: heat maps of contributions and image | explanation | contributions panels.

Only numpy and Pillow: no plotting library needed.
"""

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def contribution_heatmap(contributions, percentile: float = 99.5) -> np.ndarray:
    """(H, W) contributions -> (H, W, 3) uint8 on a symmetric blue-white-red scale.

    Clipped at the given percentile of |contribution| (the reference recipe); red is positive
    evidence for the explained output, blue negative.
    """
    c = contributions.detach().float().cpu().numpy() if isinstance(contributions, torch.Tensor) else np.asarray(contributions, dtype=np.float32)
    limit = max(float(np.percentile(np.abs(c), percentile)), 1e-12)
    v = np.clip(c / limit, -1.0, 1.0)[..., None]
    white = np.ones(3)
    red, blue = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    return (rgb * 255).round().astype(np.uint8)


def rgba_on_background(rgba: np.ndarray, background: float = 0.0) -> np.ndarray:
    """Composite an (H, W, 4) float RGBA explanation over a plain background -> uint8 RGB."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return ((rgb * alpha + background * (1 - alpha)) * 255).round().astype(np.uint8)


def _to_uint8_image(pixel_values: torch.Tensor) -> np.ndarray:
    return (pixel_values.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def explanation_panels(
    pixel_values: torch.Tensor,
    explanation,
    titles: Optional[Sequence[str]] = None,
    cell_size: int = 192,
) -> list:
    """One PIL image per input: input | RGBA explanation | contribution heat map, with a title.

    ``pixel_values`` (N, 3, H, W) in [0, 1]; ``explanation`` a `BcosExplanationOutput` of them.
    """
    rgba = explanation.to_rgba()
    panels = []
    for i in range(pixel_values.shape[0]):
        cells = [
            _to_uint8_image(pixel_values[i]),
            rgba_on_background(rgba[i]),
            contribution_heatmap(explanation.contributions[i]),
        ]
        title_height = 24 if titles else 0
        panel = Image.new("RGB", (3 * cell_size + 2 * 4, cell_size + title_height), "white")
        for j, cell in enumerate(cells):
            resized = Image.fromarray(cell).resize((cell_size, cell_size), Image.NEAREST)
            panel.paste(resized, (j * (cell_size + 4), title_height))
        if titles:
            ImageDraw.Draw(panel).text((4, 5), titles[i], fill="black")
        panels.append(panel)
    return panels
