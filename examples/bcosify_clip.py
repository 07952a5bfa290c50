#!/usr/bin/env python
"""B-cosify a CLIP model and distil its image tower from the original one, on images alone.

    accelerate launch examples/bcosify_clip.py --model SRC --dataset DATA --output_dir OUT [...]

SRC: a standard CLIP (Hub id or folder with its image processor and tokenizer). The image tower
is B-cosified (the student); the original image tower is the frozen teacher; the text tower is
kept unchanged and frozen. DATA: a Hub dataset id, a local imagefolder directory or
``embedded:mnist``; training uses its images only, and its labels give the zero-shot evaluation
(class names put into ``--prompt_templates``) of student and teacher before training and after
each epoch. Checkpoints, resuming, tracking and the Hub-ready output folder work as in
finetune.py; the work is done by `transformers_bcos.training.run_clip_distillation`.
"""

import argparse
import sys

from transformers_bcos.data import DatasetError
from transformers_bcos.training import ClipDistillationOptions, OptionsError, run_clip_distillation
from transformers_bcos.training.arguments import add_data_arguments, add_output_arguments, add_recipe_arguments
from transformers_bcos.training.checkpointing import CheckpointError
from transformers_bcos.training.run import TrainingDivergedError

DEFAULTS = ClipDistillationOptions()


def parse_args(argv=None) -> ClipDistillationOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = add_data_arguments(parser, DEFAULTS)
    source.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help="The standard CLIP to B-cosify (Hub id or folder). Required.")
    source.add_argument("--b", type=float, default=DEFAULTS.b, help="B-cos exponent of the image tower.")
    source.add_argument("--prompt_templates", nargs="+", default=list(DEFAULTS.prompt_templates),
                        help='Zero-shot prompt templates, each with a "{}" for the class name.')
    recipe = add_recipe_arguments(parser, DEFAULTS)
    recipe.add_argument("--loss_scale", type=float, default=DEFAULTS.loss_scale,
                        help="Scale of the SigLIP-style distillation logits.")
    recipe.add_argument("--loss_bias", type=float, default=DEFAULTS.loss_bias,
                        help="Bias of the SigLIP-style distillation logits.")
    add_output_arguments(parser, DEFAULTS)
    return ClipDistillationOptions(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        run_clip_distillation(options)
    except (OptionsError, DatasetError, CheckpointError) as error:
        print(f"bcosify_clip.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:
        print(f"bcosify_clip.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
