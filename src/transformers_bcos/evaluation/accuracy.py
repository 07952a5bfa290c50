"""Top-1 accuracy and completeness, batched over any image collection (see `batching`)."""

from typing import Optional

import torch
from tqdm.auto import tqdm

from .batching import gather_images, iterate_batches
from .classifier import PixelClassifier
from .explainers import Explainer


@torch.no_grad()
def predict_logits(classifier, images, batch_size: int = 64, progress: bool = True, image_processor=None) -> torch.Tensor:
    """(N, C) logits of ``classifier`` (a model or `PixelClassifier`) for ``images`` in [0, 1], on the CPU."""
    classifier = PixelClassifier.wrap(classifier, image_processor)
    was_training = classifier.model.training
    classifier.model.eval()
    try:
        outputs = [
            classifier(classifier.prepare(batch)).logits.float().cpu()
            for _, batch in iterate_batches(images, batch_size, progress, "logits")
        ]
    finally:
        classifier.model.train(was_training)
    return torch.cat(outputs)


def top1_accuracy(classifier, images, labels, batch_size: int = 64, progress: bool = True, image_processor=None) -> float:
    """The fraction of ``images`` whose highest logit is their label."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if len(labels) != len(images):
        raise ValueError(f"Got {len(labels)} labels for {len(images)} images.")
    if len(labels) == 0:
        raise ValueError("No images to measure accuracy on.")
    logits = predict_logits(classifier, images, batch_size, progress, image_processor)
    return (logits.argmax(1) == labels).float().mean().item()


def completeness_errors(
    explainer: Explainer, images, targets, batch_size: int = 16, progress: bool = True, indices: Optional[list] = None
) -> dict:
    """How far each attribution map's sum is from the output it explains.

    ``relative`` divides |Σ map − explained output| by max(|explained output|, Σ|map|): an absolute
    tolerance would mean little for B-cos logits that can be ~1e-3 (reference §8).
    Returns a dict of per-image tensors ``absolute`` and ``relative`` plus their max and median;
    methods that explain no output (Grad-CAM) get an empty dict.
    """
    indices = list(range(len(images))) if indices is None else list(indices)
    if not indices:
        raise ValueError("No images to measure completeness on.")
    targets = torch.as_tensor(targets).reshape(-1)
    if len(targets) != len(indices):
        raise ValueError(f"Got {len(targets)} targets for {len(indices)} images.")
    absolute, relative = [], []
    for start in tqdm(range(0, len(indices), batch_size), desc="completeness", disable=not progress, leave=False):
        chunk = indices[start : start + batch_size]
        attribution = explainer.explain(gather_images(images, chunk), targets[start : start + len(chunk)])
        if attribution.explained_output is None:
            return {}
        maps = attribution.maps.double().flatten(1)
        output = attribution.explained_output.double()
        error = (maps.sum(1) - output).abs()
        scale = torch.maximum(output.abs(), maps.abs().sum(1)).clamp_min(torch.finfo(torch.float64).tiny)
        absolute.append(error.cpu())
        relative.append((error / scale).cpu())
    absolute, relative = torch.cat(absolute), torch.cat(relative)
    return {
        "absolute": absolute,
        "relative": relative,
        "max_absolute": absolute.max().item(),
        "max_relative": relative.max().item(),
        "median_relative": relative.median().item(),
    }
