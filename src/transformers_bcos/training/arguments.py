"""Command-line flags shared by examples/finetune.py and examples/bcosify_clip.py.

Names follow transformers' ``run_image_classification_no_trainer.py``. Each function adds one
argument group and returns it, so that a script can add its own flags to the group.
"""

import argparse

from ..data import DEFAULT_DATASET
from .run import RunOptions


def add_data_arguments(parser: argparse.ArgumentParser, defaults: RunOptions) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model and data")
    group.add_argument("--dataset", "--dataset_name", dest="dataset", default=None,
                       help=f"Hub dataset id, imagefolder directory, or embedded:mnist (default: {DEFAULT_DATASET}).")
    group.add_argument("--image_column", "--image_column_name", dest="image_column", default=None,
                       help="Image column (default: the Image-typed column).")
    group.add_argument("--label_column", "--label_column_name", dest="label_column", default=None,
                       help="Label column (default: the ClassLabel-typed column).")
    group.add_argument("--train_split", default=defaults.train_split)
    group.add_argument("--eval_split", default=None,
                       help="Default: validation/valid/val/test if present, else 15%% of the training split.")
    group.add_argument("--max_train_samples", type=int, default=None)
    group.add_argument("--max_eval_samples", type=int, default=None)
    group.add_argument("--augment", action="store_true", help="Random resized crop + horizontal flip at train time.")
    group.add_argument("--augment_min_scale", type=float, default=defaults.augment_min_scale,
                       help="Smallest area fraction of the random resized crop.")
    group.add_argument("--dataloader_num_workers", type=int, default=defaults.dataloader_num_workers)
    group.add_argument("--skip_unreadable_images", action="store_true",
                       help="Leave out (and count) images that cannot be decoded; by default one is an error. "
                            "Every image is decoded once before training to find them.")
    return group


def add_recipe_arguments(parser: argparse.ArgumentParser, defaults: RunOptions) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("training recipe (None = the documented default)")
    group.add_argument("--num_train_epochs", type=int, default=defaults.num_train_epochs)
    group.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    group.add_argument("--per_device_train_batch_size", type=int, default=defaults.per_device_train_batch_size)
    group.add_argument("--per_device_eval_batch_size", type=int, default=defaults.per_device_eval_batch_size)
    group.add_argument("--gradient_accumulation_steps", type=int, default=defaults.gradient_accumulation_steps)
    group.add_argument("--learning_rate", type=float, default=None)
    group.add_argument("--weight_decay", type=float, default=None)
    group.add_argument("--lr_scheduler_type", default=None,
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"])
    group.add_argument("--num_warmup_steps", type=int, default=None)
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Default: the accelerate launch/config setting.")
    group.add_argument("--seed", type=int, default=defaults.seed)
    return group


def add_output_arguments(parser: argparse.ArgumentParser, defaults: RunOptions) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("output, checkpoints, tracking, Hub")
    group.add_argument("--output_dir", default=defaults.output_dir)
    group.add_argument("--overwrite_output_dir", action="store_true")
    group.add_argument("--checkpointing_steps", type=int, default=None,
                       help="Also save a checkpoint every N optimizer steps (one is always saved after each epoch).")
    group.add_argument("--keep_last_checkpoints", type=int, default=defaults.keep_last_checkpoints)
    group.add_argument("--resume_from_checkpoint", default=None, metavar="latest|PATH")
    group.add_argument("--with_tracking", action="store_true")
    group.add_argument("--report_to", default=defaults.report_to, help="Accelerate tracker(s) for --with_tracking.")
    group.add_argument("--logging_steps", type=int, default=defaults.logging_steps)
    group.add_argument("--disable_progress_bar", action="store_true")
    group.add_argument("--model_card_template", default=None)
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", default=None, metavar="ORG/NAME")
    group.add_argument("--hub_token", default=None)
    return group
