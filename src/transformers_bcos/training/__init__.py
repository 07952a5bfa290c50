"""Training B-cos models: the recipe, its pieces, the fine-tuning run (with model guidance and
e²KD distillation) and the CLIP distillation run.

The loss is the model's own (`bcos_bce_loss`: BCE with 1/C off-labels; the fixed logit bias is
part of the logits), so a standard training loop needs nothing else from here; the pieces below
add the B-cos recipe and the plumbing of `examples/finetune.py`.
"""

from ..modeling_bcos import bcos_bce_loss
from .agc import adaptive_gradient_clipping_, unitwise_norm
from .batchnorm import batchnorm_layers, reestimate_batchnorm_statistics
from .checkpointing import CheckpointError, CheckpointManager, TrainingPosition
from .clip_distillation import ClipDistillationOptions, run_clip_distillation
from .finetune import FinetuneOptions, adapt_classifier_to_labels, run_finetuning
from .loop import EvaluationResult, evaluate_accuracy, training_step
from .recipe import Recipe, create_optimizer, create_scheduler, recipe_defaults, recipe_family
from .run import OptionsError, RunOptions

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "ClipDistillationOptions",
    "EvaluationResult",
    "FinetuneOptions",
    "OptionsError",
    "Recipe",
    "RunOptions",
    "TrainingPosition",
    "adapt_classifier_to_labels",
    "adaptive_gradient_clipping_",
    "batchnorm_layers",
    "bcos_bce_loss",
    "create_optimizer",
    "create_scheduler",
    "evaluate_accuracy",
    "recipe_defaults",
    "recipe_family",
    "reestimate_batchnorm_statistics",
    "run_clip_distillation",
    "run_finetuning",
    "training_step",
    "unitwise_norm",
]
