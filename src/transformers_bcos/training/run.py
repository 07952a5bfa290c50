"""What every training run of transformers-bcos shares: options, data, output folder, epochs, export.

``examples/finetune.py`` (`run_finetuning`) and ``examples/bcosify_clip.py``
(`run_clip_distillation`) are the same run with a different model and loss:

1. `validate_run_options`: every option that needs no data or model is checked before any work;
2. `load_run_data`, `build_loaders`: the data set and its loaders (pixels in [0, 1]);
3. `output_dir_lock`, `prepare_output_dir`: one run per output folder at a time; a new run, an
   overwritten one, or a resumed one (leftovers removed, newer checkpoints of an abandoned
   continuation dropped, the options recorded);
4. `train_epochs`: progress bar, tracking, checkpoints every N steps and after each epoch's
   evaluation, resuming mid-epoch with the same data order; a non-finite loss stops the run;
5. `save_and_publish`: the model folder, its card and results, optionally pushed to the Hub.
"""

import contextlib
import json
import math
import os
import shutil
import socket
import sys
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
from .checkpointing import CheckpointError, CheckpointManager, TrainingPosition
from .loop import RunningMean, ThroughputMeter

# Files of a finished or running run in its output folder.
RUN_OPTIONS_FILE = "run_options.json"
RESULTS_FILE = "all_results.json"
LOCK_FILE = ".run.lock"
# Output-folder entries that are not part of the published model.
NOT_PUBLISHED = ["checkpoints/*", "runs/*", RUN_OPTIONS_FILE, LOCK_FILE]
# Options a resumed run may change: they do not touch what is trained or in which order.
CHANGEABLE_ON_RESUME = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "per_device_eval_batch_size", "checkpointing_steps",
    "keep_last_checkpoints", "with_tracking", "report_to", "logging_steps", "dataloader_num_workers", "push_to_hub",
    "hub_model_id", "hub_token", "model_card_template", "disable_progress_bar",
})


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
    skip_unreadable_images: bool = False


class OptionsError(ValueError):
    """Options that cannot work; raised before any work, with a one-line message."""


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN or infinite; nothing was saved after the last good checkpoint."""


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    # NaN passes every comparison, so finiteness is checked first.
    if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)):
        raise OptionsError(f"--{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}.")


def check_output_dir_writable(output_dir: str) -> None:
    """The output folder must be a folder (or not exist yet) that this process can write in."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OptionsError(f"--output_dir {output_dir} is a file, not a folder.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OptionsError(f"--output_dir {output_dir} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionsError(f"--output_dir {output_dir} cannot be written: {existing} is not writable.")


def check_resumable_options(options: RunOptions, checkpoint_dir: str) -> None:
    """Resuming with options that change what is trained or in which order would not continue the
    same run: refuse them, naming each change (the run's options are in its run_options.json)."""
    recorded_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir))), RUN_OPTIONS_FILE)
    if not os.path.isfile(recorded_path):
        return
    try:
        with open(recorded_path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Cannot read {recorded_path}, the options of the run to resume: {error}") from None
    current = recordable(options)
    changed = [f"--{name} {recorded.get(name)!r} -> {value!r}" for name, value in current.items()
               if name not in CHANGEABLE_ON_RESUME and name in recorded and recorded[name] != value]
    if changed:
        raise OptionsError(
            f"Resuming {checkpoint_dir} with other options than its run ({recorded_path}) would not continue it: "
            + "; ".join(changed) + ". Resume with the same options, or start a new run in another --output_dir."
        )


def _holds_another_run(output_dir: str) -> bool:
    return os.path.isdir(output_dir) and any(not name.startswith(".") for name in os.listdir(output_dir))


def check_output_dir_free(options: RunOptions) -> None:
    """A new run must not mix its files with another run's, unless told to overwrite them."""
    if _holds_another_run(options.output_dir) and not options.overwrite_output_dir:
        raise OptionsError(
            f"Output directory {options.output_dir} already holds files (another run?): pass --overwrite_output_dir, "
            "--resume_from_checkpoint latest, or another --output_dir."
        )


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

    check_output_dir_writable(options.output_dir)
    if options.resume_from_checkpoint is not None:
        # Raises CheckpointError (a ValueError) naming the problem.
        checkpoint_dir = CheckpointManager(options.output_dir).resolve(options.resume_from_checkpoint)
        check_resumable_options(options, checkpoint_dir)
    else:
        check_output_dir_free(options)
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


def load_run_data(options: RunOptions, box_column: Optional[str] = None) -> ImageClassificationData:
    """The run's data set (with ``box_column``'s boxes kept, for model guidance). Every process opens
    it itself (datasets locks its cache), so that a bad data set fails on all of them alike instead
    of leaving the others waiting at a barrier."""
    return load_image_classification_data(
        options.dataset,
        image_column=options.image_column,
        label_column=options.label_column,
        train_split=options.train_split,
        eval_split=options.eval_split,
        max_train_samples=options.max_train_samples,
        max_eval_samples=options.max_eval_samples,
        seed=options.seed,
        skip_unreadable_images=options.skip_unreadable_images,
        box_column=box_column,
    )


@dataclass
class RunLoaders:
    train_dataset: ImageClassificationDataset
    train: DataLoader
    eval: DataLoader


def build_loaders(options: RunOptions, data: ImageClassificationData, collator: ImageProcessorCollator,
                  annotated: Optional[list] = None) -> RunLoaders:
    """Training and evaluation loaders. With the data's box column, the training batches carry the
    masks of the ``annotated`` rows (None: of every row) and the evaluation batches those of every
    image with boxes (`ImageProcessorCollator`)."""
    train_dataset = ImageClassificationDataset(
        data.train, data.image_column, data.label_column, augment=options.augment, seed=options.seed,
        crop_scale=(options.augment_min_scale, 1.0), box_column=data.box_column, annotated=annotated,
    )
    eval_dataset = ImageClassificationDataset(data.eval, data.image_column, data.label_column, box_column=data.box_column)
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


def _lock_holder(path: str) -> Optional[str]:
    """Who holds the lock file at ``path``: "PID n on HOST", or None if it is stale (that process is gone)."""
    try:
        with open(path, encoding="utf-8") as f:
            pid_text, _, host = f.read().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return "an unknown process (unreadable lock file)"
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by another user
    return f"PID {pid} on {host}"


@contextlib.contextmanager
def output_dir_lock(options: RunOptions, accelerator: Accelerator):
    """Hold ``<output_dir>/.run.lock`` (main process) while the run works in its output folder.

    A second run on the same folder (which would delete or mix the first one's checkpoints,
    model and options) is refused with an OptionsError naming the holder; a lock left by a
    process that no longer runs (killed) is taken over. A folder this run created and left
    empty (it failed before writing anything) is removed again.
    """
    if not accelerator.is_main_process:
        yield
        return
    created = not os.path.isdir(options.output_dir)
    os.makedirs(options.output_dir, exist_ok=True)
    path = os.path.join(options.output_dir, LOCK_FILE)
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None:
                raise OptionsError(
                    f"Output directory {options.output_dir} is in use by another run ({holder}; lock file {path}): "
                    "wait for it or choose another --output_dir."
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
    else:
        raise OptionsError(f"Cannot take the lock {path}: another run took it at the same time.")
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        if options.resume_from_checkpoint is None:
            check_output_dir_free(options)  # again: a run may have finished here since the options were checked
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        if created and not os.listdir(options.output_dir):
            os.rmdir(options.output_dir)


def load_training_state(accelerator: Accelerator, checkpoint_dir: str) -> list:
    """``accelerator.load_state(checkpoint_dir)``, saying what it could not restore.

    Accelerate skips a random-number-generator state file it cannot read (missing, or a pickle
    that ``torch.load(weights_only=True)`` refuses) with an INFO message only; the run then goes
    on with other random draws (dropout, stochastic depth) than the interrupted one. Returns the
    parts that were not restored, after printing a warning line on stderr for them.
    """
    from accelerate.utils import load as accelerate_load
    from accelerate.utils.constants import RNG_STATE_NAME

    accelerator.load_state(checkpoint_dir)
    rng_file = os.path.join(checkpoint_dir, f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl")
    try:
        accelerate_load(rng_file)
        incomplete = []
    except Exception as error:  # exactly what Accelerate catches and logs at INFO level
        incomplete = [f"the random-number-generator state {rng_file} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"]
    for part in incomplete:
        print(f"warning: resumed from {checkpoint_dir} without {part}: the run continues, but not bit-identical "
              "to an uninterrupted one.", file=sys.stderr)
    return incomplete


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


def _diverged_advice(checkpoints: CheckpointManager) -> str:
    return (f"the run diverged and was stopped; the last good checkpoint is {checkpoints.latest() or 'none (none was saved yet)'}. "
            "Lower --learning_rate (or raise --num_warmup_steps) and start again.")


def check_finite_weights(model, completed_steps: int, checkpoints: CheckpointManager) -> None:
    """Raise TrainingDivergedError before a checkpoint of NaN or infinite weights is written
    (a last update can overflow the weights while its loss was still finite)."""
    non_finite = [name for name, tensor in model.state_dict().items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if non_finite:
        raise TrainingDivergedError(
            f"The weights hold NaN or infinite values after step {completed_steps} ({', '.join(non_finite[:3])}"
            f"{' and more' if len(non_finite) > 3 else ''}): " + _diverged_advice(checkpoints)
        )


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
            if not torch.isfinite(loss).all():
                raise TrainingDivergedError(
                    f"The training loss became {loss.item()} at step {completed_steps + 1} (epoch {epoch + 1}): "
                    + _diverged_advice(checkpoints)
                )
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
                check_finite_weights(model, completed_steps, checkpoints)
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
        check_finite_weights(model, completed_steps, checkpoints)
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
    non_finite = [name for name, tensor in state_dict.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if non_finite:
        raise TrainingDivergedError(
            f"The trained weights hold NaN or infinite values ({', '.join(non_finite[:3])}"
            f"{' and more' if len(non_finite) > 3 else ''}): the run diverged; nothing was saved beyond the checkpoints. "
            "Lower --learning_rate and start again."
        )
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
