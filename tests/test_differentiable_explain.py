"""explain(create_graph=True): explanations that a loss can train through.

The contributions come with a graph to the parameters, and their gradient is the total
derivative of the plain explanation as a function of the parameters, θ -> explain(x; θ): the
dynamic factors are constant in the input, as always, but vary with θ. That definition is
checked literally: against central finite differences of the plain explain() in float64, on
ViT, DeiT, ResNet, ConvNeXt, the other families of the rules' test list, and B-cos CLIP.
"""

import copy

import pytest
import torch
from conftest import (
    FAMILIES,
    IMAGE_SIZE,
    RULE_FAMILIES,
    RULES_PROCESSOR,
    character_tokenizer,
    clip_image_processor,
    completeness_error,
    tiny_clip,
)

from transformers_bcos import bcosify_pretrained, layers, rules
from transformers_bcos.conversion.clip import bcosify_clip
from transformers_bcos.training.batchnorm import reestimate_batchnorm_statistics

ALL_FAMILIES = FAMILIES + RULE_FAMILIES
TARGETS = [1, 3]
# Central differences in float64. Piecewise linear activations (ReLU, ReLU6, max pooling) have
# kinks, and a step that crosses one errs in proportion to the step: MobileNetV2 3.6e-3 relative
# at 1e-6, 3.7e-5 at 1e-7, 3.8e-7 at 1e-8 (measured). At 1e-8 round-off (~1e-16/step, times the
# loss's conditioning) stays at 2e-7 (EfficientNet).
STEP = 1e-8
TOLERANCE = 1e-5


def random_images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def models(source_folders, rules_sources):
    """family -> a float64 B-cos model (b = 2, no biases). The rules families re-estimate their
    batch-norm statistics as the recipe does (EfficientNet's signal otherwise vanishes)."""
    built = {family: bcosify_pretrained(source_folders[family]) for family in FAMILIES}
    for family in RULE_FAMILIES:
        model = bcosify_pretrained(rules_sources[family], b=2, keep_bias=False, image_processor=RULES_PROCESSOR)
        reestimate_batchnorm_statistics(model, [random_images(8, seed=seed).float() for seed in range(10, 14)])
        built[family] = model
    return {family: model.double().eval() for family, model in built.items()}


def explanation_loss(contributions: torch.Tensor) -> torch.Tensor:
    """A loss on the explanation: the contributions weighted by a fixed random map."""
    weights = torch.randn(contributions.shape, generator=torch.Generator().manual_seed(7), dtype=contributions.dtype)
    return (contributions * weights).sum()


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_it_equals_the_plain_explanation_and_is_complete(family, models):
    model = models[family]
    model.train()
    x = random_images()
    plain = model.explain(x, target=TARGETS)
    with torch.no_grad():  # asked for explicitly, the graph comes even here
        differentiable = model.explain(x, target=TARGETS, create_graph=True)
    assert differentiable.contributions.requires_grad and not plain.contributions.requires_grad
    torch.testing.assert_close(differentiable.contributions, plain.contributions, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(differentiable.dynamic_linear_weights, plain.dynamic_linear_weights, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(differentiable.explained_output, plain.explained_output, rtol=1e-12, atol=0)
    assert torch.equal(differentiable.target, torch.tensor(TARGETS))
    assert completeness_error(differentiable.contributions, differentiable.explained_output) <= 1e-10
    # The contract of explain(): modes restored, parameters trainable, no gradients written.
    assert model.training
    model.eval()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not x.requires_grad and x.grad is None


@pytest.mark.parametrize("family", ["vit", "resnet", "dinov2", "efficientnet"])
def test_it_equals_the_plain_explanation_in_float32(family, models):
    model = copy.deepcopy(models[family]).float()
    x = random_images().float()
    plain = model.explain(x, target=TARGETS)
    differentiable = model.explain(x, target=TARGETS, create_graph=True)
    scale = plain.contributions.abs().max()
    assert (differentiable.contributions - plain.contributions).abs().max() <= 1e-5 * scale
    assert completeness_error(differentiable.contributions, differentiable.explained_output) <= 1e-5


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_its_gradient_reaches_every_parameter_the_output_depends_on(family, models):
    model = models[family]
    x = random_images()
    params = trainable(model)
    output_grads = torch.autograd.grad(model(x).logits.sum(), params, allow_unused=True)
    explanation_loss(model.explain(x, target=TARGETS, create_graph=True).contributions).backward()  # as training would
    explanation_grads = [p.grad for p in params]
    model.zero_grad(set_to_none=True)

    def reached(grads):
        return [g is not None and bool(g.abs().sum() > 0) for g in grads]

    assert any(reached(output_grads))
    assert reached(explanation_grads) == reached(output_grads)


def directional_derivative_by_differences(model, explain, direction) -> float:
    """(L(explain(θ + hv)) - L(explain(θ - hv))) / 2h for the plain explanation; θ restored exactly."""
    params = trainable(model)
    originals = [p.detach().clone() for p in params]
    losses = []
    try:
        for sign in (1, -1):
            with torch.no_grad():
                for p, original, v in zip(params, originals, direction):
                    p.copy_(original + sign * STEP * v)
            losses.append(explanation_loss(explain(create_graph=False)).item())
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
    return (losses[0] - losses[1]) / (2 * STEP)


def relative_errors(model, explain, seed: int = 0, directions: int = 2) -> list:
    """|autograd - finite differences| / max(|either|) of the loss's derivative along random
    directions of all parameters at once. ``explain(create_graph)`` returns the contributions."""
    params = trainable(model)
    grads = torch.autograd.grad(explanation_loss(explain(create_graph=True)), params, allow_unused=True)
    generator = torch.Generator().manual_seed(seed)
    errors = []
    for _ in range(directions):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        by_autograd = sum(float((g * v).sum()) for g, v in zip(grads, direction) if g is not None)
        by_differences = directional_derivative_by_differences(model, explain, direction)
        errors.append(abs(by_autograd - by_differences) / max(abs(by_autograd), abs(by_differences)))
    return errors


def classifier_explanation(model, x):
    return lambda create_graph: model.explain(x, target=TARGETS, create_graph=create_graph).contributions


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_its_gradient_is_the_derivative_of_the_plain_explanation(family, models):
    model = models[family]
    errors = relative_errors(model, classifier_explanation(model, random_images()))
    assert max(errors) < TOLERANCE, errors


@pytest.mark.parametrize("family", ["vit", "resnet", "swin"])
def test_factors_held_constant_in_the_parameters_fail_the_check(family, models, monkeypatch):
    """The check can fail: with the dynamic factors detached from the parameters too (the
    gradient with the factors held at their values) the derivative is another one."""
    original = layers.explanation_constant

    def detached(compute, *tensors):
        return original(compute, *tensors).detach()

    monkeypatch.setattr(layers, "explanation_constant", detached)
    monkeypatch.setattr(rules, "explanation_constant", detached)
    model = models[family]
    assert min(relative_errors(model, classifier_explanation(model, random_images()))) > 0.1  # measured: 0.45 to 1.0


# ------------------------------------------------------------------------------ B-cos CLIP

TEXTS = ["a red square", "blue"]


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    """A float64 B-cos CLIP (b = 2) whose text tower is frozen, as conversion leaves it."""
    tokenizer = character_tokenizer(tmp_path_factory.mktemp("clip_vocab"))
    model = bcosify_clip(tiny_clip(tokenizer), b=2.0, image_processor=clip_image_processor(), tokenizer=tokenizer)
    return model.double().eval()


def clip_explanation(model, x, cosine_power):
    return lambda create_graph: model.explain(x, text=TEXTS, cosine_power=cosine_power, create_graph=create_graph).contributions


@pytest.mark.parametrize("cosine_power", [1.0, 3.0])
def test_clip_explanation_is_differentiable_and_its_gradient_the_plain_ones_derivative(cosine_power, clip_model):
    x = random_images()
    plain = clip_model.explain(x, text=TEXTS, cosine_power=cosine_power)
    differentiable = clip_model.explain(x, text=TEXTS, cosine_power=cosine_power, create_graph=True)
    torch.testing.assert_close(differentiable.contributions, plain.contributions, rtol=1e-12, atol=1e-14)
    assert completeness_error(differentiable.contributions, differentiable.explained_output) <= 1e-10
    assert all(p.grad is None for p in clip_model.parameters())

    explanation_loss(differentiable.contributions).backward()
    image_tower = trainable(clip_model)
    assert image_tower and all(p.grad is not None and p.grad.abs().sum() > 0 for p in image_tower if p is not clip_model.logit_scale)
    clip_model.zero_grad(set_to_none=True)

    errors = relative_errors(clip_model, clip_explanation(clip_model, x, cosine_power))
    assert max(errors) < TOLERANCE, errors
