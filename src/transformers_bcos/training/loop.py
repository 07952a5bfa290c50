"""Pieces of the training loop: one optimisation step, evaluation, throughput."""

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate.utils import DistributedType

from .agc import adaptive_gradient_clipping_

# AGC needs each unit's full gradient and weight; these strategies shard or hide them.
AGC_UNSUPPORTED = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def check_agc_supported(accelerator, agc_clip_factor: float) -> None:
    if agc_clip_factor > 0 and accelerator.distributed_type in AGC_UNSUPPORTED:
        raise ValueError(
            f"Adaptive gradient clipping needs unsharded gradients, which {accelerator.distributed_type.value} does not "
            "expose: pass --agc_clip_factor 0 (and use the strategy's own gradient clipping)."
        )


def classification_loss(model, batch: dict) -> torch.Tensor:
    """The classifier's own loss (`bcos_bce_loss` for B-cos models) on a labelled batch."""
    return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss


def training_step(
    accelerator,
    model,
    batch: dict,
    optimizer,
    lr_scheduler,
    agc_clip_factor: float = 0.01,
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor] = classification_loss,
) -> torch.Tensor:
    """Forward, backward and (on gradient-sync steps) AGC, optimizer and scheduler steps.

    ``compute_loss(model, batch)`` must run the prepared ``model``'s forward (DDP synchronises
    gradients through it). Gradient accumulation is Accelerate's: inside ``accelerator.accumulate``
    the optimizer and scheduler only step when the gradients are synchronised. Returns the
    detached loss.
    """
    with accelerator.accumulate(model):
        loss = compute_loss(model, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and agc_clip_factor > 0:
            accelerator.unscale_gradients()  # AGC compares true gradient and weight norms
            adaptive_gradient_clipping_(model.parameters(), agc_clip_factor)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return loss.detach()


@dataclass
class EvaluationResult:
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate_accuracy(accelerator, model, dataloader) -> EvaluationResult:
    """Top-1 accuracy over the whole evaluation set, gathered from all processes.

    ``gather_for_metrics`` drops the samples Accelerate repeats to even out the last batch, so
    ``num_examples`` equals the size of the evaluation set.
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    count = 0
    for batch in dataloader:
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(dim=-1)
        predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += (predictions == references).sum()
        count += references.numel()
    return EvaluationResult(accuracy=correct.item() / max(count, 1), num_examples=count)


class ThroughputMeter:
    """Images per second over a sliding window of recent steps (all processes together)."""

    def __init__(self, window: int = 20):
        self.window = window
        self.samples: list = []
        self.last: Optional[float] = None

    def update(self, images: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.samples.append((images, now - self.last))
            self.samples = self.samples[-self.window :]
        self.last = now

    def restart(self) -> None:
        """Forget the pause (evaluation, checkpointing) since the last step."""
        self.last = time.perf_counter()

    @property
    def images_per_second(self) -> float:
        seconds = sum(s for _, s in self.samples)
        return sum(i for i, _ in self.samples) / seconds if seconds > 0 else 0.0


class RunningMean:
    """Exponential moving average of the training loss, for the progress bar."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.value: Optional[float] = None

    def update(self, value: float) -> float:
        self.value = value if self.value is None else self.decay * self.value + (1 - self.decay) * value
        return self.value
