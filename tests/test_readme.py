"""Every code block of README.md, in order, as a user would run it (offline).

What each block gets:

* Python blocks run as written, each in a fresh namespace (so each must define what it uses), in
  one temporary folder holding a copy of docs/images/digits, with the Hub ids replaced by tiny
  local models of the same family saved with their image processor (and tokenizer, for CLIP), as
  the README says to do offline.
* ``text`` blocks are synopses with placeholders (``SRC``, ``[flags]``): not run.
* Bash blocks, command by command (``&&`` chains split, ``VAR=value`` prefixes dropped):
  - ``pip install``: not run (no network); the extras it names must exist in setup.py.
  - ``python -m pytest``: not run (it is this suite).
  - ``python examples/demo.py``: run as written in the temporary folder (1 epoch on the embedded
    MNIST, on the session's cached source); other ``python examples/X.py ...`` lines and every
    ``accelerate launch`` line (GPUs, several machines, minutes to days): their arguments are
    parsed by accelerate's launch parser and by the script's own parser, nothing more.
  - ``transformers-bcos ...``: run in the temporary folder, except that the tour's model
    ``outputs/bcos-mnist`` (the output of its finetune.py line, which is only parsed) is the cached
    standard MNIST ResNet converted, not fine-tuned; ``~/.cache/transformers_bcos`` is the session's
    cache.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, character_tokenizer, clip_image_processor, load_example_script, tiny_clip

README = os.path.join(REPO, "README.md")
HUB_FAMILIES = {"google/vit-base-patch16-224": "vit", "microsoft/resnet-50": "resnet", "openai/clip-vit-base-patch32": "clip"}


def readme_blocks() -> list:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```(\w+)\n(.*?)^```", f.read(), flags=re.S | re.M)


def bash_commands(block: str) -> list:
    """The commands of a bash block: continuations joined, comments dropped, && chains split."""
    text = block.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        for command in line.split("&&"):
            words = shlex.split(os.path.expandvars(command.strip()))
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            commands.append(words)
    return commands


@pytest.fixture(scope="module")
def hub_stand_ins(source_folders, tmp_path_factory) -> dict:
    folders = {hub_id: source_folders[family] for hub_id, family in HUB_FAMILIES.items() if family != "clip"}
    clip = tmp_path_factory.mktemp("clip_source")
    tokenizer = character_tokenizer(clip)
    tiny_clip(tokenizer).save_pretrained(clip)
    clip_image_processor().save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    folders["openai/clip-vit-base-patch32"] = str(clip)
    return folders


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(os.path.join(REPO, "docs", "images", "digits"), folder / "docs" / "images" / "digits")
    return folder


def test_every_readme_block_is_python_or_bash_or_a_synopsis():
    """``text`` blocks are synopses with placeholders (SRC, [flags]), not commands; nothing else is left out."""
    assert readme_blocks() and {language for language, _ in readme_blocks()} <= {"python", "bash", "text"}


def needs_timm_tier(code: str) -> bool:
    return bool(re.search(r"^(import|from) (timm|torchvision)\b", code, flags=re.M))


@pytest.mark.parametrize("tier", ["core", pytest.param("timm", marks=pytest.mark.timm)])
def test_python_blocks_run_as_written_with_local_models(tier, hub_stand_ins, workdir, monkeypatch):
    """Each block in its install tier: those importing torchvision or timm in the timm tier."""
    monkeypatch.chdir(workdir)
    blocks = [code for language, code in readme_blocks() if language == "python" and needs_timm_tier(code) == (tier == "timm")]
    assert len(blocks) >= (8 if tier == "core" else 1)
    for index, code in enumerate(blocks):
        for hub_id, folder in hub_stand_ins.items():
            code = code.replace(f'"{hub_id}"', repr(folder))
        try:
            exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
        except Exception as error:
            raise AssertionError(f"README python block {index + 1} failed: {error!r}\n{code}") from error


@pytest.mark.slow
def test_auto_classes_know_bcos_only_after_the_import_or_with_remote_code(hub_stand_ins, tmp_path):
    """What the README says about registration, in fresh processes."""
    from transformers_bcos import bcosify_pretrained

    folder = tmp_path / "bcos"
    bcosify_pretrained(hub_stand_ins["microsoft/resnet-50"]).save_pretrained(folder)
    load = f"from transformers import AutoModelForImageClassification as A\nm = A.from_pretrained({str(folder)!r}{{}})\nprint(type(m).__module__)"

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)

    without = run(load.format(""))
    assert without.returncode != 0 and "bcos" in without.stderr
    imported = run("import transformers_bcos\n" + load.format(""))
    assert imported.returncode == 0 and imported.stdout.strip() == "transformers_bcos.modeling_bcos", imported.stderr
    remote = run(load.format(", trust_remote_code=True"))
    assert remote.returncode == 0 and "transformers_bcos" not in remote.stdout, remote.stderr


@pytest.mark.slow
def test_bash_blocks_run_or_parse(workdir, bcos_cache_dir, monkeypatch, capsys):
    from accelerate.commands.launch import launch_command_parser
    from transformers_bcos.cli import build_parser
    from transformers_bcos.cli import main as cli_main

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TRANSFORMERS_BCOS_CACHE", bcos_cache_dir)
    for name, value in {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        extras = set(re.findall(r'"(\w+)": \[', f.read()))
    commands = [words for language, code in readme_blocks() if language == "bash" for words in bash_commands(code)]
    ran = {"demo": 0, "cli": 0, "parsed": 0}
    converted_for_tour = False
    for words in commands:
        where = " ".join(words)
        if words[:2] == ["pip", "install"]:
            named = {extra for word in words for extra in re.findall(r"\[([\w,]+)\]", word) for extra in extra.split(",")}
            assert named <= extras, where
        elif words[:3] == ["python", "-m", "pytest"]:
            continue
        elif words[0] == "python" and words[1] == "examples/demo.py":
            assert load_example_script("demo").main(words[2:]) == 0, where
            ran["demo"] += 1
        elif words[0] == "python" and words[1].startswith("examples/"):
            script = load_example_script(os.path.basename(words[1])[:-3])
            script.parse_args(words[2:])
            ran["parsed"] += 1
            if "outputs/bcos-mnist" in words and not converted_for_tour:
                # The tour's model: the cached standard ResNet converted (fine-tuning it takes minutes).
                source = os.path.join(bcos_cache_dir, "mnist-resnet-standard-v1")
                assert cli_main(["convert", source, "outputs/bcos-mnist"]) == 0
                converted_for_tour = True
        elif words[:2] == ["accelerate", "launch"]:
            launch = launch_command_parser().parse_args(words[2:])
            script = load_example_script(os.path.basename(launch.training_script)[:-3])
            script.parse_args(launch.training_script_args)
            ran["parsed"] += 1
        elif words[0] == "transformers-bcos":
            arguments = [word.replace("~/.cache/transformers_bcos", bcos_cache_dir) for word in words[1:]]
            parsed = build_parser().parse_args(arguments)
            for written in (getattr(parsed, "out", None), getattr(parsed, "output_dir", None)):
                assert written is None or written.startswith("outputs/"), f"the tour writes under outputs/ only: {where}"
            assert cli_main(arguments) == 0, f"{where}\n{capsys.readouterr().err}"
            ran["cli"] += 1
        else:
            raise AssertionError(f"README command not covered by this test: {where}")
    assert ran["demo"] == 1 and ran["cli"] == 7 and ran["parsed"] >= 9, ran
    assert sorted(os.listdir(workdir / "outputs" / "explanations")) == sorted(os.listdir(workdir / "docs" / "images" / "digits"))
