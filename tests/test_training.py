"""Unit tests of transformers_bcos.training: AGC, BN re-estimation, loss, recipe, checkpoints, model card."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import RULE_FAMILY_CONFIGS, RULES_PROCESSOR, completeness_error
from torch import nn
from transformers import AutoConfig, ResNetConfig

from transformers_bcos import BcosConfig, BcosForImageClassification, bcosify_pretrained
from transformers_bcos.layers import BcosBatchNorm2d
from transformers_bcos.modeling_bcos import bcos_bce_loss
from transformers_bcos.training import (
    CheckpointError,
    CheckpointManager,
    TrainingPosition,
    adapt_classifier_to_labels,
    adaptive_gradient_clipping_,
    create_optimizer,
    create_scheduler,
    recipe_defaults,
    recipe_family,
    reestimate_batchnorm_statistics,
)
from transformers_bcos.training import bcos_bce_loss as exported_loss
from transformers_bcos.training.checkpointing import LATEST_FILENAME, STAGING_PREFIX, read_position
from transformers_bcos.training.finetune import FinetuneOptions, OptionsError, validate_options
from transformers_bcos.model_card import IMAGE_CLASSIFICATION_TEMPLATE, fill_template, template_placeholders

# ----------------------------------------------------------------------------------------------
# Adaptive gradient clipping
# ----------------------------------------------------------------------------------------------


def _reference_agc(weight: torch.Tensor, grad: torch.Tensor, clip: float, eps: float) -> torch.Tensor:
    """AGC written unit by unit, the slow obvious way."""
    if weight.dim() <= 1:
        units_w, units_g = [weight.flatten()], [grad.flatten()]
    else:
        units_w, units_g = list(weight.flatten(1)), list(grad.flatten(1))
    out = []
    for w, g in zip(units_w, units_g):
        max_norm = clip * max(w.norm().item(), eps)
        out.append(g * (max_norm / g.norm().item()) if g.norm().item() > max_norm else g)
    return torch.stack(out).view_as(grad) if weight.dim() > 1 else out[0].view_as(grad)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7), (9,)])
def test_agc_clips_each_unit_to_clip_factor_times_its_weight_norm(shape):
    torch.manual_seed(0)
    parameter = nn.Parameter(torch.randn(shape))
    grad = torch.randn(shape) * 0.05
    if len(shape) > 1:
        grad[0] *= 100  # this unit's gradient is far too large
        grad[1] *= 1e-4  # this one is small enough to stay as it is
        parameter.data[2] = 0.0  # zero weights: the eps floor keeps the unit trainable
    parameter.grad = grad.clone()
    clipped = adaptive_gradient_clipping_([parameter], clip_factor=0.01, eps=1e-3)
    expected = _reference_agc(parameter.detach(), grad, 0.01, 1e-3)
    torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-8)
    if len(shape) > 1:
        assert torch.equal(parameter.grad[1], grad[1])
        assert parameter.grad[0].norm() == pytest.approx(0.01 * parameter[0].norm().item(), rel=1e-5)
        assert parameter.grad[2].norm() == pytest.approx(0.01 * 1e-3, rel=1e-5)
        assert clipped == sum(1 for g, e in zip(grad, expected) if not torch.equal(g, e))


def test_agc_skips_parameters_without_gradients_and_rejects_a_bad_factor():
    frozen = nn.Parameter(torch.ones(3))
    assert adaptive_gradient_clipping_([frozen]) == 0 and frozen.grad is None
    with pytest.raises(ValueError, match="clip_factor"):
        adaptive_gradient_clipping_([frozen], clip_factor=0)


# ----------------------------------------------------------------------------------------------
# BatchNorm re-estimation
# ----------------------------------------------------------------------------------------------


class _TwoNorms(nn.Module):
    """conv -> uncentered B-cos BN -> dropout -> standard BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bcos_norm = BcosBatchNorm2d(4, momentum=0.1)
        self.dropout = nn.Dropout(0.5)
        self.norm = nn.BatchNorm2d(4, momentum=0.3)

    def forward(self, pixel_values):
        return self.norm(self.dropout(self.bcos_norm(self.conv(pixel_values))))


def _per_batch_average(batches, fn):
    """The cumulative average of per-batch unbiased variances/means, as momentum=None computes it."""
    means, variances = [], []
    for x in batches:
        y = fn(x)
        n = y.numel() // y.shape[1]
        means.append(y.mean(dim=(0, 2, 3)))
        variances.append(y.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_bn_reestimation_recomputes_statistics_without_touching_weights():
    torch.manual_seed(0)
    model = _TwoNorms().eval()
    for norm in (model.bcos_norm, model.norm):
        norm.running_var.fill_(123.0)  # stale statistics, e.g. from the source model
        norm.running_mean.fill_(-5.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = [torch.rand(8, 3, 6, 6) * (1 + i) for i in range(5)]
    dataloader = [{"pixel_values": x, "labels": torch.zeros(8)} for x in batches]

    used = reestimate_batchnorm_statistics(model, dataloader, num_images=8 * 4)

    assert used == 32  # the fifth batch is never read
    expected_mean, expected_var = _per_batch_average(batches[:4], model.conv)
    torch.testing.assert_close(model.bcos_norm.running_var, expected_var, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.bcos_norm.running_mean, expected_mean, rtol=1e-4, atol=1e-6)
    # The second norm sees the first one's output with its *batch* statistics, dropout off.
    def second_input(x):
        y = model.conv(x)
        return y * torch.rsqrt(y.var(dim=(0, 2, 3), unbiased=False) + 1e-5).view(1, -1, 1, 1) * model.bcos_norm.weight.view(1, -1, 1, 1)

    _, expected_var2 = _per_batch_average(batches[:4], second_input)
    torch.testing.assert_close(model.norm.running_var, expected_var2, rtol=1e-4, atol=1e-6)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert (model.bcos_norm.momentum, model.norm.momentum) == (0.1, 0.3)
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_bn_reestimation_limits_and_modes():
    model = _TwoNorms().train()
    batches = [torch.rand(4, 3, 5, 5) for _ in range(6)]
    assert reestimate_batchnorm_statistics(model, batches, num_batches=2) == 8
    assert reestimate_batchnorm_statistics(model, [(x, None) for x in batches], num_images=10) == 10
    assert reestimate_batchnorm_statistics(model, batches) == 24
    assert all(m.training for m in model.modules())  # modes are restored, not forced to eval
    assert int(model.norm.num_batches_tracked) == 6
    assert reestimate_batchnorm_statistics(nn.Linear(2, 2), batches) == 0  # nothing to re-estimate
    with pytest.raises(ValueError, match="no images"):
        reestimate_batchnorm_statistics(model, [])


def test_bn_reestimation_fits_a_freshly_bcosified_cnn_to_its_activations(source_folders, mnist_images):
    """Reference §7: the source's statistics do not fit a B-cosified CNN; re-estimated ones do.

    Re-estimated on one batch, the eval-mode model (running statistics) must compute what the
    train-mode model (that batch's own statistics) computes on the same images.
    """
    model = bcosify_pretrained(source_folders["resnet"], b=2.0)
    images, _ = mnist_images

    def eval_and_batch_statistics_logits():
        with torch.no_grad():
            return model.eval()(pixel_values=images).logits - model.config.logit_bias, model.train()(
                pixel_values=images
            ).logits - model.config.logit_bias

    stale_eval, batch = eval_and_batch_statistics_logits()
    assert (stale_eval - batch).norm() > 0.5 * batch.norm()  # the copied statistics are far off
    model.eval()
    assert reestimate_batchnorm_statistics(model, [images], num_batches=1) == len(images)
    fitted_eval, batch = eval_and_batch_statistics_logits()
    # Equal up to the unbiased/biased variance factor n/(n-1) per layer.
    torch.testing.assert_close(fitted_eval, batch, rtol=0.05, atol=0.01 * batch.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Loss, recipe, optimizer, schedule
# ----------------------------------------------------------------------------------------------


def test_training_uses_the_bcos_loss_with_one_over_c_off_labels():
    assert exported_loss is bcos_bce_loss
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 4, 1])
    targets = torch.full((4, 5), 1 / 5)
    targets[torch.arange(4), labels] = 1.0
    assert bcos_bce_loss(logits, labels) == pytest.approx(F.binary_cross_entropy_with_logits(logits, targets).item())
    config = BcosConfig(backbone_config=ResNetConfig(embedding_size=4, hidden_sizes=[4], depths=[1]), num_labels=5)
    model = BcosForImageClassification(config).eval()
    out = model(pixel_values=torch.rand(2, 3, 16, 16), labels=torch.tensor([1, 2]))
    assert out.loss.item() == pytest.approx(bcos_bce_loss(out.logits, torch.tensor([1, 2])).item())
    assert torch.sigmoid(torch.tensor(config.logit_bias)) == pytest.approx(1 / 5)


def test_recipe_defaults_follow_the_reference():
    cnn, vit = recipe_defaults("cnn"), recipe_defaults("vit")
    assert (cnn.learning_rate, cnn.weight_decay, cnn.warmup_fraction, cnn.agc_clip_factor) == (1e-4, 0.0, 0.0, 0.01)
    assert cnn.bn_reestimation_images > 0 and vit.bn_reestimation_images == 0
    assert vit.learning_rate == 1e-3 and vit.warmup_fraction > 0
    assert recipe_defaults("cnn", small_data=True).learning_rate == 1e-3  # calibrated on MNIST (§7)
    assert recipe_defaults("cnn", from_scratch=True).warmup_fraction == pytest.approx(5 / 90)
    with pytest.raises(ValueError, match="Unknown model family"):
        recipe_defaults("vgg")


@pytest.mark.parametrize(
    "model_type, family",
    [
        ("vit", "vit"),
        ("deit", "vit"),
        ("dinov2", "vit"),
        ("swin", "vit"),
        ("siglip", "vit"),
        ("resnet", "cnn"),
        ("convnext", "cnn"),
        ("regnet", "cnn"),
        ("efficientnet", "cnn"),
    ],
)
def test_recipe_family_is_by_kind(model_type, family):
    """Architectures train as ViTs when they have attention heads (SigLIP's are in its vision
    sub-config), else as CNNs."""
    config = BcosConfig(backbone_config=AutoConfig.for_model(model_type, **RULE_FAMILY_CONFIGS.get(model_type, {})))
    assert recipe_family(config) == family
    assert recipe_defaults(family) is recipe_defaults("vit" if family == "vit" else "cnn")


def test_optimizer_excludes_gains_from_weight_decay_and_scheduler_warms_up_then_decays():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = create_optimizer(model, learning_rate=1e-3, weight_decay=0.05)
    decays = {tuple(p.shape): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {(3, 3): 0.05, (3,): 0.0}
    scheduler = create_scheduler(optimizer, "cosine", num_warmup_steps=2, num_training_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and rates[2] == pytest.approx(1e-3) and rates[-1] < 1e-4
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))
    # Under Accelerate a prepared scheduler steps once per process: the counts are scaled.
    doubled = create_scheduler(create_optimizer(model, 1e-3), "linear", 2, 10, num_processes=2)
    assert doubled.lr_lambdas[0](4) == pytest.approx(1.0)


def test_adapt_classifier_to_new_labels_keeps_explanations_complete(source_folders, mnist_images):
    model = bcosify_pretrained(source_folders["resnet"], b=2.0)
    assert not adapt_classifier_to_labels(model, [model.config.id2label[i] for i in range(model.config.num_labels)])
    assert adapt_classifier_to_labels(model, ["cat", "dog", "bird"])
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "bird"} and model.config.label2id["bird"] == 2
    assert model.config.logit_bias == pytest.approx(-math.log(2))
    images, _ = mnist_images
    explanation = model.double().explain(images[:3].double(), target="dog")
    assert explanation.logits.shape == (3, 3)
    torch.testing.assert_close(explanation.contributions.sum((1, 2)), explanation.explained_output, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("family", ["dinov2", "regnet"])
def test_adapting_a_rules_family_model_to_new_labels_replaces_only_its_head(family, rules_sources, mnist_images):
    """Labels of the same number but other names still get a new head (found by shape, as heads
    differ by family); every other tensor is kept, and explanations stay complete."""
    model = bcosify_pretrained(rules_sources[family], image_processor=RULES_PROCESSOR)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not adapt_classifier_to_labels(model, [model.config.id2label[i] for i in range(model.config.num_labels)])
    renamed = ["a", "b", "c", "d", "e"]
    assert adapt_classifier_to_labels(model, renamed)
    after = model.state_dict()
    assert after.keys() == before.keys() and model.config.id2label == dict(enumerate(renamed))
    head = {key for key in before if key.startswith("backbone.model.classifier.") and key.endswith("weight")}
    assert head and all(not torch.equal(after[key], before[key]) for key in head)
    assert all(torch.equal(after[key], before[key]) for key in before if not key.startswith("backbone.model.classifier."))
    assert adapt_classifier_to_labels(model, ["cat", "dog", "bird"])
    assert model.config.logit_bias == pytest.approx(-math.log(2))
    explanation = model.double().explain(mnist_images[0][:3].double(), target="dog")
    assert explanation.logits.shape == (3, 3)
    assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-10


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def accelerator_with_model():
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    yield accelerator, model, optimizer
    accelerator.end_training()


def _step(model, optimizer):
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoints_rotate_and_latest_names_the_newest(tmp_path, accelerator_with_model):
    accelerator, model, optimizer = accelerator_with_model
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    assert manager.latest() is None
    saved = {}
    for step in (1, 2, 3, 4):
        _step(model, optimizer)
        saved[step] = model.weight.detach().clone()
        manager.save(accelerator, f"step_{step:08d}", TrainingPosition(step, 0, step, False, {"loss": step}))
    names = sorted(os.listdir(manager.directory))
    assert names == ["latest", "step_00000003", "step_00000004"]
    assert manager.latest() == os.path.join(manager.directory, "step_00000004")
    assert read_position(manager.latest()).metrics == {"loss": 4}
    assert os.path.isfile(os.path.join(manager.latest(), "model.safetensors"))
    # Loading the checkpoint restores the weights of that step.
    _step(model, optimizer)
    accelerator.load_state(manager.resolve("latest"))
    assert torch.equal(model.weight, saved[4])


def test_an_interrupted_save_never_moves_latest(tmp_path, accelerator_with_model, monkeypatch):
    accelerator, model, optimizer = accelerator_with_model
    manager = CheckpointManager(str(tmp_path), keep_last=3)
    manager.save(accelerator, "step_00000001", TrainingPosition(1, 0, 1))

    def killed(*args):
        raise KeyboardInterrupt  # the process dies after writing the state, before the rename

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(accelerator, "step_00000002", TrainingPosition(2, 0, 2))
    monkeypatch.undo()
    assert os.path.isdir(os.path.join(manager.directory, STAGING_PREFIX + "step_00000002"))
    assert manager.latest().endswith("step_00000001")
    assert [os.path.basename(p) for p in manager.complete_checkpoints()] == ["step_00000001"]

    def killed_while_pointing(source, target):
        raise KeyboardInterrupt  # dies while replacing "latest"

    monkeypatch.setattr(os, "replace", killed_while_pointing)
    with pytest.raises(KeyboardInterrupt):
        manager.save(accelerator, "step_00000003", TrainingPosition(3, 0, 3))
    monkeypatch.undo()
    with open(os.path.join(manager.directory, LATEST_FILENAME)) as f:
        assert f.read() == "step_00000001\n"  # still complete, still readable
    manager.remove_leftovers()
    assert not [n for n in os.listdir(manager.directory) if n.startswith(".")]


def test_resuming_from_an_older_checkpoint_abandons_the_newer_ones(tmp_path, accelerator_with_model):
    accelerator, model, optimizer = accelerator_with_model
    manager = CheckpointManager(str(tmp_path), keep_last=5)
    for step in (1, 2, 3):
        manager.save(accelerator, f"step_{step:08d}", TrainingPosition(step, 0, step))
    older = os.path.join(manager.directory, "step_00000001")
    manager.abandon_newer_than(older)
    assert manager.latest() == older
    assert manager.complete_checkpoints() == [older]


def test_bad_checkpoints_are_reported(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        manager.resolve("latest")
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        manager.resolve(str(tmp_path))
    os.makedirs(manager.directory)
    with open(os.path.join(manager.directory, LATEST_FILENAME), "w") as f:
        f.write("step_00000009\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.latest()
    assert TrainingPosition(10, 1, 5, False).resume_point() == (1, 5)
    assert TrainingPosition(10, 1, 5, True).resume_point() == (2, 0)


# ----------------------------------------------------------------------------------------------
# Options, model card
# ----------------------------------------------------------------------------------------------


def test_an_output_dir_holding_another_run_is_refused_before_any_work(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OptionsError, match="already holds files.*--overwrite_output_dir"):
        validate_options(FinetuneOptions(output_dir=str(tmp_path)))
    validate_options(FinetuneOptions(output_dir=str(tmp_path), overwrite_output_dir=True))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        validate_options(FinetuneOptions(output_dir=str(tmp_path), resume_from_checkpoint="latest"))
    with pytest.raises(OptionsError, match="either --model.*or --from_scratch"):
        validate_options(FinetuneOptions(output_dir=str(tmp_path / "new"), model="x", from_scratch="resnet"))
    with pytest.raises(OptionsError, match="--learning_rate must be a finite number > 0"):
        validate_options(FinetuneOptions(output_dir=str(tmp_path / "new"), learning_rate=0.0))
    with pytest.raises(OptionsError, match="HF_HUB_OFFLINE"):
        validate_options(FinetuneOptions(output_dir=str(tmp_path / "new"), push_to_hub=True, hub_model_id="a/b"))


def test_model_card_template_renders_every_placeholder(tmp_path):
    names = template_placeholders(open(IMAGE_CLASSIFICATION_TEMPLATE).read())
    assert {"results_rows", "repo_id", "labels"} <= names
    card = fill_template({name: f"<{name}>" for name in names})
    assert "{{" not in card and "<results_rows>" in card and card.startswith("---\n")
    with pytest.raises(KeyError, match="without values.*'repo_id'"):
        fill_template({name: "" for name in names - {"repo_id"}})
    with pytest.raises(KeyError, match="without placeholders.*'extra'"):
        fill_template({**{name: "" for name in names}, "extra": 1})
    template = tmp_path / "card.md"
    template.write_text("# {{ title }}\n")
    assert fill_template({"title": "T"}, str(template)) == "# T\n"
    with pytest.raises(FileNotFoundError, match="--model_card_template"):
        fill_template({}, str(tmp_path / "missing.md"))
