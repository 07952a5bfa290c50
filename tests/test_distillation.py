"""e²KD (explanation-enhanced knowledge distillation): the losses by their definitions, teachers
loaded from a B-cos and a standard checkpoint, explanation distillation that makes a student's
explanations more like its teacher's on real MNIST digits, and fine-tuning runs with a teacher
(in process, in bf16, under `accelerate launch`, and the experiment)."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from conftest import launch_finetune, load_example_script
from transformers_bcos import bcosify_pretrained
from transformers_bcos._compat import ViTImageProcessor
from transformers_bcos.modeling_bcos import BcosForImageClassification
from transformers_bcos.training.distillation import (
    Teacher,
    e2kd_loss,
    explanation_similarity,
    explanation_similarity_loss,
    kd_loss,
)
from transformers_bcos.training.run import OptionsError

FINETUNE_FLAGS = ["--dataset", "embedded:mnist", "--max_train_samples", "64", "--max_eval_samples", "32",
                  "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--bn_reestimation_images", "0",
                  "--disable_progress_bar"]


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------


def test_kd_loss_matches_its_definition_computed_with_numpy():
    torch.manual_seed(0)
    student, teacher, temperature = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64), 3.0

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher.numpy() / temperature), softmax(student.numpy() / temperature)
    expected = temperature**2 * np.mean([np.sum(p[i] * np.log(p[i] / q[i])) for i in range(4)])
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_explanation_similarity_loss_matches_its_definition():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 5, dtype=torch.float64), torch.randn(3, 5, 5, dtype=torch.float64)
    expected = np.mean([1 - np.dot(x.ravel(), y.ravel()) / np.linalg.norm(x) / np.linalg.norm(y)
                        for x, y in zip(a.numpy(), b.numpy())])  # fmt: skip
    assert explanation_similarity_loss(a, b).item() == pytest.approx(expected, rel=1e-10)
    assert explanation_similarity_loss(a, a).item() == pytest.approx(0.0, abs=1e-12)
    assert explanation_similarity_loss(a, -a).item() == pytest.approx(2.0, abs=1e-12)


def test_a_teacher_map_of_another_size_is_resized_bilinearly_to_the_students():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 28, 28), torch.randn(2, 7, 7)
    resized = F.interpolate(teacher[:, None], size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    expected = [np.dot(s.ravel(), t.ravel()) / np.linalg.norm(s) / np.linalg.norm(t)
                for s, t in zip(student.numpy(), resized.numpy())]  # fmt: skip
    np.testing.assert_allclose(explanation_similarity(student, teacher).numpy(), expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bcos_teacher_folder(tiny_standard_resnet, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bcos_teacher"))
    torch.manual_seed(1)
    bcosify_pretrained(tiny_standard_resnet).save_pretrained(folder)
    return folder


def test_a_teacher_path_that_is_not_a_folder_is_a_one_line_options_error(tmp_path):
    with pytest.raises(OptionsError, match="is not a folder"):
        Teacher(str(tmp_path / "missing"))


def test_a_teacher_is_told_bcos_or_standard_by_its_config_model_type(bcos_teacher_folder, tiny_standard_resnet, tmp_path):
    assert Teacher(bcos_teacher_folder).is_bcos and not Teacher(tiny_standard_resnet).is_bcos
    # A standard model whose config merely mentions "bcos" somewhere is still a standard model.
    renamed = shutil.copytree(tiny_standard_resnet, tmp_path / "bcos-named")
    config = json.loads((renamed / "config.json").read_text())
    config["id2label"] = {**config["id2label"], "0": "bcos"}
    (renamed / "config.json").write_text(json.dumps(config))
    assert not Teacher(str(renamed)).is_bcos


def test_a_standard_teacher_explains_by_input_times_gradient_on_its_normalised_input(tiny_standard_resnet, mnist_images):
    images, _ = mnist_images
    teacher = Teacher(tiny_standard_resnet)
    target = teacher.logits(images[:4]).argmax(-1)
    maps = teacher.explain(images[:4], target)
    assert maps.shape == (4, *images.shape[-2:]) and not maps.requires_grad
    inputs = ((images[:4] - 0.13) / 0.31).requires_grad_(True)
    teacher.model(pixel_values=inputs).logits.gather(1, target[:, None]).sum().backward()
    torch.testing.assert_close(maps, (inputs * inputs.grad).sum(1).detach())
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_a_bcos_teachers_explanation_is_its_own_explain(bcos_teacher_folder, mnist_images):
    images, _ = mnist_images
    teacher = Teacher(bcos_teacher_folder)
    target = teacher.logits(images[:4]).argmax(-1)
    expected = BcosForImageClassification.from_pretrained(bcos_teacher_folder).explain(pixel_values=images[:4], target=target)
    torch.testing.assert_close(teacher.explain(images[:4], target), expected.contributions)


def test_the_e2kd_loss_is_kd_plus_the_weighted_explanation_term(bcos_teacher_folder, mnist_images):
    images, _ = mnist_images
    teacher = Teacher(bcos_teacher_folder)
    torch.manual_seed(2)
    student = BcosForImageClassification(teacher.model.config)
    logits = student(pixel_values=images).logits
    target = teacher.logits(images).argmax(-1)
    student_map = student.explain(pixel_values=images, target=target).contributions
    kd = kd_loss(logits, teacher.logits(images), 2.0)
    explanation_term = explanation_similarity_loss(student_map, teacher.explain(images, target))
    assert e2kd_loss(logits, student, teacher, images, 2.0, 0.0).item() == pytest.approx(kd.item(), rel=1e-6)
    assert e2kd_loss(logits, student, teacher, images, 2.0, 3.0).item() == pytest.approx(
        kd.item() + 3.0 * explanation_term.item(), rel=1e-5)


def test_explanation_distillation_makes_student_explanations_more_like_the_bcos_teacher(bcos_teacher_folder, mnist_images):
    images, _ = mnist_images
    teacher = Teacher(bcos_teacher_folder)
    torch.manual_seed(2)
    student = BcosForImageClassification(teacher.model.config)  # the teacher's architecture, other random weights
    target = teacher.logits(images).argmax(-1)
    teacher_maps = teacher.explain(images, target)

    def similarity():
        with torch.no_grad():
            maps = student.explain(pixel_values=images, target=target).contributions
        return 1 - explanation_similarity_loss(maps, teacher_maps).item()

    e2kd_loss(student(pixel_values=images).logits, student, teacher, images, temperature=1.0, explanation_weight=1.0).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    before = similarity()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        maps = student.explain(pixel_values=images, target=target, create_graph=True).contributions
        explanation_similarity_loss(maps, teacher_maps).backward()
        optimizer.step()
    assert similarity() > before + 0.05


# ----------------------------------------------------------------------------------------------
# Fine-tuning with a teacher
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_script():
    return load_example_script("finetune")


def _check_distillation_results(output_dir, out: str) -> dict:
    results = json.loads((output_dir / "all_results.json").read_text())
    assert 0 <= results["eval_teacher_agreement"] <= 1 and -1 <= results["eval_explanation_similarity"] <= 1
    assert results["eval_teacher_agreement"] == results["epochs"][-1]["eval_teacher_agreement"]
    assert (f"agreement with the teacher {100 * results['eval_teacher_agreement']:.2f}%, explanation similarity "
            f"{results['eval_explanation_similarity']:.3f}") in out
    return results


def test_finetuning_with_a_bcos_teacher_reports_agreement_and_refuses_to_resume_with_another_teacher(
    finetune_script, bcos_teacher_folder, tiny_standard_resnet, tmp_path, capsys
):
    output_dir = tmp_path / "out"
    args = ["--model", tiny_standard_resnet, "--output_dir", str(output_dir), "--explanation_distillation_weight", "2",
            "--distillation_temperature", "4", *FINETUNE_FLAGS]
    assert finetune_script.main([*args, "--teacher", bcos_teacher_folder]) == 0
    out = capsys.readouterr().out
    assert f"e²KD from {bcos_teacher_folder}: temperature 4, explanation weight 2." in out
    results = _check_distillation_results(output_dir, out)
    card = (output_dir / "README.md").read_text()
    assert (f"| distillation | e²KD from `{bcos_teacher_folder}`: KD at temperature 4 + 2 × (1 − cosine) of the "
            "explanations of the teacher's top-1 class |") in card
    assert f"agreement with the teacher {100 * results['eval_teacher_agreement']:.2f}%" in card
    # Resuming with another teacher would not continue the same run.
    assert finetune_script.main([*args, "--teacher", tiny_standard_resnet, "--resume_from_checkpoint", "latest"]) == 2
    assert f"--teacher {bcos_teacher_folder!r} -> {tiny_standard_resnet!r}" in capsys.readouterr().err


def test_an_e2kd_run_resumed_mid_run_ends_with_the_weights_of_the_uninterrupted_run(
    finetune_script, bcos_teacher_folder, tiny_standard_resnet, tmp_path
):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--model", tiny_standard_resnet, "--teacher", bcos_teacher_folder, *FINETUNE_FLAGS, "--num_train_epochs", "2",
            "--checkpointing_steps", "2", "--keep_last_checkpoints", "10"]  # 64 images in batches of 16: 8 steps
    assert finetune_script.main([*args, "--output_dir", str(straight)]) == 0
    shutil.copytree(straight, resumed)
    for name in ("model.safetensors", "all_results.json"):
        (resumed / name).unlink()
    assert finetune_script.main([*args, "--output_dir", str(resumed), "--resume_from_checkpoint",
                                 str(resumed / "checkpoints" / "step_00000002")]) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    at_step_2 = load_file(straight / "checkpoints" / "step_00000002" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-5
    results = [json.loads((d / "all_results.json").read_text()) for d in (straight, resumed)]
    assert results[0]["eval_teacher_agreement"] == pytest.approx(results[1]["eval_teacher_agreement"])
    # The resumed steps changed the weights: the match is not vacuous.
    assert max((b[k].double() - at_step_2[k].double()).abs().max().item() for k in b) > 1e-4


def test_bf16_finetuning_with_a_standard_teacher_explained_post_hoc(
    finetune_script, tiny_standard_resnet, tmp_path, capsys, fresh_accelerator_state
):
    output_dir = tmp_path / "out"
    assert finetune_script.main(["--model", tiny_standard_resnet, "--output_dir", str(output_dir), "--teacher",
                                 tiny_standard_resnet, "--mixed_precision", "bf16", *FINETUNE_FLAGS]) == 0
    _check_distillation_results(output_dir, capsys.readouterr().out)
    state = BcosForImageClassification.from_pretrained(str(output_dir)).state_dict()
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def vit_teacher_of_32_pixels(tmp_path_factory):
    """A standard ViT with the digits' labels that only takes 32-px images (the student takes 28 px)."""
    labels = [str(d) for d in range(10)]
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    folder = tmp_path_factory.mktemp("vit32")
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "MISSING"], "--teacher MISSING is not a folder."),
        (["--teacher", "BCOS", "--distillation_temperature", "0"], "--distillation_temperature must be a finite number > 0"),
        (["--teacher", "BCOS", "--explanation_distillation_weight", "-1"],
         "--explanation_distillation_weight must be a finite number >= 0"),
        (["--teacher", "BCOS", "--explanation_distillation_weight", "nan"],
         "--explanation_distillation_weight must be a finite number >= 0"),
        (["--teacher", "OTHER_LABELS"], "has other labels (5: class_0, class_1, class_2, class_3, class_4) than the data "
                                        "(10: 0, 1, 2, 3, 4, ...)"),
        (["--teacher", "VIT32"], "cannot take the student's input of size (3, 28, 28): Input image size (28*28) doesn't match"),
    ],
)
def test_bad_teachers_fail_with_one_line_before_training(finetune_script, tiny_standard_resnet, bcos_teacher_folder,
                                                         source_folders, vit_teacher_of_32_pixels, tmp_path, capsys,
                                                         args, message):
    output_dir = tmp_path / "out"
    teachers = {"BCOS": bcos_teacher_folder, "OTHER_LABELS": source_folders["resnet"], "VIT32": vit_teacher_of_32_pixels,
                "MISSING": "MISSING"}
    args = [teachers.get(a, a) for a in args]
    assert finetune_script.main(["--model", tiny_standard_resnet, "--output_dir", str(output_dir), *args,
                                 *FINETUNE_FLAGS]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("finetune.py: error: ") and message in lines[-1], lines[-1]
    assert not output_dir.exists()


@pytest.mark.slow
def test_e2kd_finetuning_under_accelerate_launch_with_two_processes(tmp_path, tiny_standard_resnet, bcos_teacher_folder,
                                                                    bcos_cache_dir):
    results = launch_finetune(tmp_path, bcos_cache_dir, "--model", tiny_standard_resnet, "--teacher", bcos_teacher_folder,
                              *FINETUNE_FLAGS)
    assert results["num_processes"] == 2 and results["eval_examples"] == 32
    assert 0 <= results["eval_teacher_agreement"] <= 1 and -1 <= results["eval_explanation_similarity"] <= 1


@pytest.mark.slow
def test_the_e2kd_experiment_writes_its_table_into_results(tmp_path, bcos_cache_dir, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_BCOS_CACHE", bcos_cache_dir)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n<!-- e2kd:begin -->\nthe previous table\n<!-- e2kd:end -->\n\nafter\n")
    assert load_example_script("e2kd").main([
        "--output_dir", str(tmp_path / "experiment"), "--seeds", "0", "--max_train_samples", "64", "--teacher_epochs", "1",
        "--student_epochs", "1", "--write_results", str(results),
    ]) == 0  # fmt: skip
    text = results.read_text()
    assert "the previous table" not in text and text.endswith("<!-- e2kd:end -->\n\nafter\n")
    assert "| student, B-cos ResNet (0.08M) | e²KD, T = 4, λ = 1, 64 digits |" in text
    runs = json.loads((tmp_path / "experiment" / "results.json").read_text())["runs"]
    assert [r["setting"] for r in runs] == ["labels", "KD", "e²KD"]
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["teacher_agreement"] <= 1 and -1 <= r["explanation_similarity"] <= 1
