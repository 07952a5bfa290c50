"""What an explanation sums to, and how precisely (issue 16, item 6).

explain() reads the explained output from the model's ``bias_free_logits`` (W(x)·x, before the
fixed logit bias), never as ``logits - logit_bias``: for a freshly converted or randomly
initialised model W(x)·x can be 1e-5 or 1e-9 next to a bias of -log(C-1) = -1.39, and the float32
difference kept few or none of its digits. Completeness is measured by `completeness_error`
(relative to max(|output|, Σ|contributions|)) for every family, trained, converted or built from
a config, at any output scale; half precision keeps to `half_precision_completeness_bound`.
"""

import warnings

import pytest
import torch
from conftest import (
    FAMILIES,
    NUM_LABELS,
    character_tokenizer,
    clip_image_processor,
    completeness_error,
    half_precision_completeness_bound,
    tiny_clip,
)
from transformers import ConvNextConfig, DeiTConfig, ResNetConfig, ViTConfig

from transformers_bcos import BcosConfig, BcosForImageClassification, bcosify_pretrained
from transformers_bcos.conversion.clip import bcosify_clip
from transformers_bcos.layers import BcosLinear
from transformers_bcos.modeling_bcos import BcosImageClassifierOutput

TARGETS = torch.arange(8) % NUM_LABELS
SETTINGS = ["converted", "output 1e-5", "from config", "trained", "b1"]
TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def from_config(family: str) -> BcosForImageClassification:
    """A B-cos model with random weights, the B-cos-from-scratch baseline (default ResNet and
    ConvNeXt widths: their outputs are ~1e-9 next to the bias)."""
    backbone = {
        "vit": lambda: ViTConfig(**TINY_VIT),
        "deit": lambda: DeiTConfig(**TINY_VIT),
        "resnet": lambda: ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128]),
        "convnext": lambda: ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
    }[family]()
    torch.manual_seed(0)
    return BcosForImageClassification(BcosConfig(backbone_config=backbone, num_labels=NUM_LABELS))


def trained(model, images, labels, steps: int = 5) -> BcosForImageClassification:
    """A few Adam steps on real digits: the weights leave their converted values."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(images, labels=labels % NUM_LABELS).loss.backward()
        optimizer.step()
    return model.eval()


def scaled_to(model, images, size: float) -> BcosForImageClassification:
    """The classifier (b = 2: outputs scale with its weight squared) scaled so that the largest
    bias-free logit on ``images`` is ``size``."""
    with torch.no_grad():
        largest = model(images).bias_free_logits.abs().max()
        head = [module for module in model.modules() if isinstance(module, BcosLinear)][-1]  # the source's classifier
        head.weight.mul_((size / largest).sqrt())
    return model


@pytest.fixture(scope="module")
def models(source_folders, mnist_images):
    images, labels = mnist_images[0][:8], mnist_images[1][:8]
    built = {}
    for family in FAMILIES:
        folder = source_folders[family]
        built[family, "converted"] = bcosify_pretrained(folder)
        built[family, "output 1e-5"] = scaled_to(bcosify_pretrained(folder), images, 1e-5)
        built[family, "from config"] = from_config(family)
        built[family, "trained"] = trained(bcosify_pretrained(folder), images, labels)
        built[family, "b1"] = bcosify_pretrained(folder, b=1.0)
    return built


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    tokenizer = character_tokenizer(tmp_path_factory.mktemp("vocab"))
    return bcosify_clip(tiny_clip(tokenizer), tokenizer=tokenizer, image_processor=clip_image_processor())


def explain(model, images, dtype=torch.float32):
    """The explanation of ``images`` by ``model`` cast to ``dtype`` (cast back afterwards), and
    the warnings it gave."""
    try:
        model.to(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if isinstance(model, BcosForImageClassification):
                e = model.explain(images.to(dtype), target=TARGETS[: len(images)])
            else:
                e = model.explain(images.to(dtype), text=["a dog", "seven", "a red car"])
        return e, [str(w.message) for w in caught]
    finally:
        model.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_forward_pass_returns_the_logits_without_the_bias(family, models, mnist_images):
    model = models[family, "converted"]
    out = model(mnist_images[0][:4])
    assert isinstance(out, BcosImageClassifierOutput)
    torch.testing.assert_close(out.logits, out.bias_free_logits + model.config.logit_bias, rtol=0, atol=0)
    e = model.explain(mnist_images[0][:4], target=TARGETS[:4])
    # Explanation mode computes the same values by other fast paths: equal up to rounding.
    torch.testing.assert_close(e.explained_output, out.bias_free_logits.gather(1, TARGETS[:4, None]).squeeze(1))
    (logits,) = model(mnist_images[0][:4], return_dict=False)  # the tuple is unchanged
    assert torch.equal(logits, out.logits)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_completeness_in_float32_at_any_output_scale(family, setting, models, mnist_images):
    e, _ = explain(models[family, setting], mnist_images[0][:8])
    assert e.contributions.dtype == e.explained_output.dtype == torch.float32
    assert e.explained_output.abs().max() > 0
    assert completeness_error(e.contributions, e.explained_output) <= half_precision_completeness_bound(torch.float32)


def test_clip_completeness_in_float32(clip_model, mnist_images):
    e, _ = explain(clip_model, mnist_images[0][:4])
    assert completeness_error(e.contributions, e.explained_output) <= half_precision_completeness_bound(torch.float32)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_the_bias_once_swallowed_a_small_output(family, models, mnist_images):
    """Why the explained output is not ``logits - logit_bias``: for an output of 1e-5 next to a
    bias of -1.39 that float32 difference is off by far more than the completeness bound (so the
    test above would fail with it), while the bias-free logits sum exactly."""
    model = models[family, "output 1e-5"]
    assert abs(model.config.logit_bias) > 1
    e, _ = explain(model, mnist_images[0][:8])
    difference = e.logits.gather(1, e.target[:, None]).squeeze(1) - model.config.logit_bias
    assert completeness_error(e.contributions, difference) > 100 * half_precision_completeness_bound(torch.float32)
    assert completeness_error(e.contributions, e.explained_output) <= half_precision_completeness_bound(torch.float32)


def _in_float16_range(output: torch.Tensor) -> torch.Tensor:
    return output.abs() >= torch.finfo(torch.float16).tiny


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_keeps_its_stated_bound(family, setting, dtype, models, mnist_images):
    """bfloat16 at any scale; float16 for outputs at or above its smallest normal number, and a
    warning where any lies below. Contributions and outputs come back in float32."""
    e, messages = explain(models[family, setting], mnist_images[0][:8], dtype)
    assert e.contributions.dtype == e.dynamic_linear_weights.dtype == e.explained_output.dtype == torch.float32
    kept = _in_float16_range(e.explained_output) if dtype == torch.float16 else torch.ones(8, dtype=torch.bool)
    assert any("below float16's smallest normal number" in m for m in messages) == (not kept.all())
    if kept.any():
        assert completeness_error(e.contributions[kept], e.explained_output[kept]) <= half_precision_completeness_bound(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_half_precision_keeps_its_stated_bound(dtype, clip_model, mnist_images):
    e, _ = explain(clip_model, mnist_images[0][:4], dtype)
    assert completeness_error(e.contributions, e.explained_output) <= half_precision_completeness_bound(dtype)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_float16_weights_are_not_flushed_to_zero(family, models, mnist_images):
    """A converted ViT's outputs (~1e-3) spread over 6·32·32 inputs put W(x) near 1e-7, below
    float16's smallest normal number: seeded with 1 its backward flushed whole images' weights to
    zero. Seeded with a power of two per image, they match float32's."""
    model, images = models[family, "converted"], mnist_images[0][:8]
    (want, _), (got, _) = explain(model, images), explain(model, images, torch.float16)
    kept = _in_float16_range(got.explained_output)
    assert kept.sum() >= 4
    assert want.dynamic_linear_weights[kept].abs().max() < 1e-3  # the magnitudes that underflowed
    cosine = torch.nn.functional.cosine_similarity(got.dynamic_linear_weights[kept].flatten(1), want.dynamic_linear_weights[kept].flatten(1))
    assert cosine.min() > 0.999


def test_float16_outputs_below_its_range_are_announced(models, mnist_images):
    model = models["resnet", "output 1e-5"].half()
    try:
        with pytest.warns(UserWarning, match="below float16's smallest normal number"):
            model.explain(mnist_images[0][:4].half(), target=0)
    finally:
        model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models["resnet", "output 1e-5"].explain(mnist_images[0][:4], target=0)  # float32: no warning
