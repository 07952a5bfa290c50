"""What every training run of transformers-bcos shares: options, data, output folder, epochs, export.

``examples/finetune.py`` (`run_finetuning`) and ``examples/bcosify_clip.py``
(`run_clip_distillation`) are the same run with a different model and loss:

1. `validate_run_options`: every option that needs no data or model is checked before any work;
2. `load_run_data`, `build_loaders`: the data set and its loaders (pixels in [0, 1]);
3. `prepare_output_dir`: a new run, an overwritten one, or a resumed one (leftovers removed,
   newer checkpoints of an abandoned continuation dropped, the options recorded);
4. `train_epochs`: progress bar, tracking, checkpoints every N steps and after each epoch's
   evaluation, resuming mid-epoch with the same data order;
5. `save_and_publish`: the model folder, its card and results, optionally pushed to the Hub.
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

from ..data import (
    DEFAULT_DATASET,
    EMBEDDED_PREFIX,
    ImageClassificationData,
    ImageClassificationDataset,
    ImageProcessorCollator,
    load_image_classification_data,
)
from .checkpointing import CheckpointManager, TrainingPosition
from .loop import RunningMean, ThroughputMeter

# Files of a finished or running run in its output folder.
RUN_OPTIONS_FILE = "run_options.json"
RESULTS_FILE = "all_results.json"
# Output-folder entries that are not part of the published model.
NOT_PUBLISHED = ["checkpoints/*", "runs/*", RUN_OPTIONS_FILE]


@dataclass
class RunOptions:
    """The options every run has (data, schedule, checkpoints, tracking, Hub).

    None for a recipe value (learning rate, weight decay, scheduler, warm-up) means the documented
    default of the run.
    """

    dataset: Optional[str] = None
    output_dir: str = "outputs/bcos-run"
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: str = "train"
    eval_split: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    num_train_epochs: int = 3
    max_train_steps: Optional[int] = None
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int = 256
    gradient_accumulation_steps: int = 1
    learning_rate: Optional[float] = None
    weight_decay: Optional[float] = None
    lr_scheduler_type: Optional[str] = None
    num_warmup_steps: Optional[int] = None
    augment: bool = False
    augment_min_scale: float = 0.08
    checkpointing_steps: Optional[int] = None
    keep_last_checkpoints: int = 2
    resume_from_checkpoint: Optional[str] = None
    overwrite_output_dir: bool = False
    seed: int = 0
    mixed_precision: Optional[str] = None
    with_tracking: bool = False
    report_to: str = "all"
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = None
    model_card_template: Optional[str] = None
    disable_progress_bar: bool = False


class OptionsError(ValueError):
    """Options that cannot work; raised before any work, with a one-line message."""


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise OptionsError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def _holds_another_run(output_dir: str) -> bool:
    return os.path.isdir(output_dir) and any(not name.startswith(".") for name in os.listdir(output_dir))


def validate_run_options(options: RunOptions, default_template: str) -> None:
    """Check the shared options that need no data or model: numbers, card template, output folder, Hub."""
    for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "keep_last_checkpoints", "logging_steps", "max_train_steps",
                 "checkpointing_steps", "max_train_samples", "max_eval_samples", "learning_rate"):
        check_positive(name, getattr(options, name))
    for name in ("weight_decay", "num_warmup_steps", "dataloader_num_workers"):
        check_positive(name, getattr(options, name), allow_zero=True)
    if not 0 < options.augment_min_scale <= 1:
        raise OptionsError(f"--augment_min_scale must be in (0, 1], got {options.augment_min_scale}.")
    if options.model_card_template is not None and not os.path.isfile(options.model_card_template):
        raise OptionsError(f"--model_card_template {options.model_card_template} does not exist.")
    if options.model_card_template is None and not os.path.isfile(default_template):
        raise OptionsError(f"The model-card template {default_template} is missing: pass --model_card_template.")

    if options.resume_from_checkpoint is not None:
        # Raises CheckpointError (a ValueError) naming the problem.
        CheckpointManager(options.output_dir).resolve(options.resume_from_checkpoint)
    elif _holds_another_run(options.output_dir) and not options.overwrite_output_dir:
        raise OptionsError(
            f"Output directory {options.output_dir} already holds files (another run?): pass --overwrite_output_dir, "
            "--resume_from_checkpoint latest, or another --output_dir."
        )
    if options.push_to_hub:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise OptionsError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set.")
        if options.hub_model_id is None:
            raise OptionsError("--push_to_hub needs --hub_model_id ORG/NAME.")


def create_accelerator(options: RunOptions) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        mixed_precision=options.mixed_precision,
        log_with=options.report_to if options.with_tracking else None,
        project_dir=options.output_dir,
        # The sampler's order is a function of (seed, epoch): a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=options.seed),
    )


def load_run_data(options: RunOptions) -> ImageClassificationData:
    """The run's data set. Every process opens it itself (datasets locks its cache), so that a bad
    data set fails on all of them alike instead of leaving the others waiting at a barrier."""
    return load_image_classification_data(
        options.dataset,
        image_column=options.image_column,
        label_column=options.label_column,
        train_split=options.train_split,
        eval_split=options.eval_split,
        max_train_samples=options.max_train_samples,
        max_eval_samples=options.max_eval_samples,
        seed=options.seed,
    )


@dataclass
class RunLoaders:
    train_dataset: ImageClassificationDataset
    train: DataLoader
    eval: DataLoader


def build_loaders(options: RunOptions, data: ImageClassificationData, collator: ImageProcessorCollator) -> RunLoaders:
    train_dataset = ImageClassificationDataset(
        data.train, data.image_column, data.label_column, augment=options.augment, seed=options.seed,
        crop_scale=(options.augment_min_scale, 1.0),
    )
    eval_dataset = ImageClassificationDataset(data.eval, data.image_column, data.label_column)
    # Own generators, so that creating a dataloader iterator never draws from the global RNG.
    train_loader = DataLoader(train_dataset, batch_size=options.per_device_train_batch_size, shuffle=True,
                              collate_fn=collator, num_workers=options.dataloader_num_workers,
                              generator=torch.Generator().manual_seed(options.seed))
    eval_loader = DataLoader(eval_dataset, batch_size=options.per_device_eval_batch_size, collate_fn=collator,
                             num_workers=options.dataloader_num_workers, generator=torch.Generator())
    return RunLoaders(train_dataset, train_loader, eval_loader)


@dataclass
class Schedule:
    steps_per_epoch: int
    max_train_steps: int
    num_train_epochs: int


def resolve_schedule(options: RunOptions, num_train_images: int, num_processes: int) -> Schedule:
    """Optimizer steps per epoch and in all (``--max_train_steps`` overrides ``--num_train_epochs``)."""
    steps_per_epoch = math.ceil(
        math.ceil(num_train_images / (options.per_device_train_batch_size * num_processes))
        / options.gradient_accumulation_steps
    )
    if options.max_train_steps is None:
        return Schedule(steps_per_epoch, options.num_train_epochs * steps_per_epoch, options.num_train_epochs)
    return Schedule(steps_per_epoch, options.max_train_steps, math.ceil(options.max_train_steps / steps_per_epoch))


def recordable(options: RunOptions) -> dict:
    """The options without secrets, for the run's record and the trackers."""
    return {key: value for key, value in asdict(options).items() if key != "hub_token"}


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def hub_metadata(options: RunOptions, base_model: Optional[str]) -> str:
    """The card's YAML lines: the metric, the Hub data set and base model where they are Hub ids."""
    lines = ["metrics:", "- accuracy"]
    dataset = options.dataset or DEFAULT_DATASET
    if not dataset.startswith(EMBEDDED_PREFIX) and not os.path.isdir(os.path.expanduser(dataset)):
        lines += ["datasets:", f"- {dataset}"]
    if base_model is not None and not os.path.isdir(base_model):
        lines.append(f"base_model: {base_model}")
    return "\n".join(lines)


def optimization_rows(options: RunOptions, schedule: Schedule, num_train_images: int, num_processes: int,
                      mixed_precision: str, learning_rate: float, weight_decay: float, lr_scheduler_type: str,
                      num_warmup_steps: int) -> list:
    """The card's training-table rows every run has: data size, steps, batch, optimizer, schedule."""
    global_batch = options.per_device_train_batch_size * num_processes * options.gradient_accumulation_steps
    return [
        ("training images", f"{num_train_images:,}"),
        ("epochs / optimizer steps", f"{schedule.num_train_epochs} / {schedule.max_train_steps}"),
        ("global batch size", f"{global_batch} ({num_processes} process(es) × {options.per_device_train_batch_size}"
                              f" × {options.gradient_accumulation_steps} accumulation)"),
        ("optimizer", f"AdamW, lr {learning_rate:g}, weight decay {weight_decay:g}"),
        ("schedule", f"{lr_scheduler_type}, {num_warmup_steps} warm-up steps"),
        ("augmentation", f"random resized crop (scale {options.augment_min_scale:g}–1) + horizontal flip"
                         if options.augment else "none"),
        ("mixed precision", mixed_precision),
        ("seed", str(options.seed)),
    ]


def prepare_output_dir(options: RunOptions, accelerator: Accelerator, checkpoints: CheckpointManager) -> Optional[str]:
    """Get the output folder ready for this run; returns the checkpoint to resume from, if any."""
    resume_dir = checkpoints.resolve(options.resume_from_checkpoint) if options.resume_from_checkpoint else None
    if accelerator.is_main_process:
        os.makedirs(options.output_dir, exist_ok=True)
        if options.overwrite_output_dir and resume_dir is None:
            shutil.rmtree(checkpoints.directory, ignore_errors=True)  # a stale "latest" must not survive
        checkpoints.remove_leftovers()
        if resume_dir is not None:
            checkpoints.abandon_newer_than(resume_dir)
        write_json(os.path.join(options.output_dir, RUN_OPTIONS_FILE), recordable(options))
    accelerator.wait_for_everyone()
    return resume_dir


def train_epochs(
    accelerator: Accelerator,
    options: RunOptions,
    *,
    model,
    loaders: RunLoaders,
    schedule: Schedule,
    position: TrainingPosition,
    checkpoints: CheckpointManager,
    lr_scheduler,
    train_step: Callable[[dict], torch.Tensor],
    evaluate: Callable[[int, int], dict],
    description: str,
) -> tuple:
    """Train from ``position`` to the end of the schedule; returns (final position, completed steps).

    Args:
        model: the prepared model (put in train mode at the start of each epoch).
        lr_scheduler: the prepared scheduler (its learning rate is shown and tracked).
        train_step: one batch -> its detached loss; it does the backward pass and, on
            gradient-sync steps, the optimizer and scheduler steps (`training_step`).
        evaluate: after each epoch, ``evaluate(epoch, completed_steps)`` (epoch counted from 1) ->
            the epoch's measured values (logged to the trackers, recorded in ``position.metrics["epochs"]``).
        description: the progress bar's label.
    """
    position.metrics.setdefault("epochs", [])
    first_epoch, skip_batches = position.resume_point()
    completed_steps = position.completed_steps
    progress = None
    if accelerator.is_main_process and not options.disable_progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=schedule.max_train_steps, initial=completed_steps, desc=description, dynamic_ncols=True)
    throughput, running_loss = ThroughputMeter(), RunningMean()
    images_per_batch = accelerator.num_processes * options.gradient_accumulation_steps

    for epoch in range(first_epoch, schedule.num_train_epochs):
        if completed_steps >= schedule.max_train_steps:
            break
        model.train()
        loaders.train.set_epoch(epoch)
        loaders.train_dataset.set_epoch(epoch)  # Accelerate's set_epoch does not reach a sharded loader's dataset
        epoch_loader = loaders.train
        batches_in_epoch = 0
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(loaders.train, skip_batches)
            batches_in_epoch = skip_batches
        throughput.restart()
        epoch_loss, epoch_steps = 0.0, 0
        for batch in epoch_loader:
            loss = train_step(batch)
            batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            epoch_loss, epoch_steps = epoch_loss + loss.item(), epoch_steps + 1
            throughput.update(batch["pixel_values"].shape[0] * images_per_batch)
            mean_loss = running_loss.update(loss.item())
            learning_rate = lr_scheduler.get_last_lr()[0]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{learning_rate:.2e}",
                                     img_s=f"{throughput.images_per_second:.0f}", refresh=False)
            if options.with_tracking and completed_steps % options.logging_steps == 0:
                accelerator.log({"train/loss": mean_loss, "train/learning_rate": learning_rate,
                                 "train/images_per_second": throughput.images_per_second}, step=completed_steps)
            if options.checkpointing_steps and completed_steps % options.checkpointing_steps == 0:
                position = TrainingPosition(completed_steps, epoch, batches_in_epoch, False, position.metrics)
                checkpoints.save(accelerator, f"step_{completed_steps:08d}", position)
                throughput.restart()
            if completed_steps >= schedule.max_train_steps:
                break

        measured = evaluate(epoch + 1, completed_steps)
        position.metrics["epochs"].append(
            {"epoch": epoch + 1, "step": completed_steps, **measured,
             # Mean loss of this process's steps in this epoch (of the resumed part, after a resume).
             "train_loss": epoch_loss / epoch_steps if epoch_steps else None}
        )
        if options.with_tracking:
            accelerator.log({**{f"eval/{k}": v for k, v in measured.items() if isinstance(v, (int, float))},
                             "epoch": epoch + 1}, step=completed_steps)
        position = TrainingPosition(completed_steps, epoch, batches_in_epoch, True, position.metrics)
        checkpoints.save(accelerator, f"epoch_{epoch + 1:04d}", position)
    if progress is not None:
        progress.close()
    return position, completed_steps


def save_and_publish(options: RunOptions, accelerator: Accelerator, model, state_dict: dict, card: Callable[[], str],
                     metrics: dict, commit_message: str) -> None:
    """Save the trained (unwrapped) ``model`` with ``state_dict``, its card and results; push if asked.

    ``card`` is called on the main process only.
    """
    accelerator.wait_for_everyone()
    model.save_pretrained(options.output_dir, is_main_process=accelerator.is_main_process,
                          save_function=accelerator.save, state_dict=state_dict)
    if accelerator.is_main_process:
        with open(os.path.join(options.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card())
        write_json(os.path.join(options.output_dir, RESULTS_FILE), metrics)
        accelerator.print(f"Saved the model, its processors and README.md to {options.output_dir}.")
        if options.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=options.hub_token)
            repo_id = api.create_repo(options.hub_model_id, exist_ok=True).repo_id
            api.upload_folder(folder_path=options.output_dir, repo_id=repo_id, ignore_patterns=NOT_PUBLISHED,
                              commit_message=commit_message)
            accelerator.print(f"Pushed to https://huggingface.co/{repo_id}.")
    accelerator.wait_for_everyone()
