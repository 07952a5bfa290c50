"""Small STANDARD transformers models trained on the embedded MNIST, the default B-cosification sources.

`default_standard_model(family)` returns a local folder holding a plain
``ResNetForImageClassification`` or ``ViTForImageClassification`` trained with cross-entropy on
the embedded MNIST training split (see `transformers_bcos.data.load_embedded_dataset`), saved with
``save_pretrained`` next to a ``ViTImageProcessor`` that normalises with MNIST's mean/std (so that
B-cosification has a normalisation to fold into the first layer). The first call trains the model
(seconds on a laptop CPU) and caches it; later calls return the cached folder.
"""

import json
import math
import os
import shutil
import tempfile
import time
from typing import Optional

import torch
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    get_scheduler,
)

from ._compat import ViTImageProcessor
from .data import load_embedded_dataset, to_rgb

CACHE_ENV_VARIABLE = "TRANSFORMERS_BCOS_CACHE"
# Written beside the model; its presence marks a complete cache entry.
TRAINING_SUMMARY_FILE = "training_summary.json"

# The grey-level mean and std of MNIST digits, repeated for the three RGB channels.
MNIST_MEAN = (0.1307, 0.1307, 0.1307)
MNIST_STD = (0.3081, 0.3081, 0.3081)

# Per family: the architecture and the plain cross-entropy recipe. Bump the version in the name
# whenever a recipe changes, so that stale caches are never reused.
STANDARD_MODEL_RECIPES = {
    "resnet": {
        "name": "mnist-resnet-standard-v1",
        "model_class": ResNetForImageClassification,
        # A 0.3M-parameter ResNet (the size of the reference measurement, §7): 28 px -> 7 px after
        # the stem, three basic stages.
        "config": lambda: ResNetConfig(
            num_channels=3, embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic"
        ),
        "epochs": 5,
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "batch_size": 64,
    },
    "vit": {
        "name": "mnist-vit-standard-v1",
        "model_class": ViTForImageClassification,
        # 16 patches of 7×7; a small ViT trained from scratch on 4,000 digits reaches ~89% (measured).
        "config": lambda: ViTConfig(
            image_size=28,
            patch_size=7,
            hidden_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=256,
        ),
        "epochs": 12,
        "learning_rate": 1e-3,
        "weight_decay": 0.05,
        "batch_size": 64,
    },
}


def default_cache_dir() -> str:
    """$TRANSFORMERS_BCOS_CACHE, else ~/.cache/transformers_bcos."""
    return os.environ.get(CACHE_ENV_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache", "transformers_bcos")


def mnist_image_processor() -> ViTImageProcessor:
    """Resize to 28×28, rescale to [0, 1], normalise with MNIST's mean/std."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": 28, "width": 28},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(MNIST_MEAN),
        image_std=list(MNIST_STD),
    )


def _preprocess(split, processor) -> tuple:
    images = [to_rgb(image) for image in split["image"]]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values, torch.tensor(split["label"], dtype=torch.long)


@torch.no_grad()
def _accuracy(model, pixel_values, labels, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(pixel_values=pixel_values[start : start + batch_size]).logits
        correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    return correct / len(labels)


def train_standard_model(family: str, output_dir: str, seed: int = 0) -> dict:
    """Train the standard ``family`` model on the embedded MNIST and save it to ``output_dir``.

    Returns the training summary (test accuracy, epochs, seconds), also written to
    ``training_summary.json``.
    """
    recipe = STANDARD_MODEL_RECIPES[family]
    # One thread: the result does not depend on the machine's thread count (which changes the
    # reduction order of matmuls), and a tiny model gains little from more threads, while
    # oversubscribed cores (training beside other work) were measured 25x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(recipe, family, output_dir, seed)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: dict, family: str, output_dir: str, seed: int) -> dict:
    data = load_embedded_dataset("mnist")
    labels = data["train"].features["label"].names
    processor = mnist_image_processor()
    train_pixels, train_labels = _preprocess(data["train"], processor)
    test_pixels, test_labels = _preprocess(data["test"], processor)

    torch.manual_seed(seed)
    config = recipe["config"]()
    config.num_labels = len(labels)
    config.id2label = {i: name for i, name in enumerate(labels)}
    config.label2id = {name: i for i, name in enumerate(labels)}
    model = recipe["model_class"](config)

    batch_size, epochs = recipe["batch_size"], recipe["epochs"]
    steps = epochs * math.ceil(len(train_labels) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train_labels), generator=generator).split(batch_size):
            loss = model(pixel_values=train_pixels[batch], labels=train_labels[batch]).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - started

    summary = {
        "family": family,
        "dataset": "embedded:mnist",
        "train_examples": len(train_labels),
        "test_examples": len(test_labels),
        "test_accuracy": _accuracy(model, test_pixels, test_labels),
        "epochs": epochs,
        "learning_rate": recipe["learning_rate"],
        "seed": seed,
        "train_seconds": round(seconds, 1),
    }
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    with open(os.path.join(output_dir, TRAINING_SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def default_standard_model(family: str = "resnet", cache_dir: Optional[str] = None) -> str:
    """The folder of a small standard model trained on the embedded MNIST (trained on first use).

    Args:
        family: "resnet" (ResNetForImageClassification, ≈98% test accuracy) or "vit"
            (ViTForImageClassification, 28 px, 7 px patches, ≈89%; a ViT trained from scratch on 4,000
            digits stays well below the CNN).
        cache_dir: where cached models live; default $TRANSFORMERS_BCOS_CACHE or
            ~/.cache/transformers_bcos. The model is ``<cache_dir>/mnist-<family>-standard-v1``.

    The folder appears atomically (trained in a temporary folder, then renamed), so a run killed
    while training never leaves a half-written model behind. Training is seeded.
    """
    if family not in STANDARD_MODEL_RECIPES:
        raise ValueError(f"Unknown model family {family!r}; available: {', '.join(STANDARD_MODEL_RECIPES)}.")
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, STANDARD_MODEL_RECIPES[family]["name"])
    if os.path.isfile(os.path.join(target, TRAINING_SUMMARY_FILE)):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=cache_dir)
    try:
        train_standard_model(family, staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its folder is complete (it was renamed into place too).
            if not os.path.isfile(os.path.join(target, TRAINING_SUMMARY_FILE)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
