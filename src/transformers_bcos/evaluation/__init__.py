"""Measuring interpretability: GridPG, the energy pointing game, post-hoc baselines, accuracy.

B-cos explanations and post-hoc attributions of standard models go through one `Explainer`
interface, so every metric scores both with the same code::

    from transformers_bcos.evaluation import make_explainer, evaluate_grid_pointing_game

    bcos = make_explainer(bcos_model)                                   # exact contributions
    ig = make_explainer(standard_model, "integrated_gradients", image_processor=processor, steps=50)
    for explainer in (bcos, ig):
        print(evaluate_grid_pointing_game(explainer, images, labels, grid_size=3).report)
"""

from .accuracy import completeness_errors, predict_logits, top1_accuracy
from .batching import TransformedImages, gather_images, iterate_batches
from .classifier import PixelClassifier
from .energy_pointing_game import boxes_to_masks, energy_pointing_game_scores, evaluate_energy_pointing_game
from .explainers import (
    EXPLAINERS,
    Attribution,
    BcosExplainer,
    Explainer,
    GradCAMExplainer,
    InputXGradientExplainer,
    IntegratedGradientsExplainer,
    SlidingWindowExplainer,
    make_explainer,
)
from .grid_pointing_game import (
    ConfidentImages,
    GridPointingGameResult,
    GridSample,
    build_grid,
    default_smoothing,
    evaluate_grid_pointing_game,
    grid_pointing_game_scores,
    sample_grids,
    select_confident_images,
)

__all__ = [
    "EXPLAINERS",
    "Attribution",
    "BcosExplainer",
    "ConfidentImages",
    "Explainer",
    "GradCAMExplainer",
    "GridPointingGameResult",
    "GridSample",
    "InputXGradientExplainer",
    "IntegratedGradientsExplainer",
    "PixelClassifier",
    "SlidingWindowExplainer",
    "TransformedImages",
    "boxes_to_masks",
    "build_grid",
    "completeness_errors",
    "default_smoothing",
    "energy_pointing_game_scores",
    "evaluate_energy_pointing_game",
    "evaluate_grid_pointing_game",
    "gather_images",
    "grid_pointing_game_scores",
    "iterate_batches",
    "make_explainer",
    "predict_logits",
    "sample_grids",
    "select_confident_images",
    "top1_accuracy",
]
