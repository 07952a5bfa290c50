#!/usr/bin/env python
"""Fine-tune a B-cos image classifier on your data, on one or many GPUs/nodes, or on CPU.

    accelerate launch examples/finetune.py --model SRC --dataset DATA --output_dir OUT [...]

SRC: a standard transformers image classifier (Hub id or folder; B-cosified on the fly), a B-cos
checkpoint (training continues), ``default:resnet`` / ``default:vit`` (small standard models
trained on the embedded MNIST and cached), or ``--from_scratch FAMILY|CONFIG.json`` instead.
DATA: a Hub dataset id, a local imagefolder directory, or ``embedded:mnist`` (the default).

With no arguments the run is offline end to end: the cached standard ResNet -> B-cosify ->
BatchNorm re-estimation (accuracy before/after) -> fine-tuning -> evaluation -> a Hub-ready
folder with a model card. The flags follow transformers' run_image_classification_no_trainer.py;
the work is done by `transformers_bcos.training.run_finetuning`.
"""

import argparse
import sys

from transformers_bcos.data import DatasetError
from transformers_bcos.training import FinetuneOptions, OptionsError, run_finetuning
from transformers_bcos.training.arguments import add_data_arguments, add_output_arguments, add_recipe_arguments
from transformers_bcos.training.checkpointing import CheckpointError
from transformers_bcos.training.run import TrainingDivergedError
from transformers_bcos.training.finetune import DEFAULT_MODEL
from transformers_bcos.training.guidance import GUIDANCE_LOSSES

DEFAULTS = FinetuneOptions()


def parse_args(argv=None) -> FinetuneOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = add_data_arguments(parser, DEFAULTS)
    source.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help=f"Standard or B-cos checkpoint (Hub id or folder), or default:resnet/default:vit "
                             f"(default: {DEFAULT_MODEL}).")
    source.add_argument("--from_scratch", default=None, metavar="FAMILY|CONFIG.json",
                        help="Train a B-cos network from scratch: resnet/vit (the small default architectures) or a "
                             "JSON config (the config of any transformers image classifier, or a BcosConfig).")
    source.add_argument("--b", type=float, default=DEFAULTS.b, help="B-cos exponent.")
    source.add_argument("--image_size", type=int, default=None,
                        help="Input size of --from_scratch models (default: the image_size of a ViT or rules-family "
                             "config, else 28 for the resnet family and 224 for a JSON config).")
    recipe = add_recipe_arguments(parser, DEFAULTS)
    recipe.add_argument("--agc_clip_factor", type=float, default=None, help="Adaptive gradient clipping; 0 disables.")
    recipe.add_argument("--bn_reestimation_images", type=int, default=None,
                        help="Training images for the BatchNorm re-estimation of a freshly B-cosified CNN; 0 disables.")
    guidance = parser.add_argument_group(
        "model guidance (Rao et al., ICCV 2023): a loss on the explanation of the label, from object boxes")
    guidance.add_argument("--guidance_loss", choices=GUIDANCE_LOSSES, default=None,
                          help="energy: 1 - the share of positive contribution inside the boxes (the paper's); "
                               "l1: |scaled positive contributions - box mask|; rrr: squared contributions outside.")
    guidance.add_argument("--guidance_weight", type=float, default=DEFAULTS.guidance_weight,
                          help="Weight of the guidance loss beside the classification loss.")
    guidance.add_argument("--guidance_box_column", default=None,
                          help="Column of boxes in the datasets object-detection convention ({'bbox': [[x, y, w, h], "
                               "...]}, pixels); default 'objects' with --guidance_loss. Without a loss, the boxes "
                               "only score the evaluation's energy pointing game.")
    guidance.add_argument("--guidance_fraction", type=float, default=DEFAULTS.guidance_fraction,
                          help="Fraction of the training images with boxes whose boxes are used (seeded choice).")
    distillation = parser.add_argument_group(
        "e²KD (Parchami-Araghi et al., CVPR 2024): distillation of a teacher's logits and explanations")
    distillation.add_argument("--teacher", default=None,
                              help="Teacher folder (B-cos checkpoint or standard transformers image classifier); "
                                   "the loss becomes KD + weight × (1 − cosine) of the explanations.")
    distillation.add_argument("--distillation_temperature", type=float, default=DEFAULTS.distillation_temperature,
                              help="Temperature of the KD term.")
    distillation.add_argument("--explanation_distillation_weight", type=float,
                              default=DEFAULTS.explanation_distillation_weight,
                              help="Weight λ of the explanation term (0: plain KD).")
    add_output_arguments(parser, DEFAULTS)
    return FinetuneOptions(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        run_finetuning(options)
    except (OptionsError, DatasetError, CheckpointError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
