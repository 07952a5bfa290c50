"""Explanations of units inside the network (issue 19, item 4): a channel of any module's output,
summed over positions or at one, exactly as complete as a class's explanation."""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, RULE_FAMILIES, RULES_PROCESSOR, completeness_error

from transformers import pipeline

from transformers_bcos import Unit, bcosify_pretrained, explanation_mode

UNIT_FAMILIES = FAMILIES + ["dinov2", "efficientnet", "swin"]
# Module names are the source architecture's own, under backbone.model.
RESNET_STAGES = "backbone.model.resnet.encoder.stages"


@pytest.fixture(scope="module")
def models(source_folders, rules_sources):
    """family -> a float64 B-cos model (b = 2, no biases)."""
    converted = {family: bcosify_pretrained(source_folders[family]) for family in FAMILIES}
    converted.update({family: bcosify_pretrained(rules_sources[family], image_processor=RULES_PROCESSOR) for family in UNIT_FAMILIES[4:]})
    return {family: model.double() for family, model in converted.items()}


def running_modules(model, x) -> list:
    """(name, output) of every module whose forward runs in explanation mode and returns a feature
    map or tokens (3-D or 4-D) that depend on the pixels there, in the order they finish. (Key
    projections, gate computations and position biases do not: they are the detached factors.)"""
    names = {module: name for name, module in model.named_modules() if name}
    finished = []

    def record(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() in (3, 4) and out.requires_grad:
            finished.append((names[module], out.detach()))

    hooks = [module.register_forward_hook(record) for module in names]
    parameters = [p for p in model.parameters() if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        with explanation_mode(model):
            model(x.clone().requires_grad_(True))
    finally:
        for p in parameters:
            p.requires_grad_(True)
        for hook in hooks:
            hook.remove()
    return finished


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("family", UNIT_FAMILIES)
def test_units_of_early_and_late_modules_are_explained_completely(family, models):
    """Two units per family, a third and two thirds through the forward: the explained output is
    the unit's value in a plain forward, and the contributions sum to it (float64)."""
    model = models[family]
    x = images()
    finished = running_modules(model, x)
    assert len(finished) >= 3
    for name, output in (finished[len(finished) // 3], finished[2 * len(finished) // 3]):
        channel = 1
        expected = (output[..., channel] if output.dim() == 3 else output[:, channel]).flatten(1).sum(1)
        explanation = model.explain(x, target=Unit(name, channel=channel))
        torch.testing.assert_close(explanation.explained_output, expected, rtol=1e-10, atol=1e-12)
        assert explanation.explained_output.abs().min() > 0
        assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-10, name
        assert explanation.target.tolist() == [channel, channel]


def test_a_unit_at_one_position_and_a_selected_value(models):
    model = models["resnet"]
    x = images()
    name, output = next((n, o) for n, o in running_modules(model, x) if o.dim() == 4 and o.shape[1] >= 3 and min(o.shape[2:]) >= 3)
    at_position = model.explain(x, target=Unit(name, channel=2, position=(1, 2)))
    torch.testing.assert_close(at_position.explained_output, output[:, 2, 1, 2])
    assert completeness_error(at_position.contributions, at_position.explained_output) < 1e-10
    # a position's explanation only sees the pixels of its receptive field: most pixels give 0
    assert (at_position.contributions == 0).float().mean() > 0.3
    selected = model.explain(x, target=Unit(name, select=lambda out: out[:, :3].amax(dim=(2, 3)).sum(1)))
    torch.testing.assert_close(selected.explained_output, output[:, :3].amax(dim=(2, 3)).sum(1))
    assert completeness_error(selected.contributions, selected.explained_output) < 1e-10


def test_batched_unit_explanations_equal_single_ones(models):
    model = models["vit"]
    x = images(3)
    name = running_modules(model, x)[5][0]
    batched = model.explain(x, target=Unit(name, channel=4))
    for i in range(3):
        single = model.explain(x[i : i + 1], target=Unit(name, channel=4))
        torch.testing.assert_close(batched.contributions[i], single.contributions[0], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    "unit, error, message",
    [
        (lambda: Unit("backbone.no_such_module", channel=0), ValueError, r"no module named 'backbone\.no_such_module'"),
        (lambda: Unit(f"{RESNET_STAGES}.0", channel=10_000), ValueError, r"Channel 10000 is out of range: .*stages\.0 has \d+ channels"),
        (lambda: Unit(f"{RESNET_STAGES}.0", channel=0, position=(99, 0)), ValueError, r"Position \(99, 0\) is outside .*stages\.0's output grid"),
        (lambda: Unit(f"{RESNET_STAGES}.0"), ValueError, r"exactly one of channel .* or select"),
        (lambda: Unit(f"{RESNET_STAGES}.0", channel=-1), ValueError, r"channel must be a channel index >= 0"),
        (lambda: Unit(f"{RESNET_STAGES}.0", select=lambda out: out.sum()), ValueError, r"select must return one value per image"),
        (lambda: Unit(f"{RESNET_STAGES}.0", select=lambda out: out.detach().flatten(1).sum(1)), ValueError, r"does not depend on the pixels"),
        (lambda: Unit("backbone.model.unused", channel=0), ValueError, r"backbone\.model\.unused did not run in the forward pass"),
    ],
)
def test_bad_units_are_refused_in_one_line(models, unit, error, message):
    model = copy.deepcopy(models["resnet"])
    model.backbone.model.unused = torch.nn.Conv2d(1, 1, 1)  # a module its forward never calls
    with pytest.raises(error, match=message):
        model.explain(images(), target=unit())


def test_an_unknown_module_is_refused_before_any_forward(models):
    model = copy.deepcopy(models["resnet"])
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    with pytest.raises(ValueError, match=r"no module named 'backbone\.model\.resnet\.encoder\.stage\.0'\. Similar names: backbone\.model\.resnet\.encoder\.stages\.0"):
        model.explain(images(), target=Unit(f"{RESNET_STAGES[:-1]}.0", channel=0))
    assert calls == []


@pytest.mark.slow
def test_the_pipeline_and_the_cli_explain_a_unit(source_folders, tmp_path):
    folder = tmp_path / "model"
    bcosify_pretrained(source_folders["resnet"]).save_pretrained(folder)
    from PIL import Image

    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    image.save(tmp_path / "image.png")
    explain = pipeline("image-explanation", model=str(folder), trust_remote_code=True)
    result = explain(str(tmp_path / "image.png"), unit="backbone.model.resnet.encoder.stages.1:3")
    assert result["label"] == "backbone.model.resnet.encoder.stages.1:3" and result["target"] == 3
    assert result["completeness_error"] < 1e-4 * max(1.0, abs(result["explained_output"]))
    with pytest.raises(ValueError, match="unit and target both"):
        explain(str(tmp_path / "image.png"), unit="backbone.model.resnet.encoder.stages.1:3", target=0)

    cli = [sys.executable, "-m", "transformers_bcos.cli", "explain", str(folder), str(tmp_path / "image.png"), "--out", str(tmp_path / "out")]
    done = subprocess.run([*cli, "--unit", "backbone.model.resnet.encoder.stages.1:3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "explained backbone.model.resnet.encoder.stages.1:3: contributions sum to" in done.stdout and "unit value" in done.stdout
    refused = subprocess.run([*cli, "--unit", "backbone.model.resnet.encoder.stages.9:3", "--overwrite"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "no module named 'backbone.model.resnet.encoder.stages.9'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_unit_explanation_can_be_trained_through(models):
    """create_graph=True with a Unit target: the same contributions, with a graph to the parameters."""
    model = copy.deepcopy(models["convnext"])
    x = images()
    unit = Unit("backbone.model.convnext.encoder.stages.0", channel=1)
    plain = model.explain(x, target=unit)
    differentiable = model.explain(x, target=unit, create_graph=True)
    torch.testing.assert_close(differentiable.contributions.detach(), plain.contributions, rtol=1e-10, atol=1e-14)
    differentiable.contributions.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
