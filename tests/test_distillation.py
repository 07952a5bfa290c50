"""e²KD (explanation-enhanced knowledge distillation): the losses by their definitions, teachers
loaded from a B-cos and a standard checkpoint, and explanation distillation that makes a
student's explanations more like its teacher's on real MNIST digits."""

import numpy as np
import pytest
import torch

from transformers_bcos import bcosify_pretrained
from transformers_bcos.modeling_bcos import BcosForImageClassification
from transformers_bcos.training.distillation import Teacher, e2kd_loss, explanation_similarity_loss, kd_loss
from transformers_bcos.training.run import OptionsError


def test_kd_loss_matches_its_definition_computed_with_numpy():
    torch.manual_seed(0)
    student, teacher, temperature = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64), 3.0

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher.numpy() / temperature), softmax(student.numpy() / temperature)
    expected = temperature**2 * np.mean([np.sum(p[i] * np.log(p[i] / q[i])) for i in range(4)])
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-10)
    assert kd_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-12)


def test_explanation_similarity_loss_matches_its_definition():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 5, dtype=torch.float64), torch.randn(3, 5, 5, dtype=torch.float64)
    expected = np.mean([1 - np.dot(x.ravel(), y.ravel()) / np.linalg.norm(x) / np.linalg.norm(y)
                        for x, y in zip(a.numpy(), b.numpy())])  # fmt: skip
    assert explanation_similarity_loss(a, b).item() == pytest.approx(expected, rel=1e-10)
    assert explanation_similarity_loss(a, a).item() == pytest.approx(0.0, abs=1e-12)
    assert explanation_similarity_loss(a, -a).item() == pytest.approx(2.0, abs=1e-12)


def test_a_teacher_path_that_is_not_a_folder_is_a_one_line_options_error(tmp_path):
    with pytest.raises(OptionsError, match="is not a folder"):
        Teacher(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def bcos_teacher_folder(tiny_standard_resnet, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bcos_teacher"))
    torch.manual_seed(1)
    bcosify_pretrained(tiny_standard_resnet).save_pretrained(folder)
    return folder


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


def test_explanation_distillation_makes_student_explanations_more_like_the_bcos_teacher(bcos_teacher_folder, mnist_images):
    images, _ = mnist_images
    teacher = Teacher(bcos_teacher_folder)
    assert teacher.is_bcos
    torch.manual_seed(2)
    student = BcosForImageClassification(teacher.model.config)  # the teacher's architecture, other random weights
    target = teacher.logits(images).argmax(-1)
    teacher_maps = teacher.explain(images, target)

    def similarity():
        with torch.no_grad():
            maps = student.explain(pixel_values=images, target=target).contributions
        return 1 - explanation_similarity_loss(maps, teacher_maps).item()

    loss, _ = e2kd_loss(student, teacher, images, temperature=1.0, explanation_weight=1.0)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    before = similarity()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        maps = student.explain(pixel_values=images, target=target, create_graph=True).contributions
        explanation_similarity_loss(maps, teacher_maps).backward()
        optimizer.step()
    assert similarity() > before + 0.05


def test_finetuning_with_a_bcos_teacher_records_the_distillation_in_the_card(bcos_teacher_folder, tiny_standard_resnet, tmp_path):
    from conftest import load_example_script

    output = str(tmp_path / "out")
    load_example_script("finetune").main([
        "--model", tiny_standard_resnet, "--dataset", "embedded:mnist", "--teacher", bcos_teacher_folder,
        "--max_train_samples", "64", "--max_eval_samples", "32", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--bn_reestimation_images", "0", "--disable_progress_bar",
        "--output_dir", output,
    ])  # fmt: skip
    card = open(f"{output}/README.md").read()
    assert "e²KD from" in card


def test_a_nonpositive_distillation_temperature_is_a_one_line_options_error(bcos_teacher_folder):
    from transformers_bcos.training.finetune import FinetuneOptions, validate_options

    with pytest.raises(OptionsError, match="distillation_temperature"):
        validate_options(FinetuneOptions(teacher=bcos_teacher_folder, distillation_temperature=0.0))
