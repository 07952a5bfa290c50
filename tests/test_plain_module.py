"""Plain PyTorch classifiers (issue 17, item 3): an ``nn.Module`` from pixels to logits, not a
transformers model, B-cosified by the same module-type rules and checked the same way."""

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_batched_explanations_equal_single_ones, completeness_error, load_example_script, run_without_package
from torch import nn

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers_bcos.conversion import ExactnessError
from transformers_bcos.modeling_bcos import BcosPlainModuleArchitecture

# The module's source, also run in a subprocess without the package (its class must exist there).
CNN_SOURCE = """
import torch
from torch import nn


class SmallCNN(nn.Module):
    \"\"\"A torchvision-style CNN: convolutions, batch norm, ReLU, max pooling, x.view(N, -1), linear.\"\"\"

    def __init__(self, channels=3, classes=5, size=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.GELU(),
        )
        self.classifier = nn.Sequential(nn.Linear(12 * (size // 2) ** 2, 16), nn.SiLU(), nn.Linear(16, classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.shape[0], -1))
"""
namespace = {}
exec(CNN_SOURCE, namespace)
SmallCNN = namespace["SmallCNN"]

SIZE = 16
SETTINGS = {1: {"image_mean": [0.13], "image_std": [0.31]}, 3: {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}}


def small_cnn(channels: int, seed: int = 0) -> SmallCNN:
    """Random weights with random batch-norm statistics and biases (the check must see them)."""
    torch.manual_seed(seed)
    cnn = SmallCNN(channels)
    bn = cnn.features[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return cnn.eval()


def convert(cnn, b=2.0, keep_bias=False, **kwargs):
    channels = cnn.features[0].in_channels
    return bcosify_pretrained(cnn, b=b, keep_bias=keep_bias, image_size=SIZE, **SETTINGS[channels], **kwargs)


def images(channels: int, n: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=dtype)


def normalized(x: torch.Tensor, channels: int) -> torch.Tensor:
    mean = torch.tensor(SETTINGS[channels]["image_mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(SETTINGS[channels]["image_std"], dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("channels", [1, 3])
def test_b1_with_biases_reproduces_the_module(channels):
    cnn = small_cnn(channels)
    model = convert(cnn, b=1, keep_bias=True)
    assert isinstance(model.backbone, BcosPlainModuleArchitecture)
    assert model.config.num_labels == 5 and model.config.num_channels == channels
    x = images(channels, dtype=torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(cnn).double()(normalized(x, channels))
        # the folded first layer was stored in float32: its rounding (6e-8) is what remains
        torch.testing.assert_close(copy.deepcopy(model).double()(x).logits, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("b", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explanations_are_complete(channels, b, dtype):
    model = convert(small_cnn(channels), b=b).to(dtype)
    explanation = model.explain(images(channels, dtype=dtype))
    assert explanation.contributions.shape == (3, SIZE, SIZE)
    assert completeness_error(explanation.contributions, explanation.explained_output) < (1e-5 if dtype == torch.float32 else 1e-10)


def test_batched_explanations_equal_single_ones_and_the_module_is_unchanged():
    cnn = small_cnn(3)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    model = convert(cnn).double()
    x = images(3, dtype=torch.float64)
    assert_batched_explanations_equal_single_ones(model, x, [0, 2, 4])
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert type(cnn.features[0]) is nn.Conv2d and cnn.features[0].in_channels == 3


def test_a_functional_nonlinearity_in_the_forward_is_refused_by_name():
    class TanhCNN(SmallCNN):
        def forward(self, x):
            x = torch.tanh(self.features(x))  # a non-linearity no module rule can see
            return self.classifier(x.view(x.shape[0], -1))

    torch.manual_seed(0)
    with pytest.raises(ExactnessError, match=r"backbone\.model \(TanhCNN, relative error"):
        bcosify_pretrained(TanhCNN().eval(), image_size=SIZE, **SETTINGS[3])


def test_a_training_step_lowers_the_loss():
    model = convert(small_cnn(3)).train()
    x, labels = images(3, n=8), torch.arange(8) % 5
    # Adam: a fresh B-cos model's outputs (and gradients) are tiny, which plain SGD steps do not move
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_saved_and_loaded_with_an_instance_of_the_class(tmp_path):
    model = convert(small_cnn(1))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"plain PyTorch module .*SmallCNN.*pass source_module="):
        BcosForImageClassification.from_pretrained(tmp_path)
    loaded = BcosForImageClassification.from_pretrained(tmp_path, source_module=SmallCNN(1))
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.slow
def test_saved_folder_loads_without_the_package(tmp_path):
    """trust_remote_code: the module's class is the caller's; the rest travels with the folder."""
    model = convert(small_cnn(3))
    model.save_pretrained(tmp_path)
    x = images(3)
    with torch.no_grad():
        expected = model(x).logits
    out = run_without_package(
        CNN_SOURCE
        + textwrap.dedent(
            f"""
            from transformers import AutoModelForImageClassification
            model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, source_module=SmallCNN(3))
            x = torch.rand(3, 3, {SIZE}, {SIZE}, generator=torch.Generator().manual_seed(1))
            explanation = model.explain(x)
            gap = (explanation.contributions.sum((1, 2)) - explanation.explained_output).abs().max().item()
            print(type(model).__module__.startswith("transformers_modules"), gap < 1e-5)
            print(model(x).logits.flatten().tolist())
            """
        )
    )
    flags, logits = out.strip().splitlines()[-2:]
    assert flags == "True True"
    torch.testing.assert_close(torch.tensor(eval(logits)).view(3, 5), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.2, 0.2]}, r"plain PyTorch module: pass image_mean=, image_std= .* image_size="),
        ({"image_mean": [0.5, 0.5], "image_std": [0.2, 0.2, 0.2], "image_size": SIZE}, r"one value per pixel channel \(1 or 3\), got 2 and 3"),
        ({"image_mean": [0.5] * 3, "image_std": [0.2, 0.0, 0.2], "image_size": SIZE}, r"image_std finite and > 0"),
        ({"image_mean": [0.5], "image_std": [0.2], "image_size": SIZE}, r"SmallCNN has no convolution that reads its 1-channel pixels: B-cosification folds"),
        ({"image_mean": [0.5] * 3, "image_std": [0.2] * 3, "image_size": 20}, r"SmallCNN does not take \(3, 20, 20\) pixels"),
        ({"image_mean": [0.5] * 3, "image_std": [0.2] * 3, "image_size": SIZE, "revision": "main"}, r"revision do not apply to a plain PyTorch module"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_the_module_is_unchanged(kwargs, message):
    cnn = small_cnn(3)
    before = copy.deepcopy(cnn.state_dict())
    with pytest.raises(ValueError, match=message):
        bcosify_pretrained(cnn, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_a_module_that_does_not_return_logits_is_refused():
    class Features(SmallCNN):
        def forward(self, x):
            return self.features(x)

    with pytest.raises(ValueError, match=r"must return logits of shape \(N, classes\), got torch.Size\(\[1, 12, 8, 8\]\)"):
        bcosify_pretrained(Features(3).eval(), image_size=SIZE, **SETTINGS[3])


def test_normalisation_arguments_are_refused_for_a_transformers_source(rules_sources):
    with pytest.raises(ValueError, match="apply to plain PyTorch modules"):
        bcosify_pretrained(rules_sources["regnet"], image_mean=[0.5] * 3, image_std=[0.2] * 3)


def test_a_module_with_functional_relu_converts(tmp_path):
    """ReLU is piecewise linear: F.relu in the forward keeps explanations complete."""

    class FunctionalReLU(SmallCNN):
        def forward(self, x):
            x = F.relu(self.features[0](x))
            x = self.features[3](x)
            x = self.features[5](self.features[4](x))
            return self.classifier(x.view(x.shape[0], -1))

    torch.manual_seed(0)
    model = bcosify_pretrained(FunctionalReLU(3).eval(), image_size=SIZE, **SETTINGS[3]).double()
    explanation = model.explain(images(3, dtype=torch.float64))
    assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-10


@pytest.mark.slow
def test_a_real_mnist_cnn_keeps_its_accuracy_at_b1(tmp_path):
    """The example script: the PyTorch MNIST CNN trained on the embedded digits, converted."""
    results = load_example_script("bcosify_plain_cnn").main(["--epochs", "1", "--json", str(tmp_path / "results.json")])
    accuracy = results["accuracy"]
    assert accuracy["cnn"] > 0.9
    assert results["b1_predictions_differing"] == 0 and accuracy["bcos_b1_with_biases"] == accuracy["cnn"]
    assert accuracy["bcos_b2_reloaded"] == accuracy["bcos_b2_before_finetuning"]
    assert results["b2_completeness_gap_float32"] < 1e-4


def test_relu_and_max_pooling_fast_paths_give_the_gated_and_native_explanation(monkeypatch):
    """A ReLU wrapped by the rules runs as it is in explanation mode (its gradient is its gate), and
    a plain max pooling becomes `SeparableMaxPool2d`: the explanation of the gate computed as
    relu(x)/x, like every other activation's, with the native pooling kernel."""
    from transformers_bcos.layers import SeparableMaxPool2d, explanation_constant
    from transformers_bcos.rules import GatedActivation

    model = convert(small_cnn(3)).double()
    assert any(isinstance(m, SeparableMaxPool2d) for m in model.modules())
    assert not any(type(m) is nn.MaxPool2d for m in model.modules())
    assert any(isinstance(m, GatedActivation) and type(m.activation) is nn.ReLU for m in model.modules())
    x = images(3, dtype=torch.float64)
    fast = model.explain(x, target=1)

    def gated(self, t):
        return explanation_constant(self._gate, t) * t if self.explanation_mode else self.activation(t)

    monkeypatch.setattr(GatedActivation, "forward", gated)
    monkeypatch.setattr(SeparableMaxPool2d, "_separable", lambda self, t: False)
    reference = model.explain(x, target=1)
    torch.testing.assert_close(fast.dynamic_linear_weights, reference.dynamic_linear_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.logits, reference.logits, rtol=0, atol=0)


class FixedSizeCNN(nn.Module):
    """A CNN that asserts its input size, as timm's patch embedding does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.linear = nn.Linear(4 * (SIZE // 4) ** 2, 5)

    def forward(self, x):
        assert x.shape[-2:] == (SIZE, SIZE), f"Input size {tuple(x.shape[-2:])} doesn't match the model ({SIZE})."
        return self.linear(self.conv(x).flatten(1))


def test_the_exactness_check_retries_at_the_models_own_size_when_the_model_asserts_it():
    model = bcosify_pretrained(FixedSizeCNN().eval(), image_size=SIZE, **SETTINGS[3])
    explanation = model.explain(images(3))
    assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-5


class InPlaceActivationsCNN(nn.Module):
    """VGG's pattern: in-place ReLUs and an in-place squeeze-excitation gate right after
    convolutions and linear layers, whose B-cos versions save their outputs for the backward."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.gate_conv = nn.Conv2d(8, 8, 1)
        self.gate = nn.Hardsigmoid(inplace=inplace)
        self.linear = nn.Linear(8 * SIZE * SIZE, 16)
        self.act2 = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = x * self.gate(self.gate_conv(x))
        return self.head(self.act2(self.linear(x.flatten(1))))


def test_in_place_activations_after_bcos_layers_train_and_explain_as_out_of_place_ones():
    torch.manual_seed(0)
    in_place = InPlaceActivationsCNN(inplace=True).eval()
    out_of_place = InPlaceActivationsCNN(inplace=False).eval()
    out_of_place.load_state_dict(in_place.state_dict())
    models = [bcosify_pretrained(m, image_size=SIZE, **SETTINGS[3]) for m in (in_place, out_of_place)]
    assert in_place.act.inplace and in_place.gate.inplace  # the caller's model is unchanged
    x = images(3)
    gradients = []
    for model in models:
        model.train()
        loss = model(pixel_values=x, labels=torch.tensor([0, 1, 2])).loss
        loss.backward()  # failed for the in-place model: its ReLU overwrote the B-cos layer's saved output
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name])
    explanations = [model.eval().explain(x, target=1) for model in models]
    torch.testing.assert_close(explanations[0].contributions, explanations[1].contributions)


def test_a_conversion_whose_output_underflows_to_zero_says_completeness_was_not_measured():
    """Contributions that are all 0 sum to an output of 0: the check would pass having measured
    nothing. (Random deep models at b = 2 get there: EfficientNet-B0's logits are 0 in float64.)"""
    cnn = small_cnn(3)
    with torch.no_grad():
        cnn.classifier[-1].weight.zero_()
    with pytest.warns(UserWarning, match="exactly 0 in float64.*completeness could not be measured"):
        convert(cnn)
