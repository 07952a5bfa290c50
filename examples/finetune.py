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

from transformers_bcos.data import DEFAULT_DATASET, DatasetError
from transformers_bcos.training import FinetuneOptions, OptionsError, run_finetuning
from transformers_bcos.training.checkpointing import CheckpointError
from transformers_bcos.training.finetune import DEFAULT_MODEL

DEFAULTS = FinetuneOptions()


def parse_args(argv=None) -> FinetuneOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help=f"Standard or B-cos checkpoint (Hub id or folder), or default:resnet/default:vit "
                             f"(default: {DEFAULT_MODEL}).")
    source.add_argument("--from_scratch", default=None, metavar="FAMILY|CONFIG.json",
                        help="Train a B-cos network from scratch: resnet/vit (the small default architectures) or a "
                             "JSON config (a ResNet/ViT/ConvNeXt/DeiT config or a BcosConfig).")
    source.add_argument("--b", type=float, default=DEFAULTS.b, help="B-cos exponent.")
    source.add_argument("--dataset", "--dataset_name", dest="dataset", default=None,
                        help=f"Hub dataset id, imagefolder directory, or embedded:mnist (default: {DEFAULT_DATASET}).")
    source.add_argument("--image_column", "--image_column_name", dest="image_column", default=None,
                        help="Image column (default: the Image-typed column).")
    source.add_argument("--label_column", "--label_column_name", dest="label_column", default=None,
                        help="Label column (default: the ClassLabel-typed column).")
    source.add_argument("--train_split", default=DEFAULTS.train_split)
    source.add_argument("--eval_split", default=None,
                        help="Default: validation/valid/val/test if present, else 15%% of the training split.")
    source.add_argument("--max_train_samples", type=int, default=None)
    source.add_argument("--max_eval_samples", type=int, default=None)
    source.add_argument("--image_size", type=int, default=None, help="Input size of --from_scratch CNNs.")
    source.add_argument("--augment", action="store_true", help="Random resized crop + horizontal flip at train time.")
    source.add_argument("--augment_min_scale", type=float, default=DEFAULTS.augment_min_scale,
                        help="Smallest area fraction of the random resized crop.")
    source.add_argument("--dataloader_num_workers", type=int, default=DEFAULTS.dataloader_num_workers)

    recipe = parser.add_argument_group("training recipe (None = the documented default of the model family)")
    recipe.add_argument("--num_train_epochs", type=int, default=DEFAULTS.num_train_epochs)
    recipe.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    recipe.add_argument("--per_device_train_batch_size", type=int, default=DEFAULTS.per_device_train_batch_size)
    recipe.add_argument("--per_device_eval_batch_size", type=int, default=DEFAULTS.per_device_eval_batch_size)
    recipe.add_argument("--gradient_accumulation_steps", type=int, default=DEFAULTS.gradient_accumulation_steps)
    recipe.add_argument("--learning_rate", type=float, default=None)
    recipe.add_argument("--weight_decay", type=float, default=None)
    recipe.add_argument("--lr_scheduler_type", default=None,
                        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                 "constant_with_warmup"])
    recipe.add_argument("--num_warmup_steps", type=int, default=None)
    recipe.add_argument("--agc_clip_factor", type=float, default=None, help="Adaptive gradient clipping; 0 disables.")
    recipe.add_argument("--bn_reestimation_images", type=int, default=None,
                        help="Training images for the BatchNorm re-estimation of a freshly B-cosified CNN; 0 disables.")
    recipe.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="Default: the accelerate launch/config setting.")
    recipe.add_argument("--seed", type=int, default=DEFAULTS.seed)

    run = parser.add_argument_group("output, checkpoints, tracking, Hub")
    run.add_argument("--output_dir", default=DEFAULTS.output_dir)
    run.add_argument("--overwrite_output_dir", action="store_true")
    run.add_argument("--checkpointing_steps", type=int, default=None,
                     help="Also save a checkpoint every N optimizer steps (one is always saved after each epoch).")
    run.add_argument("--keep_last_checkpoints", type=int, default=DEFAULTS.keep_last_checkpoints)
    run.add_argument("--resume_from_checkpoint", default=None, metavar="latest|PATH")
    run.add_argument("--with_tracking", action="store_true")
    run.add_argument("--report_to", default=DEFAULTS.report_to, help="Accelerate tracker(s) for --with_tracking.")
    run.add_argument("--logging_steps", type=int, default=DEFAULTS.logging_steps)
    run.add_argument("--disable_progress_bar", action="store_true")
    run.add_argument("--model_card_template", default=None, help="Default: model_cards/image-classification.md.")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", default=None, metavar="ORG/NAME")
    run.add_argument("--hub_token", default=None)
    return FinetuneOptions(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        run_finetuning(options)
    except (OptionsError, DatasetError, CheckpointError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
