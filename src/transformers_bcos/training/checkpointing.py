"""Training checkpoints that a kill at any moment cannot corrupt.

Layout under ``<output_dir>/checkpoints/``::

    step_00000040/          accelerator.save_state (model, optimizer, scheduler, RNG, sampler)
        training_state.json the loop position: updates done, epoch, batches consumed, metrics
    epoch_0001/             the same, written at the end of epoch 1 (after its evaluation)
    latest                  a one-line file naming the newest complete checkpoint folder

A checkpoint is written into ``.tmp-<name>`` and renamed into place only once every process has
finished writing; ``latest`` is then replaced atomically (write a temporary file, fsync,
``os.replace``); checkpoints beyond the last K are renamed to ``.trash-<name>`` before they are
deleted. So ``latest`` always names a complete checkpoint, and a half-written or half-deleted
folder never looks like one. All processes must see the same file system (as for
``accelerator.save_state``).
"""

import json
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Optional

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
STATE_FILENAME = "training_state.json"
STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


@dataclass
class TrainingPosition:
    """Where the training loop stands; enough to continue mid-epoch with the same data order."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    epoch_complete: bool = False
    metrics: dict = field(default_factory=dict)

    def order_key(self) -> tuple:
        """Sorts positions in training order."""
        return (self.completed_steps, self.epoch, self.epoch_complete)

    def resume_point(self) -> tuple:
        """(first epoch to run, batches of it to skip)."""
        if self.epoch_complete:
            return self.epoch + 1, 0
        return self.epoch, self.batches_in_epoch


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_position(checkpoint_dir: str) -> TrainingPosition:
    path = os.path.join(checkpoint_dir, STATE_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint_dir} is not a training checkpoint (no {STATE_FILENAME}).")
    try:
        with open(path, encoding="utf-8") as f:
            return TrainingPosition(**json.load(f))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is not a training position: {error}") from None


def check_checkpoint_files(checkpoint_dir: str) -> None:
    """Raise a CheckpointError naming a truncated or corrupt file of a checkpoint, before any work.

    safetensors files must have a complete header that covers the file; the files
    ``torch.save`` writes (optimizer, scheduler, sampler, RNG states) are zip archives whose
    directory sits at their end, so a truncated one no longer opens.
    """
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(checkpoint_dir)):
        path = os.path.join(checkpoint_dir, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):
                    pass
            elif name.endswith((".bin", ".pkl", ".pt")):
                with zipfile.ZipFile(path):
                    pass
        except (SafetensorError, zipfile.BadZipFile, OSError) as error:
            raise CheckpointError(f"Checkpoint file {path} is truncated or corrupt: {error}") from None


class CheckpointManager:
    """Saves, rotates and finds checkpoints of one run.

    Args:
        output_dir: the run's output folder; checkpoints go to ``<output_dir>/checkpoints``.
        keep_last: how many complete checkpoints to keep (>= 1).
    """

    def __init__(self, output_dir: str, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}.")
        self.directory = os.path.join(output_dir, CHECKPOINTS_DIRNAME)
        self.keep_last = keep_last

    # -- finding ---------------------------------------------------------------------------------

    def latest(self) -> Optional[str]:
        """The folder ``latest`` names, or None when there is no checkpoint yet."""
        pointer = os.path.join(self.directory, LATEST_FILENAME)
        if not os.path.isfile(pointer):
            return None
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(self.directory, name)
        if not os.path.isfile(os.path.join(path, STATE_FILENAME)):
            raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint.")
        return path

    def complete_checkpoints(self) -> list:
        """Complete checkpoint folders, oldest first (by training position)."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith((STAGING_PREFIX, TRASH_PREFIX)) or not os.path.isfile(os.path.join(path, STATE_FILENAME)):
                continue
            found.append((read_position(path).order_key(), path))
        return [path for _, path in sorted(found)]

    def resolve(self, checkpoint: str) -> str:
        """``"latest"`` or a checkpoint folder -> the folder to resume from."""
        if checkpoint == "latest":
            path = self.latest()
            if path is None:
                raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint in {self.directory}.")
        else:
            path = checkpoint
            read_position(path)  # raises if it is not a complete checkpoint
        check_checkpoint_files(path)
        return path

    # -- writing ---------------------------------------------------------------------------------

    def remove_leftovers(self) -> None:
        """Delete staging/trash folders a killed run left behind (main process, before training)."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def save(self, accelerator, name: str, position: TrainingPosition) -> str:
        """Save the accelerator state as checkpoint ``name`` on all processes; returns its folder.

        Every process must call this (``save_state`` writes per-process RNG states).
        """
        final = os.path.join(self.directory, name)
        staging = os.path.join(self.directory, STAGING_PREFIX + name)
        if accelerator.is_main_process:
            os.makedirs(self.directory, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_atomically(os.path.join(staging, STATE_FILENAME), json.dumps(asdict(position), indent=2) + "\n")
            if os.path.exists(final):
                raise CheckpointError(f"Checkpoint {final} exists already; it would be overwritten.")
            os.rename(staging, final)
            _fsync_directory(self.directory)
            _write_atomically(os.path.join(self.directory, LATEST_FILENAME), name + "\n")
            self.rotate()
        accelerator.wait_for_everyone()
        return final

    def abandon_newer_than(self, checkpoint_dir: str) -> None:
        """Resuming from ``checkpoint_dir``: make it ``latest`` and drop this run's newer checkpoints.

        Those belong to the abandoned continuation; keeping them would let ``latest`` and the
        rotation mix two histories. Call on the main process before training resumes.
        """
        if os.path.dirname(os.path.abspath(checkpoint_dir)) != os.path.abspath(self.directory):
            return
        resume_key = read_position(checkpoint_dir).order_key()
        _write_atomically(os.path.join(self.directory, LATEST_FILENAME), os.path.basename(checkpoint_dir) + "\n")
        for path in self.complete_checkpoints():
            if read_position(path).order_key() > resume_key:
                self._discard(path)

    def rotate(self) -> None:
        """Delete the oldest complete checkpoints beyond ``keep_last`` (never the one ``latest`` names)."""
        latest = self.latest()
        checkpoints = [path for path in self.complete_checkpoints() if path != latest]
        excess = len(checkpoints) + (1 if latest else 0) - self.keep_last
        for path in checkpoints[: max(excess, 0)]:
            self._discard(path)

    def _discard(self, path: str) -> None:
        trash = os.path.join(self.directory, TRASH_PREFIX + os.path.basename(path))
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
