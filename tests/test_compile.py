"""torch.compile, channels_last and bf16 autocast on every B-cos model family; torch.compile also
on families B-cosified by the module-type rules (DINOv2: attention through the "bcos" attention
function; Swin: windowed attention with relative position biases; RegNet: batch norms and
squeeze-excitation gates), whose own transformers forward is what is compiled.

Compilation uses the "aot_eager" backend: it traces the whole forward with dynamo (fullgraph=True
fails on any graph break) and the backward with AOTAutograd, custom autograd Functions included,
in about a second per model. Inductor would also generate and compile C++ kernels, 10-30 s per
model on a 2-core CPU, and it adds nothing about graph breaks.
"""

import pytest
import torch
from conftest import COMPILED_RULE_FAMILIES, FAMILIES, NUM_LABELS, RULES_PROCESSOR, character_tokenizer, clip_image_processor, tiny_clip

from transformers_bcos import bcosify_pretrained, layers
from transformers_bcos.conversion.clip import bcosify_clip

BACKEND = "aot_eager"
TARGETS = torch.tensor([0, 1, 2, 3])
# Rules families compiled here: one of each kind of forward code (see the module docstring).


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: all B-cos classifiers share one forward, so compiled
    variants of earlier tests would count towards dynamo's recompilation limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def models(source_folders, rules_sources):
    first_four = {family: bcosify_pretrained(source_folders[family]) for family in FAMILIES}
    others = {family: bcosify_pretrained(rules_sources[family], image_processor=RULES_PROCESSOR) for family in COMPILED_RULE_FAMILIES}
    return {**first_four, **others}


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def max_rel_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def completeness_error(explanation):
    total = explanation.contributions.double().sum((-2, -1))
    output = explanation.explained_output.double()
    return ((total - output).abs() / output.abs().clamp_min(1.0)).max().item()


def gradients(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("family", FAMILIES + COMPILED_RULE_FAMILIES)
def test_forward_compiles_in_one_graph_and_matches_eager(family, models, pixels):
    model = models[family].eval()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=pixels).logits, model(pixel_values=pixels).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES + COMPILED_RULE_FAMILIES)
@pytest.mark.slow
def test_training_step_compiles_in_one_graph_and_matches_eager(family, models, pixels):
    """Train mode: batch statistics (ResNet's custom batch-norm Function) and the backward pass."""
    model = models[family].train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        torch.manual_seed(0)  # the same stochastic-depth draws (Swin's drop path) in both steps
        loss = model(pixel_values=pixels, labels=TARGETS).loss
        loss.backward()
        expected = gradients(model)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)  # the same running statistics for the compiled step
        torch.manual_seed(0)
        compiled_loss = torch.compile(model, fullgraph=True, backend=BACKEND)(pixel_values=pixels, labels=TARGETS).loss
        compiled_loss.backward()
        got = gradients(model)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-7)
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        model.eval()


def split_like_full_size(monkeypatch):
    """Small slices: the CPU paths split tiny tensors as they split full-size ones."""
    monkeypatch.setattr(layers, "_SLICE_ELEMENTS", 64)


def run_batch_sizes_after_one_recompilation(step):
    """``step(batch_size)`` at batches 4 and 3 (the second recompiles with a dynamic batch), then
    at 2, 5 and 8, where any further recompilation raises."""
    step(4)
    step(3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch_size in (2, 5, 8):
            step(batch_size)


# Training steps of a rules family at five batch sizes: 30-45 s each on 2 CPU cores.
BATCH_SIZE_CASES = [(family, training) for training in (False, True) for family in FAMILIES] + [
    pytest.param(family, training, marks=[pytest.mark.slow] if training else [])
    for training in (False, True)
    for family in COMPILED_RULE_FAMILIES
]


@pytest.mark.parametrize("family, training", BATCH_SIZE_CASES)
@pytest.mark.slow
def test_a_compiled_model_takes_any_batch_size_after_one_recompilation(family, training, models, monkeypatch):
    """A new batch size recompiles once with a dynamic batch (dynamo's automatic dynamic shapes);
    no code path may then guard on the batch size (a finetuning run's smaller last batch, varying
    inference batches), else each size compiles again, until dynamo gives up and runs eager."""
    split_like_full_size(monkeypatch)
    model = models[family].train(training)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)

    def step(batch_size):
        pixels = torch.rand(batch_size, 3, 32, 32)
        if training:
            compiled(pixel_values=pixels, labels=torch.arange(batch_size) % NUM_LABELS).loss.backward()
        else:
            compiled(pixel_values=pixels)

    try:
        with torch.set_grad_enabled(training):
            run_batch_sizes_after_one_recompilation(step)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("family", FAMILIES + COMPILED_RULE_FAMILIES)
def test_explain_through_a_compiled_forward_is_exact(family, models, pixels, monkeypatch):
    model = models[family].eval()
    expected = model.explain(pixels, target=TARGETS)
    monkeypatch.setattr(model, "forward", torch.compile(model.forward, fullgraph=True, backend=BACKEND))
    got = model.explain(pixels, target=TARGETS)
    torch.testing.assert_close(got.dynamic_linear_weights, expected.dynamic_linear_weights, rtol=1e-5, atol=1e-8)
    assert completeness_error(got) <= 1e-5


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    tokenizer = character_tokenizer(tmp_path_factory.mktemp("clip_vocab"))
    return bcosify_clip(tiny_clip(tokenizer), image_processor=clip_image_processor(), tokenizer=tokenizer).eval()


def test_clip_image_tower_compiles_in_one_graph_and_explains_exactly(clip_model, pixels):
    images = pixels[:3]
    compiled = torch.compile(clip_model.get_image_features, fullgraph=True, backend=BACKEND)
    with torch.no_grad():
        got, expected = compiled(pixel_values=images).pooler_output, clip_model.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    texts = ["a cat", "a red car"]
    expected = clip_model.explain(images, text=texts)
    # Not monkeypatch: it would delete a submodule on undo (nn.Module keeps them outside __dict__).
    vision_model = clip_model.vision_model
    clip_model.vision_model = torch.compile(vision_model, fullgraph=True, backend=BACKEND)
    try:
        explanation = clip_model.explain(images, text=texts)
    finally:
        clip_model.vision_model = vision_model
    torch.testing.assert_close(explanation.dynamic_linear_weights, expected.dynamic_linear_weights, rtol=1e-5, atol=1e-8)
    assert completeness_error(explanation) <= 1e-5


def test_compiled_clip_image_tower_takes_any_batch_size_after_one_recompilation(clip_model, monkeypatch):
    split_like_full_size(monkeypatch)
    compiled = torch.compile(clip_model.get_image_features, fullgraph=True, backend=BACKEND)

    def step(batch_size):
        assert compiled(pixel_values=torch.rand(batch_size, 3, 32, 32)).pooler_output.shape[0] == batch_size

    with torch.no_grad():
        run_batch_sizes_after_one_recompilation(step)


# ------------------------------------------------------------------------------ channels_last


@pytest.mark.parametrize("family", ["resnet", "convnext"])
@pytest.mark.parametrize("training", [False, True])
def test_channels_last_gives_the_same_logits_and_explanations(family, training, models, pixels):
    model = models[family]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.train(training)
        expected = model(pixel_values=pixels).logits
        model.load_state_dict(state)
        model.to(memory_format=torch.channels_last)
        got = model(pixel_values=pixels.contiguous(memory_format=torch.channels_last)).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        if not training:
            explanation = model.explain(pixels.contiguous(memory_format=torch.channels_last), target=TARGETS)
            assert completeness_error(explanation) <= 1e-5
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.load_state_dict(state)
        model.eval()


# ------------------------------------------------------------------------------ bf16 autocast


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_training_step_is_finite_and_close_to_float32(family, models, pixels):
    model = models[family].train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        reference = model(pixel_values=pixels, labels=TARGETS)
        reference.loss.backward()
        expected = gradients(model)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(pixel_values=pixels, labels=TARGETS)
        output.loss.backward()
        got = gradients(model)
        assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)
        assert max_rel_diff(output.logits, reference.logits) <= 3e-2
        assert got.keys() == expected.keys()
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got.values())
        # bf16 keeps ~3 significant digits: single small gradients can be far off (as in the
        # standard transformers models), the whole gradient points the same way.
        cosine = torch.nn.functional.cosine_similarity(
            torch.cat([g.flatten() for g in got.values()]), torch.cat([g.flatten() for g in expected.values()]), dim=0
        )
        assert cosine >= 0.99
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_explanations_are_close_and_float32_stays_exact(family, models, pixels):
    model = models[family].eval()
    exact = model.explain(pixels, target=TARGETS)
    assert completeness_error(exact) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approximate = model.explain(pixels, target=TARGETS)
    assert approximate.dynamic_linear_weights.dtype == torch.float32
    assert torch.isfinite(approximate.dynamic_linear_weights).all()
    cosine = torch.nn.functional.cosine_similarity(
        approximate.dynamic_linear_weights.flatten(1), exact.dynamic_linear_weights.flatten(1), dim=1
    )
    # bf16 rounds every dynamic factor to 2^-8: the weights stay aligned with float32's, least so
    # where an output is a near-cancellation of its evidence (the ResNet's second image: output
    # 4e-4 against 4e-2 for the others, cosine 0.980 measured; the others >= 0.998).
    assert cosine.min() >= 0.97
    assert completeness_error(approximate) <= 1e-2
    assert approximate.logits.shape == (len(pixels), NUM_LABELS)
