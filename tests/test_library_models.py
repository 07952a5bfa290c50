"""torchvision and timm models (issue 18), B-cosified by the module-type rules: the B-cosification
paper's torchvision CNNs, the B-cos paper's VGG-11 and Inception-v3, and timm's ResNet-50,
DenseNet-121, ConvNeXt-T, ViT-S and EfficientNet-B0, at their real sizes with random weights.

The torchvision/timm tier (``pytest -m timm``; README: "Testing"): these tests need timm and
torchvision, which the core install does not have. Both are imported inside the fixtures.
"""

import copy
import json

import pytest
import torch
from conftest import (
    assert_batched_explanations_equal_single_ones,
    completeness_error,
    losses_of_training_steps,
    randomized_source,
    run_without_package,
)
from safetensors.torch import load_file, save_file

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers_bcos.conversion import ExactnessError
from transformers_bcos.layers import BcosConv2d, BcosLinear

pytestmark = pytest.mark.timm

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
NUM_CLASSES = 5
# (library, architecture, input size): the CNNs at 64 px (Inception-v3 needs 75 or more), ViT-S
# at the 224 px its position embeddings are built for.
MODELS = {
    "tv-resnet18": ("torchvision", "resnet18", 64),
    "tv-resnet50": ("torchvision", "resnet50", 64),
    "tv-densenet121": ("torchvision", "densenet121", 64),
    "tv-vgg11": ("torchvision", "vgg11", 64),
    "tv-vgg11_bn": ("torchvision", "vgg11_bn", 64),
    "tv-inception_v3": ("torchvision", "inception_v3", 96),
    "timm-resnet50": ("timm", "resnet50", 64),
    "timm-densenet121": ("timm", "densenet121", 64),
    "timm-convnext_tiny": ("timm", "convnext_tiny", 64),
    "timm-vit_small_patch16_224": ("timm", "vit_small_patch16_224", 224),
    "timm-efficientnet_b0": ("timm", "efficientnet_b0", 64),
}
NAMES = sorted(MODELS)


def library_source(name: str, seed: int = 0) -> torch.nn.Module:
    """The model with random weights, `randomized_source`, and random layer scales and position
    embeddings (timm's ``gamma`` and ``pos_embed``)."""
    library, architecture, _ = MODELS[name]
    torch.manual_seed(seed)
    if library == "timm":
        import timm

        model = timm.create_model(architecture, pretrained=False, num_classes=NUM_CLASSES)
    else:
        import torchvision

        # Inception's auxiliary head needs 299 px in training; its initialisation is slow.
        options = {"init_weights": False, "aux_logits": False} if architecture == "inception_v3" else {}
        model = torchvision.models.get_model(architecture, weights=None, num_classes=NUM_CLASSES, **options)
    randomized_source(model)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if key.endswith("gamma") or "pos_embed" in key:
                parameter.normal_(0, 0.5)
    return model.eval()


def convert(source, name: str, b=2.0, keep_bias=False, check=True):
    library, _, size = MODELS[name]
    # timm's data config gives its normalisation; torchvision's models need it passed.
    normalisation = {} if library == "timm" else {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
    return bcosify_pretrained(source, b=b, keep_bias=keep_bias, image_size=size, check=check, **normalisation)


@pytest.fixture(scope="module")
def sources():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = library_source(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def converted(sources):
    """(name, (b, keep_bias)) -> the converted model, built on first use (each model once)."""
    cache = {}

    def get(name, setting=(2, False)):
        if (name, setting) not in cache:
            b, keep_bias = setting
            model = convert(sources(name), name, b, keep_bias)
            cache[name, setting] = model if keep_bias else with_unit_activations(model, images(name, seed=99))
        return cache[name, setting]

    return get


def with_unit_activations(model, x: torch.Tensor):
    """``model`` with each B-cos layer's weight scaled so that its output on ``x`` has unit RMS,
    as a trained model's roughly have. With random weights each B-cos layer shrinks the signal by
    about |cos(w, x)|: at b = 2, VGG-11's logits are 1e-53 (0 in float32) and EfficientNet-B0's
    are 0 in float64, where completeness would hold vacuously. Without biases a B-cos layer of
    raw (not unit-norm) weights is homogeneous of degree b in its weight: the model stays a B-cos
    model of the same architecture."""

    def rescale(module, args, output):
        scale = output.detach().pow(2).mean().sqrt()
        module.weight.data.div_(scale ** (1 / module.b))
        return output / scale

    hooks = [m.register_forward_hook(rescale) for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return model


def images(name: str, n: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    size = MODELS[name][2]
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def normalized(x: torch.Tensor, model) -> torch.Tensor:
    """``x`` as the source reads it: normalised as the B-cos model's config records."""
    config = model.config.backbone_config
    mean = torch.tensor(config.image_mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("name", NAMES)
def test_the_config_names_the_library_model(name, converted):
    library, architecture, size = MODELS[name]
    config = converted(name).config.backbone_config
    assert (config.library, config.architecture, config.image_size) == (library, architecture, [size, size])
    assert config.architecture_kwargs["num_classes"] == NUM_CLASSES
    assert converted(name).backbone.unconverted == []


@pytest.mark.parametrize("name", NAMES)
def test_b1_with_biases_reproduces_the_source(name, sources, converted):
    model = converted(name, (1, True))
    x = images(name)
    with torch.no_grad():
        expected = sources(name)(normalized(x, model))
        logits = model(x).logits
    error = float((logits - expected).abs().max() / expected.abs().max())
    assert error < 1e-4, error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_explanations_are_complete(name, dtype, converted):
    model = copy.deepcopy(converted(name)).to(dtype)
    x = images(name, dtype=dtype)
    explanation = model.explain(x)
    error = completeness_error(explanation.contributions, explanation.explained_output)
    assert error < (1e-10 if dtype == torch.float64 else 1e-4), error
    assert explanation.explained_output.abs().max() > 0
    # Explanation mode explains the model's own output: the same values, only the factors detached
    # (in float32 computed by other kernels: measured up to 1.2e-4 apart, EfficientNet-B0).
    with torch.no_grad():
        logits = model(x).bias_free_logits
    predicted = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-10
    assert float((explanation.explained_output - predicted).abs().max() / predicted.abs().max()) < tolerance


def test_timm_attention_without_fused_kernels_is_explained_exactly(converted):
    """timm's Attention computes softmax(q·kᵀ) itself where the fused kernel is off: that softmax
    is held constant as SDPA's is, with the same outputs."""
    model = copy.deepcopy(converted("timm-vit_small_patch16_224")).double()
    x = images("timm-vit_small_patch16_224", dtype=torch.float64)
    fused = model.explain(x)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    unfused = model.explain(x)
    assert completeness_error(unfused.contributions, unfused.explained_output) < 1e-10
    torch.testing.assert_close(unfused.contributions, fused.contributions)


@pytest.mark.parametrize("name", NAMES)
def test_batched_explanations_equal_single_ones_and_the_source_is_unchanged(name, sources, converted):
    source = sources(name)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = copy.deepcopy(converted(name)).double()
    assert_batched_explanations_equal_single_ones(model, images(name, dtype=torch.float64), [0, 3])
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert not any(type(m).__module__.startswith("transformers_bcos") for m in source.modules())


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_without_the_module(name, converted, tmp_path):
    """The folder names the library model: loading rebuilds it, no ``source_module`` needed."""
    model = converted(name)
    model.save_pretrained(tmp_path)
    loaded = BcosForImageClassification.from_pretrained(tmp_path).eval()
    x = images(name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"height": MODELS[name][2], "width": MODELS[name][2]}


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_lowers_the_loss(name, converted):
    """Gradient steps of a fixed length (the gradient clipped to norm 1): with batch statistics of
    4 images, Inception's last 1×1 feature maps make its loss sharp (gradient norm 6e3 here)."""
    model = copy.deepcopy(converted(name))
    losses = losses_of_training_steps(model, images(name, 4, seed=3), torch.tensor([0, 1, 2, 3]), lr=1e-4, max_grad_norm=1.0)
    assert losses[-1] < losses[0], losses


def test_library_models_load_without_the_package(converted, tmp_path):
    """trust_remote_code where timm and torchvision are installed: the saved code rebuilds the
    library model and explains it, without this package."""
    names = ["tv-densenet121", "timm-vit_small_patch16_224", "timm-efficientnet_b0"]
    expected = {}
    for name in names:
        model = converted(name)
        model.save_pretrained(tmp_path / name)
        save_file({"images": images(name)}, tmp_path / f"{name}-images.safetensors")
        with torch.no_grad():
            expected[name] = model(images(name)).logits
    out = run_without_package(
        f"""
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForImageClassification
        for name in {names!r}:
            folder = {str(tmp_path)!r} + "/" + name
            images = load_file(folder + "-images.safetensors")["images"]
            model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
            explanation = model.explain(images)
            gap = (explanation.contributions.sum((1, 2)) - explanation.explained_output).abs().max().item()
            scale = explanation.contributions.abs().sum((1, 2)).max().item()
            save_file({{"logits": model(images).logits.contiguous()}}, folder + "-logits.safetensors")
            print(name, type(model).__module__.startswith("transformers_modules"), gap / scale < 1e-4)
        """
    )
    for name in names:
        assert f"{name} True True" in out
        # The same code with another thread count, whose float32 sums are blocked differently:
        # measured 1.2e-4 of the largest logit on EfficientNet-B0's 80 layers.
        logits = load_file(tmp_path / f"{name}-logits.safetensors")["logits"]
        assert float((logits - expected[name]).abs().max() / expected[name].abs().max()) < 1e-3


# ------------------------------------------------------------------------------ TimmWrapper


def timm_wrapper(architecture: str = "resnet18", **model_args):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    names = [f"class_{i}" for i in range(NUM_CLASSES)]
    config = TimmWrapperConfig(
        architecture=architecture, model_args=model_args or None, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    torch.manual_seed(0)
    wrapper = TimmWrapperForImageClassification(config)
    randomized_source(wrapper.timm_model)
    return wrapper.eval()


def test_a_saved_timm_wrapper_converts_as_the_timm_model_it_wraps(tmp_path):
    """A TimmWrapperForImageClassification folder (what a ``timm/...`` Hub id holds): its
    ``model_args`` and labels are kept, its data config folded, and the result reproduces it."""
    wrapper = timm_wrapper("resnet18", stem_type="deep", stem_width=16)
    wrapper.save_pretrained(tmp_path / "wrapper")
    model = bcosify_pretrained(tmp_path / "wrapper", b=1, keep_bias=True, image_size=64)
    config = model.config.backbone_config
    assert (config.library, config.architecture, config.architecture_kwargs) == ("timm", "resnet18", {"stem_type": "deep", "stem_width": 16, "num_classes": NUM_CLASSES})
    assert model.config.id2label == wrapper.config.id2label
    assert config.image_mean == list(wrapper.timm_model.pretrained_cfg["mean"])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper(pixel_values=normalized(x, model)).logits
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "bcos")
    assert BcosForImageClassification.from_pretrained(tmp_path / "bcos").config.backbone_config.architecture_kwargs["stem_width"] == 16
    from_instance = bcosify_pretrained(wrapper, b=1, keep_bias=True, image_size=64)
    assert from_instance.config.backbone_config.to_dict() == config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(from_instance(x).logits, model(x).logits)


def test_an_unknown_timm_architecture_is_refused_before_loading(tmp_path):
    wrapper = timm_wrapper("resnet18")
    wrapper.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "resnet_no_such_model"}))
    with pytest.raises(ValueError, match="Unknown timm architecture 'resnet_no_such_model'"):
        bcosify_pretrained(tmp_path)


@pytest.mark.parametrize("name,match", [("timm-resnet50", "Unknown timm architecture"), ("tv-resnet18", "Unknown torchvision classification model")])
def test_a_bcos_folder_naming_an_unknown_architecture_is_refused(name, match, converted, tmp_path):
    converted(name).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone_config"]["architecture"] = "no_such_model"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{match} 'no_such_model'"):
        BcosForImageClassification.from_pretrained(tmp_path)


def test_a_timm_module_type_without_a_rule_is_refused_by_name():
    """ResNetV2-BiT: weight-standardised convolutions and group norms have no B-cos rule."""
    import timm

    source = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=NUM_CLASSES).eval()
    with pytest.raises(ExactnessError) as error:
        bcosify_pretrained(source, image_size=64)
    assert "stem.conv (StdConv2d: a subclass with a forward of its own)" in str(error.value)
    assert "(GroupNormAct: no B-cos rule for this module type)" in str(error.value)


def test_a_library_model_of_other_arguments_saves_but_needs_its_module_to_load(tmp_path):
    """A timm model built with arguments the config cannot name (here a deep, narrow stem) is
    converted, told that loading it needs an instance, and refused without one."""
    import timm

    source = randomized_source(timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES, stem_type="deep", stem_width=16))
    with pytest.warns(UserWarning, match="loading them needs an instance of the class"):
        model = bcosify_pretrained(source, image_size=64)
    assert model.config.backbone_config.library is None
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass source_module="):
        BcosForImageClassification.from_pretrained(tmp_path)
    loaded = BcosForImageClassification.from_pretrained(tmp_path, source_module=source)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_inception_re_normalising_its_own_input_is_refused_with_what_to_do():
    """torchvision's pretrained Inception-v3 has transform_input=True: it re-normalises its input
    channels itself, which the encoding [x, 1 - x] cannot pass through."""
    import torchvision

    source = torchvision.models.inception_v3(weights=None, num_classes=NUM_CLASSES, aux_logits=False, init_weights=False, transform_input=True)
    with pytest.raises(ValueError, match=r"transform_input=True.*Set module.transform_input = False and pass image_mean=\[0.5, 0.5, 0.5\]"):
        bcosify_pretrained(source.eval(), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, image_size=96)
