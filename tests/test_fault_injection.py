"""Fault injection (issue 16): broken checkpoints, bad options, corrupt data, diverging and
competing runs, odd images. Each fault is answered by one line and a non-zero exit (the
`transformers-bcos` command and examples/finetune.py) or a clear exception (the API), before
any work and with nothing written.

The kill-and-resume test (identical weights after a SIGKILL) is
tests/test_finetune_launch.py::test_killed_run_resumes_mid_epoch_to_the_same_weights.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, load_example_script, run_without_package
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import pipeline

from transformers_bcos import bcosify_pretrained
from transformers_bcos.cli import main as cli_main
from transformers_bcos.cli import read_image
from transformers_bcos.data import ImageClassificationDataset, load_image_classification_data
from transformers_bcos.modeling_bcos import BcosForImageClassification, CheckpointWeightsError
from transformers_bcos.pipeline_bcos import load_rgb_image, to_rgb
from transformers_bcos.training.run import LOCK_FILE, RUN_OPTIONS_FILE

# ----------------------------------------------------------------------------------------------
# Broken B-cos checkpoints
# ----------------------------------------------------------------------------------------------


def _copy(source, folder):
    shutil.copytree(source, folder)
    return folder


def _rewrite_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    weights = edit(dict(load_file(path)))
    save_file(weights, path, metadata={"format": "pt"})


# The ResNet's classification head: transformers' ResNetForImageClassification.classifier[1].
HEAD_WEIGHT = "backbone.model.classifier.1.weight"


def _missing_one(folder, good):
    _rewrite_weights(_copy(good, folder), lambda w: {k: v for k, v in w.items() if k != HEAD_WEIGHT})


def _hand_written_layout(folder, good):
    """The keys of the hand-written ResNet backbone of transformers-bcos before it classified with
    transformers' own head: ``classifier.weight`` beside ``backbone.*``."""
    _rewrite_weights(_copy(good, folder), lambda w: {("classifier.weight" if k == HEAD_WEIGHT else k): v for k, v in w.items()})


def _missing_half(folder, good):
    _rewrite_weights(_copy(good, folder), lambda w: dict(sorted(w.items())[::2]))


def _renamed(folder, good):
    _rewrite_weights(_copy(good, folder), lambda w: {k.replace("backbone.", "model.", 1): v for k, v in w.items()})


def _another_backbone(folder, good, vit):
    _copy(good, folder)
    shutil.copy(os.path.join(vit, "config.json"), os.path.join(folder, "config.json"))


def _other_num_labels(folder, good):
    _copy(good, folder)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["id2label"] = {str(i): f"c{i}" for i in range(7)}
    config["label2id"] = {f"c{i}": i for i in range(7)}
    json.dump(config, open(path, "w"))


def _truncated(folder, good):
    _copy(good, folder)
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _empty(folder, good):
    _copy(good, folder)
    open(os.path.join(folder, "model.safetensors"), "wb").close()


def _header_only(folder, good):
    _copy(good, folder)
    save_file({}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _pickle_only(folder, good):
    _copy(good, folder)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    # An object torch.load(weights_only=True) refuses, as a malicious pickle would be.
    torch.save({**weights, "options": argparse.Namespace(payload=1)}, os.path.join(folder, "pytorch_model.bin"))


def _no_config(folder, good):
    _copy(good, folder)
    os.remove(os.path.join(folder, "config.json"))


# case -> (how to break a copy of the good folder, exception type, words the message holds)
BROKEN_CHECKPOINTS = {
    "a missing tensor": (_missing_one, CheckpointWeightsError, [f"missing {HEAD_WEIGHT}"]),
    "a hand-written backbone's layout": (_hand_written_layout, CheckpointWeightsError, ["hand-written", "trust_remote_code=True", "bcosify_pretrained"]),
    "half the tensors missing": (_missing_half, CheckpointWeightsError, ["missing ", " more"]),
    "renamed keys": (_renamed, CheckpointWeightsError, ["missing backbone.", "unexpected model."]),
    "config of another backbone": (_another_backbone, CheckpointWeightsError, ["vit", "missing ", "unexpected "]),
    "another number of labels": (_other_num_labels, CheckpointWeightsError, [f"{HEAD_WEIGHT} (5, 16) (model: (7, 16))"]),
    "truncated model.safetensors": (_truncated, OSError, ["model.safetensors cannot be read"]),
    "empty model.safetensors": (_empty, OSError, ["model.safetensors cannot be read"]),
    "header-only model.safetensors": (_header_only, CheckpointWeightsError, ["missing "]),
    "pickle-only folder": (_pickle_only, OSError, ["were refused", "weights_only"]),
    "no config.json": (_no_config, OSError, ["no config.json"]),
}


@pytest.fixture(scope="module")
def good_checkpoints(source_folders, tmp_path_factory):
    """Saved B-cos ResNet and ViT folders, as `transformers-bcos convert` writes them."""
    folders = {}
    for family in ("resnet", "vit"):
        folder = str(tmp_path_factory.mktemp(f"good_{family}"))
        bcosify_pretrained(source_folders[family]).save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def broken_checkpoints(good_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    folders = {}
    for case, (breaks, _, _) in BROKEN_CHECKPOINTS.items():
        folder = str(root / case.replace(" ", "_"))
        if breaks is _another_backbone:
            breaks(folder, good_checkpoints["resnet"], good_checkpoints["vit"])
        else:
            breaks(folder, good_checkpoints["resnet"])
        folders[case] = folder
    return folders


def test_every_saved_bcos_model_loads_without_complaint(source_folders, good_checkpoints, tmp_path):
    """No false alarm: tied and non-persistent buffers do not count as missing, in any family or CLIP."""
    for family, source in source_folders.items():
        folder = tmp_path / family
        bcosify_pretrained(source).save_pretrained(folder)
        model, info = BcosForImageClassification.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (family, info)
    from test_clip import character_tokenizer, clip_image_processor, tiny_clip

    from transformers_bcos import BcosCLIPModel, bcosify_clip

    tokenizer = character_tokenizer(tmp_path / "vocab")
    bcosify_clip(tiny_clip(tokenizer), image_processor=clip_image_processor(), tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    _, info = BcosCLIPModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_a_broken_checkpoint_is_an_error_naming_the_problem(case, broken_checkpoints):
    _, error_type, words = BROKEN_CHECKPOINTS[case]
    with pytest.raises(error_type) as raised:
        BcosForImageClassification.from_pretrained(broken_checkpoints[case])
    message = str(raised.value)
    assert broken_checkpoints[case] in message
    for word in words:
        assert word in message, message


def test_a_shape_mismatch_is_replaced_only_when_asked(broken_checkpoints):
    model = BcosForImageClassification.from_pretrained(
        broken_checkpoints["another number of labels"], ignore_mismatched_sizes=True
    )
    assert model.get_parameter(HEAD_WEIGHT).shape == (7, 16)


def test_broken_weights_are_refused_without_the_package_too(broken_checkpoints):
    """The check lives in the travelling modeling file: trust_remote_code users get it as well."""
    output = run_without_package(
        f"""
        from transformers import AutoModelForImageClassification
        try:
            AutoModelForImageClassification.from_pretrained({broken_checkpoints["a missing tensor"]!r}, trust_remote_code=True)
        except ValueError as error:
            print(type(error).__name__, error)
        """
    )
    assert output.startswith("CheckpointWeightsError") and f"missing {HEAD_WEIGHT}" in output


# ----------------------------------------------------------------------------------------------
# The command line: one line, non-zero exit, nothing written
# ----------------------------------------------------------------------------------------------


def run_cli(capsys, *args):
    try:
        code = cli_main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code, err, *words):
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory, mnist_images):
    path = tmp_path_factory.mktemp("digit") / "digit.png"
    Image.fromarray((mnist_images[0][0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return str(path)


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_explain_with_a_broken_checkpoint_fails_in_one_line(case, broken_checkpoints, digit_png, tmp_path, capsys):
    code, out, err = run_cli(capsys, "explain", broken_checkpoints[case], digit_png, "--out", tmp_path / "out")
    assert_one_line(code, err, broken_checkpoints[case])
    assert not (tmp_path / "out").exists()


def test_convert_of_a_truncated_source_fails_in_one_line(source_folders, tmp_path, capsys):
    source = _copy(source_folders["resnet"], str(tmp_path / "source"))
    path = os.path.join(source, "model.safetensors")
    open(path, "wb").write(open(path, "rb").read()[:100])
    code, _, err = run_cli(capsys, "convert", source, tmp_path / "out")
    assert_one_line(code, err, "model.safetensors cannot be read")
    assert not (tmp_path / "out").exists()


def test_explain_does_not_replace_a_png_unless_asked(good_checkpoints, digit_png, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "digit.png").write_bytes(b"an earlier explanation")
    code, _, err = run_cli(capsys, "explain", good_checkpoints["resnet"], digit_png, "--out", out)
    assert_one_line(code, err, "digit.png exists", "--overwrite")
    assert (out / "digit.png").read_bytes() == b"an earlier explanation"
    code, _, _ = run_cli(capsys, "explain", good_checkpoints["resnet"], digit_png, "--out", out, "--overwrite")
    assert code == 0 and Image.open(out / "digit.png").format == "PNG"


def test_a_word_starting_with_a_dash_is_explained(good_checkpoints, capsys):
    code, _, err = run_cli(capsys, "push", good_checkpoints["resnet"], "-org/model", "--dry-run")
    assert code == 2
    assert_one_line(code, err, "'-org/model' is read as an option", "Hub ids never start with '-'")


# ----------------------------------------------------------------------------------------------
# Images: one loader for the command line, the pipeline and training
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Files whose pixels PIL's own RGB conversion gets wrong, and the grey levels they hold."""
    folder = tmp_path_factory.mktemp("odd_images")
    ramp = np.linspace(0, 1, 16)[None, :].repeat(8, axis=0)
    expected = np.round(ramp * 255)
    Image.fromarray(ramp.astype(np.float32), mode="F").save(folder / "float.tiff")
    Image.fromarray((ramp * 65535).round().astype(np.int32), mode="I").save(folder / "int32.tiff")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(folder / "sixteen.png")
    # An upright 16x8 picture stored as 8x16 with EXIF orientation 6 ("rotate 90° clockwise to view").
    upright = np.zeros((8, 16, 3), np.uint8)
    upright[:, :8, 0] = 255  # red left half
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(folder / "rotated.png", exif=exif.tobytes())
    return folder, expected, upright


def test_one_loader_reads_float_32_bit_16_bit_and_rotated_images_right(odd_images):
    folder, expected, upright = odd_images
    for name in ("float.tiff", "int32.tiff", "sixteen.png"):
        plain = np.asarray(Image.open(folder / name).convert("RGB"))[..., 0].astype(int)
        assert np.abs(plain - expected).max() > 100, name  # PIL's own conversion: black or white
        grey = np.asarray(load_rgb_image(str(folder / name)))
        assert grey.shape == (8, 16, 3)
        assert np.abs(grey[..., 0].astype(int) - expected).max() <= 1, name
    assert np.array_equal(np.asarray(load_rgb_image(str(folder / "rotated.png"))), upright)


def test_cli_pipeline_and_training_see_the_same_pixels(odd_images, tmp_path):
    folder, _, _ = odd_images
    names = ["float.tiff", "int32.tiff", "sixteen.png", "rotated.png"]
    for i, name in enumerate(names):
        class_dir = tmp_path / "data" / "ab"[i % 2]
        class_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / name, class_dir / name)
    data = load_image_classification_data(str(tmp_path / "data"), eval_split="train")
    dataset = ImageClassificationDataset(data.train, data.image_column, data.label_column)
    paths = data.train.cast_column(data.image_column, datasets.Image(decode=False))[data.image_column]
    by_name = {os.path.basename(paths[i]["path"]): dataset[i]["image"] for i in range(len(dataset))}
    for name in names:
        from_cli = np.asarray(read_image(str(folder / name)))
        assert np.array_equal(from_cli, np.asarray(by_name[name])), name
        assert np.array_equal(from_cli, np.asarray(load_rgb_image(str(folder / name)))), name


def test_the_pipeline_explains_the_upright_image(good_checkpoints, odd_images):
    folder, _, upright = odd_images
    explain = pipeline("image-explanation", model=good_checkpoints["resnet"], trust_remote_code=True)
    from_file = explain(str(folder / "rotated.png"))
    from_upright = explain(Image.fromarray(upright))
    np.testing.assert_array_equal(from_file["contributions"], from_upright["contributions"])
    with pytest.raises(ValueError, match="No images given"):
        explain([])
    with pytest.raises(ValueError, match="no pixels"):
        explain(Image.new("RGB", (0, 0)))


def test_an_image_without_pixels_is_refused():
    with pytest.raises(ValueError, match="no pixels"):
        to_rgb(Image.new("L", (0, 5)))


@pytest.fixture(scope="module")
def resnet(good_checkpoints):
    return BcosForImageClassification.from_pretrained(good_checkpoints["resnet"]).eval()


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([0, 5]), r"class indices in \[0, 5\]; this model has 5 classes"),
        (torch.tensor([-1, 0]), r"class indices in \[-1, 0\]"),
        (torch.tensor([0, 1, 2]), "3 class indices for a batch of 2"),
        (torch.tensor([0.0, 1.0]), "integer class indices of shape"),
        (torch.zeros(2, 3), r"shape \(2, 5\)"),
        (torch.full((2, 5), 2.0), r"lie in \[0, 1\]"),
        ([0, 1], "must be a torch.Tensor"),
    ],
)
def test_bad_labels_are_named(resnet, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        resnet(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=labels)


def test_empty_and_negative_inputs_are_named(resnet):
    with pytest.raises(ValueError, match="holds no pixels"):
        resnet(torch.rand(0, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match="holds no pixels"):
        resnet(torch.rand(1, 3, 0, 0))
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="encoded_pixel_values must be non-negative"):
        resnet(encoded_pixel_values=torch.cat([x, 1 - x]).view(1, 6, IMAGE_SIZE, IMAGE_SIZE) - 0.5)
    resnet(encoded_pixel_values=3 * torch.cat([x, 1 - x], dim=1))  # a positive multiple stays allowed


# ----------------------------------------------------------------------------------------------
# examples/finetune.py
# ----------------------------------------------------------------------------------------------

TINY_RUN = ["--max_train_samples", "40", "--max_eval_samples", "20", "--per_device_train_batch_size", "8",
            "--num_train_epochs", "1", "--disable_progress_bar"]  # fmt: skip


@pytest.fixture(scope="module")
def finetune():
    return load_example_script("finetune")


def run_finetune(finetune, capsys, *args):
    code = finetune.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_finetune_error(code, err, *words, exit_code=2):
    assert code == exit_code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("finetune.py: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in last, last


@pytest.fixture()
def no_training_cache(tmp_path, monkeypatch):
    """An empty cache: a run that got as far as training the default model would fill it."""
    monkeypatch.setenv("TRANSFORMERS_BCOS_CACHE", str(tmp_path / "no_cache"))
    return tmp_path / "no_cache"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--learning_rate", "nan"], ["--learning_rate must be a finite number > 0, got nan"]),
        (["--learning_rate", "inf"], ["--learning_rate must be a finite number > 0, got inf"]),
        (["--weight_decay", "nan"], ["--weight_decay must be a finite number >= 0, got nan"]),
        (["--agc_clip_factor", "nan"], ["--agc_clip_factor must be a finite number >= 0, got nan"]),
        (["--b", "nan"], ["--b must be a finite number > 0, got nan"]),
        (["--augment_min_scale", "nan"], ["--augment_min_scale must be in (0, 1]"]),
    ],
)
def test_non_finite_options_are_refused(args, words, finetune, capsys, tmp_path, no_training_cache):
    code, _, err = run_finetune(finetune, capsys, "--output_dir", tmp_path / "out", *args)
    assert_finetune_error(code, err, *words)
    assert not (tmp_path / "out").exists() and not no_training_cache.exists()


def test_unusable_output_dirs_are_refused_before_work(finetune, capsys, tmp_path, no_training_cache):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = run_finetune(finetune, capsys, "--output_dir", a_file)
    assert_finetune_error(code, err, f"--output_dir {a_file} is a file")
    code, _, err = run_finetune(finetune, capsys, "--output_dir", a_file / "out")
    assert_finetune_error(code, err, f"{a_file} is a file")
    assert a_file.read_text() == "x" and not no_training_cache.exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused_before_work(finetune, capsys, tmp_path, no_training_cache):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_finetune(finetune, capsys, "--output_dir", locked / "out")
    assert_finetune_error(code, err, "is not writable")


def test_a_bad_from_scratch_config_is_named(finetune, capsys, tmp_path, no_training_cache):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "resnet", ')
    code, _, err = run_finetune(finetune, capsys, "--output_dir", tmp_path / "out", "--from_scratch", config)
    assert_finetune_error(code, err, f"--from_scratch {config} is not valid JSON")
    config.write_text("[1, 2]")
    code, _, err = run_finetune(finetune, capsys, "--output_dir", tmp_path / "out", "--from_scratch", config)
    assert_finetune_error(code, err, "holds a JSON list")
    config.write_text('{"model_type": "bert"}')  # a transformers model, but no image classifier
    code, _, err = run_finetune(finetune, capsys, "--output_dir", tmp_path / "out", "--from_scratch", config)
    assert_finetune_error(code, err, f"--from_scratch {config}: Unsupported backbone 'bert'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["truncated model.safetensors", "empty model.safetensors", "no config.json"])
def test_a_broken_model_folder_is_refused_before_work(case, broken_checkpoints, finetune, capsys, tmp_path):
    code, _, err = run_finetune(finetune, capsys, "--model", broken_checkpoints[case], "--output_dir", tmp_path / "out", *TINY_RUN)
    assert_finetune_error(code, err, f"--model {broken_checkpoints[case]}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["a missing tensor", "another number of labels", "pickle-only folder", "renamed keys"])
def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_nothing(case, broken_checkpoints, finetune, capsys, tmp_path):
    """Reported before the data is opened: the (missing) data set would be the next error."""
    code, _, err = run_finetune(finetune, capsys, "--model", broken_checkpoints[case], "--output_dir", tmp_path / "out",
                                "--dataset", tmp_path / "no_such_data", *TINY_RUN)
    assert_finetune_error(code, err, f"Cannot load the model {broken_checkpoints[case]}")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def digits_with_a_corrupt_image(tmp_path_factory, mnist_images):
    folder = tmp_path_factory.mktemp("corrupt_data")
    images, labels = mnist_images
    for i, (image, label) in enumerate(zip(images, labels)):
        class_dir = folder / "train" / str(int(label))
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(class_dir / f"{i}.png")
    (folder / "train" / str(int(labels[0])) / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return folder


def test_a_corrupt_training_image_is_found_before_training(digits_with_a_corrupt_image, tiny_standard_resnet, finetune,
                                                           capsys, tmp_path):
    args = ["--model", tiny_standard_resnet, "--dataset", digits_with_a_corrupt_image, "--eval_split", "train",
            "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--disable_progress_bar"]  # fmt: skip
    code, _, err = run_finetune(finetune, capsys, *args, "--output_dir", tmp_path / "refused")
    assert_finetune_error(code, err, "unreadable image(s)", "broken.png", "--skip_unreadable_images")
    assert not (tmp_path / "refused").exists()

    code, out, err = run_finetune(finetune, capsys, *args, "--output_dir", tmp_path / "skipped", "--skip_unreadable_images")
    assert code == 0, err
    assert "Left out 2 unreadable image(s)" in out and "broken.png" in out  # in the train and the eval split
    assert (tmp_path / "skipped" / "model.safetensors").exists()


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tiny_standard_resnet, finetune, capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_finetune(finetune, capsys, "--model", tiny_standard_resnet, "--output_dir", out, *TINY_RUN,
                                "--learning_rate", "1e6", "--agc_clip_factor", "0", "--checkpointing_steps", "1")
    assert_finetune_error(code, err, "diverged", exit_code=1)
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert f"the last good checkpoint is {out / 'checkpoints' / latest}" in err
    checkpoints = [name for name in os.listdir(out / "checkpoints") if name != "latest"]
    assert checkpoints  # this run diverges after its first steps, so there is a good one to keep
    for name in checkpoints:
        weights = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), name
    assert not (out / LOCK_FILE).exists()


def test_a_second_run_on_a_busy_output_dir_is_refused(tiny_standard_resnet, finetune, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the first run's model")
    (out / LOCK_FILE).write_text(f"{os.getppid()} {os.uname().nodename}\n")  # a live process holds it
    code, _, err = run_finetune(finetune, capsys, "--model", tiny_standard_resnet, "--output_dir", out, *TINY_RUN,
                                "--overwrite_output_dir")
    assert_finetune_error(code, err, "is in use by another run", f"PID {os.getppid()}")
    assert (out / "model.safetensors").read_text() == "the first run's model"
    assert (out / LOCK_FILE).exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(tiny_standard_resnet, finetune, capsys, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{dead.pid} {os.uname().nodename}\n")
    code, _, err = run_finetune(finetune, capsys, "--model", tiny_standard_resnet, "--output_dir", out, *TINY_RUN)
    assert code == 0, err
    assert (out / "model.safetensors").exists() and not (out / LOCK_FILE).exists()


@pytest.fixture(scope="module")
def checkpointed_run(tiny_standard_resnet, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    args = ["--model", tiny_standard_resnet, "--output_dir", str(out), *TINY_RUN, "--checkpointing_steps", "2",
            "--keep_last_checkpoints", "5"]  # fmt: skip
    assert load_example_script("finetune").main(args) == 0
    return out, args


def test_resuming_with_other_options_is_refused(checkpointed_run, finetune, capsys, tmp_path):
    out, args = checkpointed_run
    recorded = (out / RUN_OPTIONS_FILE).read_text()
    changed = [a if a != "8" else "4" for a in args]  # the batch size
    code, _, err = run_finetune(finetune, capsys, *changed, "--resume_from_checkpoint", "latest", "--dataset", "embedded:mnist")
    assert_finetune_error(code, err, "--per_device_train_batch_size 8 -> 4", "--dataset None -> 'embedded:mnist'")
    assert (out / RUN_OPTIONS_FILE).read_text() == recorded


def test_resuming_from_a_truncated_checkpoint_is_refused_before_work(checkpointed_run, finetune, capsys, tmp_path):
    out, args = checkpointed_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    args = [str(copy) if a == str(out) else a for a in args]
    for name in ("model.safetensors", "optimizer.bin"):
        path = copy / "checkpoints" / "step_00000002" / name
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2])
        code, _, err = run_finetune(finetune, capsys, *args, "--resume_from_checkpoint", copy / "checkpoints" / "step_00000002")
        assert_finetune_error(code, err, f"Checkpoint file {path} is truncated or corrupt")
        path.write_bytes(original)


def test_a_refused_rng_state_is_reported_on_resume(checkpointed_run, finetune, capsys, tmp_path):
    out, args = checkpointed_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    args = [str(copy) if a == str(out) else a for a in args]
    rng_file = copy / "checkpoints" / "step_00000002" / "random_states_0.pkl"
    torch.save({"random_state": argparse.Namespace()}, rng_file)  # refused by torch.load(weights_only=True)
    code, out_text, err = run_finetune(finetune, capsys, *args, "--resume_from_checkpoint", copy / "checkpoints" / "step_00000002")
    assert code == 0, err
    assert f"warning: resumed from {copy / 'checkpoints' / 'step_00000002'} without the random-number-generator state" in err
    results = json.loads((copy / "all_results.json").read_text())
    assert "random_states_0.pkl" in results["resumed_without"][0]


@pytest.mark.slow
def test_two_runs_started_together_leave_one_consistent_folder(tiny_standard_resnet, tmp_path):
    """Without the lock, both checked the empty folder, both finished with exit 0, and the folder
    mixed one run's model with the other's run_options.json. Now one run works in the folder and
    the other is refused: by the lock while the first runs, or as "already holds files" after."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "finetune.py")
    runs = [
        subprocess.Popen([sys.executable, script, "--model", tiny_standard_resnet, "--output_dir", str(out), *TINY_RUN,
                          "--seed", str(seed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]  # fmt: skip
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = [seed for seed, (code, _) in zip((1, 2), results) if code == 0][0]
    refusal = [err for code, err in results if code == 2][0].strip().splitlines()[-1]
    assert "is in use by another run" in refusal or "already holds files" in refusal, refusal
    assert json.loads((out / RUN_OPTIONS_FILE).read_text())["seed"] == winner
    assert (out / "model.safetensors").exists() and not (out / LOCK_FILE).exists()
