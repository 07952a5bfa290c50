"""Exact conversion: each module-type rule, and whole models of the first four families."""

import copy as copy_module

import pytest
import torch
from conftest import FAMILIES, IMAGENET_MEAN, IMAGENET_STD, NUM_LABELS, tiny_source_model
from torch import nn
from transformers import AutoModelForImageClassification, ViTImageProcessor

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

from transformers_bcos.conversion import fold_normalization
from transformers_bcos.explanation import explanation_mode
from transformers_bcos.layers import BcosBatchNorm2d, BcosConv2d, BcosLayerNorm, BcosLinear, encode_pixel_values
from transformers_bcos.rules import GatedActivation, bcosify_modules


def normalize(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def max_rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------- one exactness test per rule


def bcosified(module: nn.Module, b: float = 1.0, keep_bias: bool = True) -> nn.Module:
    """A copy of ``module`` (inside a container, so that wrapping rules can replace it) B-cosified."""
    container = nn.Sequential(copy_module.deepcopy(module))
    assert bcosify_modules(container, b, keep_bias) == []
    return container


@pytest.mark.parametrize("groups,padding,stride", [(1, 1, 1), (1, 3, 2), (4, 3, 1)])
def test_conv_rule_is_exact_at_b1(groups, padding, stride):
    torch.manual_seed(0)
    source = nn.Conv2d(8, 8, 7 if padding == 3 else 3, stride=stride, padding=padding, groups=groups, bias=True)
    target = bcosified(source)
    assert isinstance(target[0], BcosConv2d)
    x = torch.randn(2, 8, 15, 15)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=1e-6)


def test_input_conv_folds_normalisation_exactly_including_padded_borders():
    torch.manual_seed(0)
    source = nn.Conv2d(3, 4, 7, stride=2, padding=3, bias=True)
    target = BcosConv2d(6, 4, 7, stride=2, padding=3, bias=True, b=1.0)
    with torch.no_grad():
        target.weight.copy_(fold_normalization(source.weight, IMAGENET_MEAN, IMAGENET_STD))
        target.bias.copy_(source.bias)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(target(encode_pixel_values(x)), source(normalize(x)), rtol=0, atol=1e-5)


def test_linear_rule_is_exact_at_b1():
    torch.manual_seed(0)
    source = nn.Linear(6, 5)
    target = bcosified(source)
    assert isinstance(target[0], BcosLinear)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_rule_is_exact_when_centered(training):
    torch.manual_seed(0)
    source = nn.BatchNorm2d(4)
    with torch.no_grad():
        source.running_mean.normal_()
        source.running_var.uniform_(0.5, 2)
        source.weight.normal_()
        source.bias.normal_()
    target = bcosified(source)
    assert isinstance(target[0], BcosBatchNorm2d) and target[0].centered
    source.train(training)
    target.train(training)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(target[0].running_var, source.running_var)


def test_uncentered_batchnorm_divides_by_running_std_only():
    torch.manual_seed(0)
    bn = BcosBatchNorm2d(4, centered=False).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
    x = torch.randn(2, 4, 3, 3)
    expected = x / (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1) * bn.weight.view(1, -1, 1, 1)
    torch.testing.assert_close(bn(x), expected)
    assert bn.bias is None


@pytest.mark.parametrize("channels_first", [False, True])
def test_layernorm_rule_is_exact_with_bias(channels_first):
    torch.manual_seed(0)
    source = ConvNextLayerNorm(6, eps=1e-6, data_format="channels_first" if channels_first else "channels_last")
    with torch.no_grad():
        source.weight.normal_()
        source.bias.normal_()
    target = bcosified(source)
    assert isinstance(target[0], BcosLayerNorm) and target[0].channels_first == channels_first
    x = torch.randn(2, 6, 4, 4) if channels_first else torch.randn(2, 4, 6)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("reference", [nn.GELU(), nn.ReLU(), nn.SiLU(), nn.GELU("tanh")], ids=["gelu", "relu", "silu", "gelu_tanh"])
def test_activation_rule_matches_standard_and_is_gate_times_input(reference):
    activation = bcosified(reference)
    assert isinstance(activation[0], GatedActivation)
    x = torch.randn(100, requires_grad=True)
    torch.testing.assert_close(activation(x), reference(x))
    with explanation_mode(activation):
        y = activation(x)
        (gradient,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient * x, y.detach(), rtol=1e-5, atol=1e-6)  # the gate is a constant: y = gate·x


# ------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("family", FAMILIES)
def test_b1_with_biases_reproduces_source_logits(family, source_folders):
    source = AutoModelForImageClassification.from_pretrained(source_folders[family]).eval()
    model = bcosify_pretrained(source_folders[family], b=1.0, keep_bias=True)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixel_values=normalize(x)).logits
        logits = model(x).logits
    assert max_rel_diff(logits, expected) <= 1e-4
    # Folded, not kept as an affine layer: the first layer reads the 6-channel encoding and the
    # processor saved with the model no longer normalises.
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 6
    assert model.config.image_processor["do_normalize"] is False
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight.shape[0] in (3, 6) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_default_conversion_is_bias_free_bcos(family, source_folders):
    model = bcosify_pretrained(source_folders[family])
    assert model.config.b == 2.0 and model.config.use_bias is False
    assert all(getattr(m, "bias", None) is None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.BatchNorm2d)))
    assert all(m.b == 2.0 for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear)))
    assert model.config.logit_bias == pytest.approx(-torch.log(torch.tensor(NUM_LABELS - 1.0)).item())
    assert model.config.id2label[3] == "class_3"


def test_conversion_of_a_model_instance_needs_its_processor():
    source, processor = tiny_source_model("resnet")
    with pytest.raises(ValueError, match="image_processor"):
        bcosify_pretrained(source)
    model = bcosify_pretrained(source, b=1.0, keep_bias=True, image_processor=processor)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_diff(model(x).logits, source(pixel_values=normalize(x)).logits) <= 1e-4


def test_conversion_leaves_the_source_untouched_and_fails_before_writing(source_folders):
    source = AutoModelForImageClassification.from_pretrained(source_folders["resnet"]).eval()
    before = copy_module.deepcopy(source.state_dict())
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    converted = bcosify_pretrained(source, image_processor=processor)
    # A model instance is copied, never aliased: training the B-cos model leaves the source alone.
    source_storage = {t.untyped_storage().data_ptr() for t in source.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in source_storage for t in converted.state_dict().values())
    # A model whose layout does not match (a layer removed) is refused with a clear error.
    broken = copy_module.deepcopy(source)
    stage = next(m for m in broken.modules() if isinstance(m, nn.Sequential) and len(m) == 2 and not isinstance(m[0], nn.Flatten))
    del stage[1]
    with pytest.raises(ValueError, match="Cannot convert"):
        bcosify_pretrained(broken, image_processor=processor)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_a_source_tensor_of_another_shape_is_refused_by_key(source_folders):
    source = AutoModelForImageClassification.from_pretrained(source_folders["convnext"])
    layer_scale = next(name for name, p in source.named_parameters() if name.endswith("layer_scale_parameter"))
    module_name, _, tensor_name = layer_scale.rpartition(".")
    setattr(source.get_submodule(module_name), tensor_name, nn.Parameter(torch.ones(3)))
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match=rf"Cannot convert ConvNextForImageClassification: '{layer_scale}' has shape \(3,\)"):
        bcosify_pretrained(source, image_processor=processor)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_a_deit_built_in_code_converts_with_its_own_classifier(with_teacher):
    """A config built in code names no class, and DeiT has two image classifiers: the conversion
    rebuilds the source's own (the one with the distillation head too)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    source, processor = tiny_source_model("deit")
    if with_teacher:
        torch.manual_seed(0)
        source = DeiTForImageClassificationWithTeacher(DeiTConfig(**source.config.to_diff_dict())).eval()
    source.config.architectures = None
    model = bcosify_pretrained(source, b=1.0, keep_bias=True, image_processor=processor)
    assert type(model.backbone.model) is type(source)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_diff(model(x).logits, source(pixel_values=normalize(x)).logits) <= 1e-4


@pytest.mark.parametrize("bad_b", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_b_is_refused(bad_b, source_folders):
    with pytest.raises(ValueError, match="exponent b"):
        bcosify_pretrained(source_folders["vit"], b=bad_b)


def test_a_model_that_is_not_an_image_classifier_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8))
    bert.save_pretrained(tmp_path)
    for src in (str(tmp_path), bert):
        with pytest.raises(ValueError, match="Unsupported architecture 'bert'.*not an image classifier of transformers"):
            bcosify_pretrained(src)
    with pytest.raises(TypeError, match="src must be"):
        bcosify_pretrained(42)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_scratch_model_builds_and_round_trips(family, tmp_path):
    from transformers_bcos import BcosConfig

    source, _ = tiny_source_model(family)
    config = BcosConfig(backbone_config=source.config, num_labels=3)
    model = BcosForImageClassification(config).eval()
    assert config.normalize_weights is True and config.use_bias is False
    layers = [m for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear))]
    assert layers and all(layer.normalize_weights for layer in layers)  # unit-norm filters, as B-cos v2 trains from scratch
    x = torch.rand(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    loaded = BcosForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert model(x).logits.shape == (2, 3)
