"""Real runs through `accelerate launch`: two CPU processes, kill-and-resume, and the CI-sized MNIST run.

Each launched process gets OMP_NUM_THREADS=1: two processes share the machine's 2 cores, and an
oversubscribed CPU run was measured ~40x slower.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, ResNetForImageClassification

from conftest import (
    REPO,
    RULE_FAMILY_CONFIGS,
    SAVED_RULE_FAMILIES,
    completeness_error,
    launch_command,
    load_example_script,
    run,
    run_without_package,
)
from transformers_bcos import BcosConfig, BcosForImageClassification
from transformers_bcos.modeling_bcos import BcosSourceArchitecture
from transformers_bcos.training import recipe_defaults

FINETUNE = os.path.join(REPO, "examples", "finetune.py")


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory, bcos_cache_dir):
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),
        "TRANSFORMERS_BCOS_CACHE": bcos_cache_dir,
        "TRANSFORMERS_VERBOSITY": "error",
    }


# ----------------------------------------------------------------------------------------------
# 1. Two processes: different shards, identical parameters, exact eval count
# ----------------------------------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from transformers_bcos import bcosify_pretrained
    from transformers_bcos.data import (ImageClassificationDataset, ImageProcessorCollator,
                                        image_processor_from_dict, load_image_classification_data)
    from transformers_bcos.training import (create_optimizer, create_scheduler, evaluate_accuracy,
                                            reestimate_batchnorm_statistics, training_step)

    source, out = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(gradient_accumulation_steps=2,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    set_seed(0)
    data = load_image_classification_data(max_train_samples=64, max_eval_samples=37)
    model = bcosify_pretrained(source)
    collate = ImageProcessorCollator(image_processor_from_dict(model.config.image_processor))

    class Recorded(ImageClassificationDataset):
        seen = []
        def __getitem__(self, index):
            self.seen.append(int(index))
            return super().__getitem__(index)

    train = Recorded(data.train, "image", "label", augment=True)
    train_loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate)
    eval_loader = DataLoader(ImageClassificationDataset(data.eval, "image", "label"), batch_size=8, collate_fn=collate)
    optimizer = create_optimizer(model, 1e-3)
    scheduler = create_scheduler(optimizer, "cosine", 1, 4, accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)

    rank = accelerator.process_index
    used = reestimate_batchnorm_statistics(accelerator.unwrap_model(model), (b for b in eval_loader), num_images=16)
    stats = {k: v for k, v in accelerator.unwrap_model(model).state_dict().items() if "running" in k}
    save_file(stats, f"{out}/bn_rank{rank}.safetensors")
    Recorded.seen.clear()
    model.train()
    for batch in train_loader:  # one epoch: 64 images = 2 ranks x 8 batches of 4 = 4 optimizer steps
        training_step(accelerator, model, batch, optimizer, scheduler, agc_clip_factor=0.01)
    result = evaluate_accuracy(accelerator, model, eval_loader)
    params = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(model).named_parameters()}
    save_file(params, f"{out}/params_rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"seen": Recorded.seen, "eval_examples": result.num_examples, "bn_images": used,
                   "num_processes": accelerator.num_processes, "lr": scheduler.get_last_lr()[0]}, f)
    accelerator.end_training()
    """
)


@pytest.mark.slow
def test_two_process_run_shards_data_and_keeps_replicas_identical(tmp_path, launch_env, tiny_standard_resnet):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run(launch_command(str(script), tiny_standard_resnet, str(tmp_path)), launch_env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    seen = [set(r["seen"]) for r in ranks]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 32
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(64))  # disjoint shards covering the data
    # 37 evaluation images on 2 ranks: Accelerate pads the last batch; gather_for_metrics drops the padding.
    assert [r["eval_examples"] for r in ranks] == [37, 37]
    assert [r["bn_images"] for r in ranks] == [32, 32]  # 16 per rank, summed
    bn = [load_file(str(tmp_path / f"bn_rank{r}.safetensors")) for r in (0, 1)]
    assert all(torch.equal(bn[0][k], bn[1][k]) for k in bn[0])  # averaged over the processes
    params = [load_file(str(tmp_path / f"params_rank{r}.safetensors")) for r in (0, 1)]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name
    source = ResNetForImageClassification.from_pretrained(tiny_standard_resnet)
    trained_classifier = params[0]["backbone.model.classifier.1.weight"]
    assert not torch.equal(trained_classifier, source.classifier[-1].weight)  # it did train
    # 4 optimizer steps of a 4-step cosine schedule: the schedule ran once per update, not per process.
    assert ranks[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# 2. Kill with SIGKILL after a mid-epoch checkpoint, resume, and match the uninterrupted run
# ----------------------------------------------------------------------------------------------


def _finetune_args(source: str, output_dir: str) -> list:
    return [
        "--model", source, "--output_dir", output_dir, "--num_train_epochs", "2",
        "--max_train_samples", "240", "--max_eval_samples", "50", "--per_device_train_batch_size", "4",
        "--checkpointing_steps", "3", "--keep_last_checkpoints", "2", "--bn_reestimation_images", "64",
        "--augment", "--augment_min_scale", "0.5", "--seed", "3", "--disable_progress_bar",
    ]  # fmt: skip


def process_tree(root: int) -> list:
    """``root`` and all its descendants (torchrun starts the workers in their own sessions)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def kill_tree(root: int) -> None:
    for pid in reversed(process_tree(root)):  # workers first, then the launcher
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _latest_position(output_dir: str):
    pointer = os.path.join(output_dir, "checkpoints", "latest")
    try:
        with open(pointer) as f:
            name = f.read().strip()
        with open(os.path.join(output_dir, "checkpoints", name, "training_state.json")) as f:
            return name, json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_killed_run_resumes_mid_epoch_to_the_same_weights(tmp_path, launch_env, tiny_standard_resnet):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run(launch_command(FINETUNE, *_finetune_args(tiny_standard_resnet, straight)), launch_env)

    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(
        launch_command(FINETUNE, *_finetune_args(tiny_standard_resnet, killed)),
        env=launch_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while _latest_position(killed) is None:
            assert process.poll() is None, f"run B ended before its first checkpoint:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        workers = process_tree(process.pid)[1:]
        kill_tree(process.pid)  # the launcher and both workers
        process.wait(timeout=30)
    finally:
        kill_tree(process.pid)
        log.close()
    assert process.returncode == -signal.SIGKILL
    assert len(workers) >= 2
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        time.sleep(0.05)
    assert not os.path.exists(os.path.join(killed, "model.safetensors"))
    name, position = _latest_position(killed)
    assert position["epoch"] == 0 and not position["epoch_complete"], (name, position)  # mid-way through epoch 1
    assert 0 < position["batches_in_epoch"] < 30
    at_kill = load_file(os.path.join(killed, "checkpoints", name, "model.safetensors"))

    resumed = run(
        launch_command(FINETUNE, *_finetune_args(tiny_standard_resnet, killed), "--resume_from_checkpoint", "latest"),
        launch_env,
    )
    assert f"Resumed from {os.path.join(killed, 'checkpoints', name)}" in resumed.stdout, resumed.stdout
    a = load_file(os.path.join(straight, "model.safetensors"))
    b = load_file(os.path.join(killed, "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed weights differ from the uninterrupted run by {worst}"
    trained_after_resume = max((b[k].double() - at_kill[k].double()).abs().max().item() for k in b)
    assert trained_after_resume > 1e-4  # the resumed part did change the weights: the match is not vacuous
    results = [json.loads(open(os.path.join(d, "all_results.json")).read()) for d in (straight, killed)]
    assert [r["eval_accuracy"] for r in results][0] == pytest.approx(results[1]["eval_accuracy"])
    assert results[0]["train_steps"] == results[1]["train_steps"] == 60
    # 30 steps per epoch: the last step checkpoint and the epoch-end one are the two kept.
    for output_dir in (straight, killed):
        assert sorted(os.listdir(os.path.join(output_dir, "checkpoints"))) == ["epoch_0002", "latest", "step_00000060"]


# ----------------------------------------------------------------------------------------------
# 3. The CI-sized run on the embedded real data, and the folder it produces
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ci_sized_run_learns_and_produces_a_hub_ready_folder(tmp_path, launch_env):
    output_dir = str(tmp_path / "run")
    command = [sys.executable, FINETUNE, "--output_dir", output_dir, "--max_train_samples", "1200",
               "--max_eval_samples", "400", "--num_train_epochs", "2", "--per_device_train_batch_size", "32",
               "--bn_reestimation_images", "256"]  # fmt: skip
    result = run(command, launch_env)
    assert "BatchNorm re-estimation on 256 training images" in result.stdout
    metrics = json.loads(open(os.path.join(output_dir, "all_results.json")).read())
    epochs = metrics["epochs"]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert metrics["accuracy_before_bn_reestimation"] < 0.3  # a fresh B = 2 conversion is near chance
    assert metrics["accuracy_after_bn_reestimation"] > metrics["accuracy_before_bn_reestimation"] + 0.2
    assert metrics["eval_accuracy"] > metrics["accuracy_after_bn_reestimation"] and metrics["eval_accuracy"] > 0.9
    assert metrics["eval_examples"] == 400

    card = open(os.path.join(output_dir, "README.md")).read()
    assert f"| after epoch 2 ({epochs[1]['step']} steps) | {100 * metrics['eval_accuracy']:.2f}% |" in card
    assert "{{" not in card
    files = set(os.listdir(output_dir))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_bcos.py", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)

    from transformers_bcos.data import load_embedded_dataset

    test = load_embedded_dataset()["test"]
    images_path = str(tmp_path / "digits.npy")
    np.save(images_path, np.stack([np.asarray(test[i]["image"]) for i in range(6)]))
    output = run_without_package(
        f"""
        import json
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({output_dir!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({output_dir!r})
        images = [Image.fromarray(a) for a in np.load({images_path!r})]
        pixel_values = processor(images=images, return_tensors="pt").pixel_values
        explanation = model.explain(pixel_values)
        total = explanation.contributions.sum((1, 2))
        scale = torch.maximum(explanation.explained_output.abs(), explanation.contributions.abs().sum((1, 2)))
        print(json.dumps({{
            "module": type(model).__module__,
            "id2label": model.config.id2label,
            "do_normalize": processor.do_normalize,
            "pixel_range": [pixel_values.min().item(), pixel_values.max().item()],
            "relative_error": ((total - explanation.explained_output).abs() / scale).max().item(),
        }}))
        """
    )
    loaded = json.loads(output.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["id2label"] == {str(d): str(d) for d in range(10)}
    assert loaded["do_normalize"] is False and 0 <= loaded["pixel_range"][0] and loaded["pixel_range"][1] <= 1
    assert loaded["relative_error"] <= 1e-5


# ----------------------------------------------------------------------------------------------
# 4. Bad input: one clear line, before any work
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_script():
    return load_example_script("finetune")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "no-such-org/no-such-data"], "Unknown dataset 'no-such-org/no-such-data'"),
        (["--image_column", "photo"], "Unknown image column 'photo'; the data set has columns: image, label."),
        (["--label_column", "digit"], "Unknown label column 'digit'"),
        (["--model", "default:vgg"], "Unknown default model 'default:vgg'"),
        (["--from_scratch", "alexnet"], "--from_scratch 'alexnet' is neither a family"),
        (["--resume_from_checkpoint", "latest"], "no checkpoint in"),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path, monkeypatch, capsys, finetune_script, args, message):
    output_dir = tmp_path / "out"
    monkeypatch.setenv("TRANSFORMERS_BCOS_CACHE", str(tmp_path / "no_cache"))  # nothing may be trained
    assert finetune_script.main(["--output_dir", str(output_dir), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("finetune.py: error: ") and message in lines[-1]
    assert not output_dir.exists() and not (tmp_path / "no_cache").exists()  # no work was done


def test_output_dir_of_another_run_is_refused(tmp_path, launch_env):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_text("another run")
    started = time.monotonic()
    result = subprocess.run([sys.executable, FINETUNE, "--output_dir", str(output_dir)],
                            env=launch_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"finetune.py: error: Output directory {output_dir} already holds files (another run?): pass "
        "--overwrite_output_dir, --resume_from_checkpoint latest, or another --output_dir."
    )
    assert (output_dir / "model.safetensors").read_text() == "another run"
    assert time.monotonic() - started < 60  # refused before loading data or models


# ----------------------------------------------------------------------------------------------
# 5. Families B-cosified by the module-type rules: a saved B-cos folder, and from scratch
# ----------------------------------------------------------------------------------------------

DIGITS = {i: str(i) for i in range(10)}
# The recipe each saved rules family trains with (`recipe_family`): DINOv2 is a transformer.
RULE_FAMILY_RECIPES = {"dinov2": "vit", "regnet": "cnn"}


def short_run(output_dir) -> list:
    """Two epochs of 48 embedded MNIST digits (6 steps each), evaluated on 16."""
    return ["--output_dir", str(output_dir), "--max_train_samples", "48", "--max_eval_samples", "16",
            "--per_device_train_batch_size", "8", "--num_train_epochs", "2", "--disable_progress_bar"]  # fmt: skip


def assert_trained_folder_explains(output_dir, family: str, mnist_images, train_steps: int = 12) -> BcosForImageClassification:
    """The run's folder: the family's architecture with the digits' labels, explanations complete."""
    metrics = json.loads(open(os.path.join(output_dir, "all_results.json")).read())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["train_steps"] == train_steps
    assert metrics["eval_examples"] == 16
    assert all(math.isfinite(e["train_loss"]) for e in metrics["epochs"])
    model = BcosForImageClassification.from_pretrained(output_dir).eval()
    assert isinstance(model.backbone, BcosSourceArchitecture) and model.config.backbone_config.model_type == family
    assert model.config.id2label == DIGITS and model.config.logit_bias == pytest.approx(-math.log(9))
    explanation = model.explain(mnist_images[0][:4])
    assert explanation.logits.shape == (4, 10)
    assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-4
    return model


@pytest.mark.parametrize("family", SAVED_RULE_FAMILIES)
def test_a_saved_rules_family_model_finetunes_on_new_labels(family, bcos_rules_folders, finetune_script, tmp_path, capsys, mnist_images):
    """The 5-class model learns the 10 digits: a new head, every other tensor trained from the
    folder's, with the recipe of its kind of architecture."""
    folder = bcos_rules_folders[family]
    assert finetune_script.main(["--model", folder, *short_run(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"Model: continued from {folder}" in out
    assert f"Recipe ({recipe_defaults(RULE_FAMILY_RECIPES[family], small_data=True).source})" in out
    trained = assert_trained_folder_explains(tmp_path / "run", family, mnist_images).state_dict()
    start = BcosForImageClassification.from_pretrained(folder).state_dict()
    assert trained.keys() == start.keys()
    new_head = {key for key in start if trained[key].shape != start[key].shape}
    assert new_head and all(key.startswith("backbone.model.classifier.") for key in new_head), new_head
    changed = [key for key in start if key not in new_head and not torch.equal(trained[key], start[key])]
    assert any(key.endswith("weight") and "classifier" not in key for key in changed)  # the body trained too


@pytest.mark.slow  # ~45 s: two processes start and load torch
def test_two_process_finetuning_of_a_model_with_unused_parameters(tmp_path, launch_env, bcos_rules_folders, mnist_images):
    """DINOv2 holds a mask token its classifier never uses: DDP must be told to expect parameters
    without gradients, else the second step fails. The token stays as it was; the rest trains."""
    output_dir = tmp_path / "run"
    result = run(launch_command(FINETUNE, "--model", bcos_rules_folders["dinov2"], *short_run(output_dir)), launch_env)
    assert "2 process(es)" in result.stdout
    model = assert_trained_folder_explains(output_dir, "dinov2", mnist_images, train_steps=6)  # 2 processes: half the steps
    start = BcosForImageClassification.from_pretrained(bcos_rules_folders["dinov2"])
    token = "backbone.model.dinov2.embeddings.mask_token"
    assert torch.equal(model.state_dict()[token], start.state_dict()[token])
    assert not torch.equal(model.state_dict()["backbone.model.dinov2.embeddings.cls_token"], start.state_dict()["backbone.model.dinov2.embeddings.cls_token"])


@pytest.mark.parametrize("family", SAVED_RULE_FAMILIES)
def test_from_scratch_json_config_of_a_rules_family_trains(family, finetune_script, tmp_path, capsys, mnist_images):
    """--from_scratch with the family's own config (RegNet, at --image_size) or a BcosConfig around
    it (DINOv2, at the image_size of its config): unit-norm B-cos filters and a lower loss after training."""
    backbone = AutoConfig.for_model(family, **RULE_FAMILY_CONFIGS[family])
    config = BcosConfig(backbone_config=backbone) if family == "dinov2" else backbone
    config.to_json_file(tmp_path / "config.json")
    size = [] if family == "dinov2" else ["--image_size", "32"]  # a CNN's default would be 224
    assert finetune_script.main(["--from_scratch", str(tmp_path / "config.json"), *size, *short_run(tmp_path / "run")]) == 0
    assert f"Recipe ({recipe_defaults(RULE_FAMILY_RECIPES[family], from_scratch=True).source})" in capsys.readouterr().out
    model = assert_trained_folder_explains(tmp_path / "run", family, mnist_images)
    assert model.config.normalize_weights and model.config.b == 2.0
    assert json.loads(open(tmp_path / "run" / "preprocessor_config.json").read())["size"] == {"height": 32, "width": 32}
    epochs = json.loads(open(tmp_path / "run" / "all_results.json").read())["epochs"]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
