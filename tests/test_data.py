"""Data loading (embedded MNIST, imagefolder, Hub ids), image modes, augmentation, default models."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image
from PIL import Image as PILImage

from transformers_bcos.data import (
    DatasetError,
    ImageClassificationDataset,
    ImageProcessorCollator,
    image_processor_from_dict,
    load_embedded_dataset,
    load_image_classification_data,
    random_resized_crop,
    to_rgb,
)
from transformers_bcos.defaults import TRAINING_SUMMARY_FILE, default_standard_model

UNNORMALISED_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 20, "width": 20},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": False,
}


@pytest.fixture(scope="module")
def embedded():
    return load_embedded_dataset()


def _digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


def test_embedded_mnist_is_a_stratified_real_split(embedded):
    train, test = embedded["train"], embedded["test"]
    assert (len(train), len(test)) == (4000, 1000)
    assert train.features["label"].names == [str(d) for d in range(10)]
    assert isinstance(train.features["image"], Image)
    assert np.bincount(train["label"]).tolist() == [400] * 10
    assert np.bincount(test["label"]).tolist() == [100] * 10
    image = train[0]["image"]
    assert image.mode == "RGB" and image.size == (28, 28)
    # Real digits: mostly black background with bright strokes, not noise.
    pixels = np.asarray(image)
    assert (pixels == 0).mean() > 0.5 and pixels.max() > 200
    train_digests = {_digest(row["image"]) for row in train}
    assert not train_digests & {_digest(row["image"]) for row in test}


def test_embedded_mnist_is_deterministic(embedded):
    again = load_embedded_dataset()
    assert again["test"]["label"] == embedded["test"]["label"]
    assert _digest(again["train"][123]["image"]) == _digest(embedded["train"][123]["image"])


def test_default_loader_uses_the_fixed_embedded_split_whatever_the_seed(embedded):
    # The default standard models are trained on the seed-0 train split: the test split must not
    # change with the fine-tuning seed, or it would leak training images.
    data = load_image_classification_data(None, seed=7)
    assert (len(data.train), len(data.eval)) == (4000, 1000)
    assert data.labels == [str(d) for d in range(10)]
    assert (data.image_column, data.label_column) == ("image", "label")
    assert sorted(_digest(r["image"]) for r in data.eval) == sorted(_digest(r["image"]) for r in embedded["test"])


def _save_image(path, mode, size=(24, 20), value=128):
    image = PILImage.new("RGB", size, (value, 255 - value, value // 2)).convert(mode)
    image.save(path)


@pytest.fixture()
def mixed_mode_folder(tmp_path):
    """An imagefolder with L, RGBA, CMYK (JPEG), P (with transparency), LA and 16-bit images of mixed sizes."""
    root = tmp_path / "images"
    for label, value in (("cat", 40), ("dog", 200)):
        folder = root / label
        folder.mkdir(parents=True)
        _save_image(folder / "grey.png", "L", value=value)
        _save_image(folder / "alpha.png", "RGBA", size=(30, 16), value=value)
        _save_image(folder / "cmyk.jpg", "CMYK", value=value)
        _save_image(folder / "grey_alpha.png", "LA", size=(12, 12), value=value)
        palette = PILImage.new("RGB", (16, 16), (value, 0, 0)).convert("P")
        palette.info["transparency"] = 0
        palette.save(folder / "palette.png", transparency=0)
        PILImage.fromarray(np.full((10, 14), value * 256, dtype=np.uint16)).save(folder / "deep.png")
    return root


def test_imagefolder_with_mixed_modes_converts_to_rgb(mixed_mode_folder):
    data = load_image_classification_data(str(mixed_mode_folder), eval_fraction=0.5, seed=0)
    assert data.labels == ["cat", "dog"]
    assert len(data.train) + len(data.eval) == 12
    modes = {row["image"].mode for split in (data.train, data.eval) for row in split}
    assert {"L", "RGBA", "CMYK", "P", "LA", "I;16"} <= modes
    collate = ImageProcessorCollator(image_processor_from_dict(UNNORMALISED_PROCESSOR))
    for split in (data.train, data.eval):
        dataset = ImageClassificationDataset(split, data.image_column, data.label_column, augment=True)
        batch = collate([dataset[i] for i in range(len(dataset))])
        assert batch["pixel_values"].shape == (len(split), 3, 20, 20)
        assert batch["pixel_values"].min() >= 0 and batch["pixel_values"].max() <= 1
        assert batch["labels"].tolist() == split["label"]


def test_to_rgb_rescales_16_bit_images_instead_of_clipping():
    deep = PILImage.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 128, 255]
    grey = PILImage.new("L", (2, 2), 77)
    assert np.asarray(to_rgb(grey)).tolist() == [[[77, 77, 77]] * 2] * 2


def test_string_labels_become_a_classlabel_shared_by_the_splits(tmp_path):
    images = [PILImage.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(6)]
    splits = DatasetDict(
        {
            "train": Dataset.from_dict({"img": images[:4], "kind": ["b", "a", "c", "a"]}).cast_column("img", Image()),
            "validation": Dataset.from_dict({"img": images[4:], "kind": ["c", "b"]}).cast_column("img", Image()),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    data = load_image_classification_data(str(tmp_path / "saved"), label_column="kind")
    assert data.image_column == "img" and data.labels == ["a", "b", "c"]
    assert isinstance(data.eval.features["kind"], ClassLabel)
    assert data.eval["kind"] == [2, 1]


def test_unknown_dataset_gives_one_clear_line():
    with pytest.raises(DatasetError, match=r"Unknown dataset 'no-such-org/no-such-dataset'.*embedded:mnist") as error:
        load_image_classification_data("no-such-org/no-such-dataset")
    assert "\n" not in str(error.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_classification_data("./no/such/folder")
    with pytest.raises(DatasetError, match="Unknown embedded data set 'fashion'"):
        load_image_classification_data("embedded:fashion")


def test_unknown_columns_and_splits_are_named():
    with pytest.raises(DatasetError, match="Unknown image column 'photo'; the data set has columns: image, label"):
        load_image_classification_data(image_column="photo")
    with pytest.raises(DatasetError, match="Unknown label column 'digit'"):
        load_image_classification_data(label_column="digit")
    with pytest.raises(DatasetError, match="No split 'validation'.*train, test"):
        load_image_classification_data(eval_split="validation")


def test_missing_label_column_is_reported(tmp_path):
    # An imagefolder without class subfolders has no labels.
    for i in range(3):
        _save_image(tmp_path / f"{i}.png", "RGB")
    with pytest.raises(DatasetError, match="No label column found among the columns image"):
        load_image_classification_data(str(tmp_path))


def test_random_resized_crop_is_reproducible_per_epoch_and_index():
    image = PILImage.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    crop = lambda *seed: np.asarray(random_resized_crop(image, np.random.default_rng(seed), scale=(0.1, 0.5)))  # noqa: E731
    assert crop(0, 1, 5).shape == (32, 32, 3)
    assert np.array_equal(crop(0, 1, 5), crop(0, 1, 5))
    assert not np.array_equal(crop(0, 1, 5), crop(0, 2, 5))
    assert not np.array_equal(crop(0, 1, 5), np.asarray(image))


def test_augmentation_depends_on_epoch_not_on_call_order(embedded):
    dataset = ImageClassificationDataset(embedded["train"].select(range(4)), "image", "label", augment=True, seed=3)
    dataset.set_epoch(1)
    first = [np.asarray(dataset[i]["image"]) for i in (2, 0)]
    assert np.array_equal(np.asarray(dataset[2]["image"]), first[0])  # same (epoch, index), same crop
    dataset.set_epoch(2)
    assert any(not np.array_equal(np.asarray(dataset[i]["image"]), first[k]) for k, i in enumerate((2, 0)))
    plain = ImageClassificationDataset(embedded["train"].select(range(4)), "image", "label")
    assert np.array_equal(np.asarray(plain[1]["image"]), np.asarray(embedded["train"][1]["image"]))


@pytest.mark.slow
def test_default_standard_model_is_a_trained_cached_standard_model(bcos_cache_dir, embedded):
    from transformers import ResNetForImageClassification

    from transformers_bcos._compat import AutoImageProcessor

    folder = default_standard_model("resnet", cache_dir=bcos_cache_dir)
    assert os.path.basename(folder) == "mnist-resnet-standard-v1"
    assert sorted(os.listdir(folder)) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json", TRAINING_SUMMARY_FILE]
    )
    model = ResNetForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.do_normalize and processor.image_mean[0] == pytest.approx(0.1307)
    assert model.config.id2label == {i: str(i) for i in range(10)}
    # Measure the accuracy here, on the unseen test split, rather than trusting the summary.
    test = embedded["test"]
    pixel_values = processor(images=list(test["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predictions = model(pixel_values=pixel_values).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(test["label"])).float().mean().item()
    with open(os.path.join(folder, TRAINING_SUMMARY_FILE)) as f:
        assert json.load(f)["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.95
    # Cached: a second call returns the same folder without training again.
    stamp = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert default_standard_model("resnet", cache_dir=bcos_cache_dir) == folder
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == stamp


def test_a_half_written_cache_entry_is_never_used(tmp_path, monkeypatch):
    import transformers_bcos.defaults as defaults

    def killed_while_training(family, output_dir, seed=0):
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            f.write("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(defaults, "train_standard_model", killed_while_training)
    with pytest.raises(KeyboardInterrupt):
        defaults.default_standard_model("vit", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # neither the model folder nor the staging folder remains
    with pytest.raises(ValueError, match="Unknown model family 'vgg'"):
        defaults.default_standard_model("vgg", cache_dir=str(tmp_path))


def test_too_few_images_to_hold_out_an_evaluation_set_is_a_data_set_error(tmp_path):
    image = PILImage.new("RGB", (8, 8))
    folder = str(tmp_path / "four")
    Dataset.from_dict({"image": [image] * 4, "label": [0, 1, 0, 1]}).cast_column("image", Image()).save_to_disk(folder)
    with pytest.raises(DatasetError, match="Cannot hold out 15% of the 4 training images for evaluation.*--eval_split"):
        load_image_classification_data(folder)
