"""examples/bcosify_clip.py: real two-process `accelerate launch` runs on real photos, the zero-shot
report of student and teacher, resuming mid-epoch, the exported folder, and bad input.

The data: crops of scikit-learn's two sample photos (china.jpg, flower.jpg), labelled by the
quarter of the photo they come from (8 classes), as an imagefolder with train and test splits.
The tiny CLIP is freshly initialised (not perturbed): it embeds differently coloured crops apart,
as a trained CLIP does, which is what distillation needs to show progress.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    character_tokenizer,
    clip_image_processor,
    launch_command,
    load_example_script,
    run,
    tiny_clip,
)
from PIL import Image
from safetensors.torch import load_file

from transformers_bcos.conversion.clip import bcosify_clip
from transformers_bcos.model_card import validate_model_card
from transformers_bcos.modeling_bcos_clip import BcosCLIPModel

SCRIPT = os.path.join(REPO, "examples", "bcosify_clip.py")
TRAIN_PER_CLASS, TEST_PER_CLASS = 32, 8
# 8 classes x 32 = 256 training crops; 2 processes x batch 4 = 8 per step: 32 steps per epoch.
STEPS_PER_EPOCH = 32


def write_photo_crops(root: str, crop: int = 64, seed: int = 0) -> list:
    """An imagefolder of crops of the two scikit-learn sample photos; returns the class names."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    classes = []
    for photo, name in zip(load_sample_images().images, ("china", "flower")):
        height, width, _ = photo.shape
        for row, vertical in enumerate(("top", "bottom")):
            for column, horizontal in enumerate(("left", "right")):
                label = f"{name} {vertical} {horizontal}"
                classes.append(label)
                top, left = row * height // 2, column * width // 2
                for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
                    folder = os.path.join(root, split, label)
                    os.makedirs(folder)
                    for i in range(count):
                        y = top + rng.integers(0, height // 2 - crop)
                        x = left + rng.integers(0, width // 2 - crop)
                        Image.fromarray(photo[y : y + crop, x : x + crop]).save(os.path.join(folder, f"{i}.png"))
    return classes


@pytest.fixture(scope="module")
def photo_crops(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photo_crops"))
    return root, write_photo_crops(root)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A saved tiny CLIP with its processor and tokenizer (what --model points to)."""
    folder = str(tmp_path_factory.mktemp("clip_source"))
    tokenizer = character_tokenizer(str(tmp_path_factory.mktemp("clip_vocab")))
    tiny_clip(tokenizer, perturb=False).save_pretrained(folder)
    clip_image_processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory):
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),
        "TRANSFORMERS_VERBOSITY": "error",
    }


def script_args(model: str, dataset: str, output_dir: str, *extra) -> list:
    return ["--model", model, "--dataset", dataset, "--output_dir", output_dir, "--num_train_epochs", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--checkpointing_steps", "16",
            "--keep_last_checkpoints", "10", "--prompt_templates", "a photo of the {}.", "a crop of {}.",
            "--disable_progress_bar", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, clip_folder, photo_crops, launch_env):
    """Two epochs on two processes, uninterrupted: (output folder, stdout)."""
    output_dir = str(tmp_path_factory.mktemp("runs") / "straight")
    result = run(launch_command(SCRIPT, *script_args(clip_folder, photo_crops[0], output_dir)), launch_env)
    return output_dir, result.stdout


def test_two_process_distillation_reports_zero_shot_accuracy_and_learns(straight_run, clip_folder, photo_crops):
    output_dir, stdout = straight_run
    metrics = json.loads(open(os.path.join(output_dir, "all_results.json")).read())
    assert metrics["num_processes"] == 2 and metrics["train_steps"] == 2 * STEPS_PER_EPOCH
    before, epochs = metrics["before_training"], metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and [e["step"] for e in epochs] == [32, 64]
    # Every report covers the whole evaluation set exactly once (no duplicates from the 2 shards).
    assert all(e["eval_examples"] == 8 * TEST_PER_CLASS for e in [before, *epochs])
    for entry in [before, *epochs]:
        assert 0 <= entry["student_zero_shot_accuracy"] <= 1 and 0 <= entry["teacher_zero_shot_accuracy"] <= 1
    # The teacher is frozen: its accuracy is the same in every report.
    assert len({e["teacher_zero_shot_accuracy"] for e in [before, *epochs]}) == 1
    assert "epoch 2: zero-shot accuracy student" in stdout and "teacher" in stdout

    # Distillation works: the loss falls and the student's embeddings move towards the teacher's.
    assert epochs[1]["train_loss"] < 0.97 * epochs[0]["train_loss"], epochs  # measured: 0.467 -> 0.431 (1 process)
    assert epochs[1]["student_teacher_cosine"] > before["student_teacher_cosine"] + 0.01, (before, epochs)

    # The exported model: trained image tower, text tower and logit scale exactly the source's.
    trained = BcosCLIPModel.from_pretrained(output_dir)
    converted = bcosify_clip(clip_folder)
    trained_state, converted_state = trained.state_dict(), converted.state_dict()
    assert trained_state.keys() == converted_state.keys()
    changed = {k for k in trained_state if not torch.equal(trained_state[k], converted_state[k])}
    assert changed and all(k.startswith(("vision_model.", "visual_projection.")) for k in changed), changed
    # (Equal tensors; the attention kernels of a loaded and a built model may differ in rounding.)
    tokens = trained.tokenize(["a photo of the china top left."])
    torch.testing.assert_close(trained.get_text_features(**tokens).pooler_output,
                               converted.get_text_features(**tokens).pooler_output, rtol=1e-6, atol=1e-6)  # fmt: skip


def test_exported_folder_is_a_hub_ready_zero_shot_model(straight_run, photo_crops):
    output_dir, _ = straight_run
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "tokenizer_config.json",
                 "modeling_bcos_clip.py", "README.md"):  # fmt: skip
        assert os.path.isfile(os.path.join(output_dir, name)), name
    config = json.loads(open(os.path.join(output_dir, "config.json")).read())
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_bcos_clip.BcosCLIPModel"
    card = validate_model_card(output_dir)
    metrics = json.loads(open(os.path.join(output_dir, "all_results.json")).read())
    final = f"{100 * metrics['epochs'][-1]['student_zero_shot_accuracy']:.2f}%"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert "after epoch 2 (64 steps" in card.text and final in card.text
    assert "“a photo of the {}.”, “a crop of {}.”" in card.text and "2 process(es) × 4" in card.text

    # The zero-shot pipeline of the exported folder classifies among the photo classes.
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=output_dir, trust_remote_code=True)
    root, classes = photo_crops
    image = Image.open(os.path.join(root, "test", classes[0], "0.png"))
    # A short template: the tiny text tower has 32 positions and the tokenizer one per character.
    scores = classifier(image, candidate_labels=classes, hypothesis_template="{}.")
    assert sorted(s["label"] for s in scores) == sorted(classes)
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_resumed_mid_epoch_run_ends_with_the_same_weights(straight_run, tmp_path, clip_folder, photo_crops,
                                                          launch_env):  # fmt: skip
    straight, _ = straight_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    checkpoint = os.path.join(resumed, "checkpoints", "step_00000016")  # half-way through epoch 1
    position = json.loads(open(os.path.join(checkpoint, "training_state.json")).read())
    assert position["epoch"] == 0 and not position["epoch_complete"] and position["batches_in_epoch"] == 16
    os.remove(os.path.join(resumed, "model.safetensors"))

    result = run(launch_command(SCRIPT, *script_args(clip_folder, photo_crops[0], resumed,
                                                     "--resume_from_checkpoint", checkpoint)), launch_env)  # fmt: skip
    assert f"Resumed from {checkpoint} (step 16, epoch 1)" in result.stdout
    a = load_file(os.path.join(straight, "model.safetensors"))
    b = load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed weights differ from the uninterrupted run by {worst}"
    at_checkpoint = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert max((b[k].double() - at_checkpoint["student." + k].double()).abs().max().item() for k in b) > 1e-4
    results = [json.loads(open(os.path.join(d, "all_results.json")).read()) for d in (straight, resumed)]
    assert results[0]["student_zero_shot_accuracy"] == results[1]["student_zero_shot_accuracy"]
    assert results[0]["student_teacher_cosine"] == pytest.approx(results[1]["student_teacher_cosine"], abs=1e-6)


# ------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def clip_script():
    return load_example_script("bcosify_clip")


@pytest.fixture(scope="module")
def bcos_clip_folder(tmp_path_factory, clip_folder):
    folder = str(tmp_path_factory.mktemp("bcos_clip"))
    bcosify_clip(clip_folder).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--model is required"),
        (["--model", "{resnet}"], "holds a 'resnet' model; bcosify_clip.py needs a CLIP model"),
        (["--model", "{bcos_clip}"], "is already a B-cos CLIP; distillation starts from the standard CLIP"),
        (["--model", "{clip}", "--prompt_templates", "a photo"], '--prompt_templates must be one or more templates with a "{}"'),
        (["--model", "{clip}", "--loss_scale", "0"], "--loss_scale must be a finite number > 0"),
        (["--model", "{clip}", "--dataset", "{photos}", "--image_column", "photo"], "Unknown image column 'photo'"),
        (["--model", "{clip}", "--resume_from_checkpoint", "latest"], "no checkpoint in"),
    ],
)
def test_bad_input_fails_with_one_line_before_any_work(tmp_path, capsys, clip_script, source_folders, clip_folder,
                                                       bcos_clip_folder, photo_crops, args, message):  # fmt: skip
    places = {"{resnet}": source_folders["resnet"], "{bcos_clip}": bcos_clip_folder, "{clip}": clip_folder,
              "{photos}": photo_crops[0]}  # fmt: skip
    output_dir = tmp_path / "out"
    argv = ["--output_dir", str(output_dir), *[places.get(a, a) for a in args]]
    assert clip_script.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("bcosify_clip.py: error: ") and message in lines[-1], lines[-1]
    assert not output_dir.exists()
