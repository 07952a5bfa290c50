"""Details checked against the B-cos reference implementation (B-cos-v2): the loss's off-labels
with soft targets and the opacity smoothing of the RGBA rendering; and the labelled panels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformers_bcos.explanation import rgba_explanation
from transformers_bcos.modeling_bcos import bcos_bce_loss
from transformers_bcos.visualization import (
    CELL_SIZE,
    GAP,
    HEADER_HEIGHT,
    LEGEND_HEIGHT,
    TITLE_HEIGHT,
    explanation_panels,
    share_on_mask,
)


def test_soft_targets_are_floored_at_one_over_c_as_in_the_reference():
    logits = torch.randn(3, 4)
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    floored = soft.clamp_min(1 / 4)  # the reference: target.clamp(min=1/C)
    assert bcos_bce_loss(logits, soft).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, floored).item())
    # A one-hot soft target gives the same loss as its class index.
    assert bcos_bce_loss(logits[2:], soft[2:]).item() == pytest.approx(bcos_bce_loss(logits[2:], torch.tensor([0])).item())


def test_opacity_smoothing_pads_with_zeros_as_in_the_reference():
    """A uniform weight map keeps full opacity inside and fades at the border (zero padding)."""
    weights = torch.ones(1, 6, 224, 224)
    encoded = torch.cat([torch.full((1, 3, 224, 224), 0.5)] * 2, dim=1)
    rgba = rgba_explanation(weights, encoded, smoothing=15, percentile=50.0)
    alpha = rgba[0, :, :, 3]
    assert alpha[112, 112].item() == pytest.approx(1.0)
    # Corner: 8×8 of the 15×15 window inside the image, divided by the 50th percentile (1.0).
    assert alpha[0, 0].item() == pytest.approx(64 / 225, rel=1e-5)
    assert alpha[0, 112].item() == pytest.approx(8 / 15, rel=1e-5)


def test_share_on_mask_is_the_mass_on_the_mask():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
    maps[1] = 1.0
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = True
    np.testing.assert_allclose(share_on_mask(maps, mask).numpy(), [0.75, 1 / 16])
    with pytest.raises(ValueError, match="non-negative"):
        share_on_mask(-maps, mask)


def test_panels_have_labelled_columns_and_a_colour_scale(mnist_images):
    """Every column has a label and the contribution map a blue-white-red scale below it."""
    from conftest import tiny_source_model

    from transformers_bcos import bcosify_pretrained

    model, processor = tiny_source_model("resnet")
    bcos = bcosify_pretrained(model, image_processor=processor)
    pixels = mnist_images[0][:2]
    panels = explanation_panels(pixels, bcos.explain(pixels), ["a title", "another"])
    size = (3 * CELL_SIZE + 2 * GAP, TITLE_HEIGHT + HEADER_HEIGHT + CELL_SIZE + LEGEND_HEIGHT)
    assert [p.size for p in panels] == [size, size]
    picture = np.asarray(panels[0])
    for column in range(3):  # dark label text above each cell
        x = column * (CELL_SIZE + GAP)
        assert (picture[TITLE_HEIGHT : TITLE_HEIGHT + HEADER_HEIGHT, x : x + CELL_SIZE] < 100).any()
    bar = picture[TITLE_HEIGHT + HEADER_HEIGHT + CELL_SIZE + 5, CELL_SIZE + GAP : 2 * CELL_SIZE + GAP]
    assert tuple(bar[0]) == (0, 0, 255) and tuple(bar[-1]) == (255, 0, 0)  # blue .. red
    assert (bar[len(bar) // 2] > 240).all()  # white in the middle
