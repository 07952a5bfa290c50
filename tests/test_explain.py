"""explain(): exact completeness on every family, batching, side effects, homogeneity, targets."""

import pytest
import torch
from conftest import FAMILIES, NUM_LABELS, completeness_error

from transformers_bcos import bcosify_pretrained, explanation_mode
from transformers_bcos.layers import ExplainableModule
from transformers_bcos.rules import GatedActivation

MIXED_TARGETS = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])


@pytest.fixture(scope="module")
def models(source_folders):
    """family -> {setting: converted model}; settings are the B-cos default and b=1 without biases."""
    return {
        family: {
            "b2": bcosify_pretrained(source_folders[family]),
            "b1_no_bias": bcosify_pretrained(source_folders[family], b=1.0, keep_bias=False),
        }
        for family in FAMILIES
    }


@pytest.mark.parametrize("setting", ["b2", "b1_no_bias"])
@pytest.mark.parametrize("family", FAMILIES)
def test_contributions_sum_to_the_explained_output(family, setting, models, mnist_images):
    model = models[family][setting]
    x = mnist_images[0][:8]
    e = model.explain(x, target=MIXED_TARGETS)
    assert e.contributions.shape == (8, 32, 32)
    assert e.dynamic_linear_weights.shape == (8, 6, 32, 32)
    assert torch.equal(e.target, MIXED_TARGETS)
    expected = e.logits.gather(1, MIXED_TARGETS[:, None]).squeeze(1) - model.config.logit_bias
    torch.testing.assert_close(e.explained_output, expected)
    assert completeness_error(e.contributions, e.explained_output) <= 1e-5
    if setting == "b1_no_bias":  # large activations: an undetached gate would show here
        assert e.explained_output.abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_completeness_is_exact_in_float64(family, models, mnist_images):
    model = models[family]["b1_no_bias"].double()
    try:
        e = model.explain(mnist_images[0][:4].double(), target=1)
        assert completeness_error(e.contributions, e.explained_output) <= 1e-10
    finally:
        model.float()


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_an_undetached_gate_breaks_completeness(family, models, mnist_images, monkeypatch):
    """The completeness test can fail: with the activation gate left attached it does."""
    monkeypatch.setattr(GatedActivation, "forward", lambda self, x: self.activation(x))
    e = models[family]["b1_no_bias"].double().explain(mnist_images[0][:4].double(), target=1)
    models[family]["b1_no_bias"].float()
    assert completeness_error(e.contributions, e.explained_output) > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_is_batched(family, models, mnist_images):
    model = models[family]["b2"]
    x = mnist_images[0][:4]
    batch = model.explain(x, target=[0, 1, 2, 3])
    for i in range(4):
        single = model.explain(x[i : i + 1], target=i)
        torch.testing.assert_close(batch.contributions[i], single.contributions[0], rtol=1e-4, atol=1e-9)


def test_explain_has_no_side_effects_and_repeats(models, mnist_images):
    model = models["vit"]["b2"]
    model.train()
    x = mnist_images[0][:3].clone()
    first = model.explain(x, target=2)
    second = model.explain(x, target=2)
    torch.testing.assert_close(first.dynamic_linear_weights, second.dynamic_linear_weights, rtol=0, atol=0)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # frozen only while explaining
    assert x.grad is None and not x.requires_grad
    assert not any(m.explanation_mode for m in model.modules() if isinstance(m, ExplainableModule))
    model.eval()
    with torch.no_grad():
        under_no_grad = model.explain(x, target=2)
    torch.testing.assert_close(under_no_grad.contributions, first.contributions)
    with explanation_mode(model):  # a mode set by the caller is restored, not reset
        model.explain(x, target=2)
        assert all(m.explanation_mode for m in model.modules() if isinstance(m, ExplainableModule))


def _homogeneity_ratio(model, x, alpha):
    x6 = torch.cat([x, 1 - x], dim=1)
    base = model.explain(encoded_pixel_values=x6, target=1).explained_output
    scaled = model.explain(encoded_pixel_values=alpha * x6, target=1).explained_output
    return scaled / base


@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_batchnorm_models_are_positively_homogeneous(alpha, models, mnist_images):
    """Without biases every piece of a B-cos ResNet (B-cos conv, uncentered BN at inference,
    ReLU, max-pool, residual sums) is degree-1 homogeneous, so the whole network is. The only
    deviation is the 1e-12 inside the input norms, which matters where activations are tiny
    (freshly converted or random b=2 models), hence a 1e-3 tolerance; a bias breaks it by far more."""
    from transformers_bcos import BcosConfig, BcosForImageClassification

    from_scratch = BcosForImageClassification(BcosConfig(backbone_config=models["resnet"]["b2"].config.backbone_config)).eval()
    for model in (models["resnet"]["b2"], models["resnet"]["b1_no_bias"], from_scratch):
        ratio = _homogeneity_ratio(model, mnist_images[0][:4], alpha)
        torch.testing.assert_close(ratio, torch.full_like(ratio, alpha), rtol=1e-3, atol=0)


@pytest.mark.parametrize("b", [1.0, 1.5, 2.0])
def test_bcos_layers_are_positively_homogeneous(b):
    from transformers_bcos.layers import BcosConv2d, BcosLinear

    torch.manual_seed(0)
    for layer, x in ((BcosConv2d(6, 4, 3, padding=1, groups=2, b=b), torch.rand(2, 6, 8, 8)), (BcosLinear(6, 4, b=b), torch.rand(3, 6))):
        torch.testing.assert_close(layer(2.5 * x).double(), 2.5 * layer(x).double(), rtol=1e-4, atol=1e-6)


def test_target_forms(models, mnist_images):
    model = models["resnet"]["b2"]
    x = mnist_images[0][:3]
    predicted = model.explain(x)
    assert torch.equal(predicted.target, predicted.logits.argmax(1))
    assert torch.equal(model.explain(x, target="class_2").target, torch.tensor([2, 2, 2]))
    assert torch.equal(model.explain(x, target=["class_1", 0, 4]).target, torch.tensor([1, 0, 4]))
    assert torch.equal(model.explain(x, target=torch.tensor(3)).target, torch.tensor([3, 3, 3]))


@pytest.mark.parametrize(
    "target,error,match",
    [
        (NUM_LABELS, ValueError, "out of range"),
        (-1, ValueError, "out of range"),
        ("zebra", ValueError, "Unknown label 'zebra'"),
        ([0, 1], ValueError, "2 targets for a batch of 3"),
        (torch.tensor([0.5, 1.0, 2.0]), TypeError, "integer"),
        (1.5, TypeError, "int class index or a label name"),
    ],
)
def test_bad_targets_are_refused(target, error, match, models, mnist_images):
    with pytest.raises(error, match=match):
        models["resnet"]["b2"].explain(mnist_images[0][:3], target=target)


def test_to_rgba_follows_the_reference_recipe(models, mnist_images):
    e = models["convnext"]["b2"].explain(mnist_images[0][:2], target=[0, 1])
    rgba = e.to_rgba()
    assert rgba.shape == (2, 32, 32, 4)
    assert rgba.min() >= 0 and rgba.max() <= 1
    # opacity is zero wherever the pixel's contribution is negative (no smoothing to blur it)
    negative = (e.contributions < 0).numpy()
    assert (e.to_rgba(smoothing=1)[..., 3][negative] == 0).all()
