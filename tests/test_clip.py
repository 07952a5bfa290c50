"""B-cos CLIP: exact conversion, complete cosine explanations, zero-shot, loading without the
package, distillation, and clear errors. Everything is built offline from a tiny CLIP."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    character_tokenizer,
    clip_image_processor,
    completeness_error,
    run_without_package,
    tiny_clip,
)
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    ViTConfig,
    ViTForImageClassification,
)

from transformers_bcos.conversion.clip import (
    CLIPImageTeacher,
    bcosify_clip,
    distill_image_tower,
    distillation_loss,
    siglip_distillation_loss,
)
from transformers_bcos.modeling_bcos_clip import BcosCLIPModel

TEXTS = ["a photo of a cat.", "a dog", "a red car on a road", "seven"]
CODE_FILES = {
    "configuration_bcos_clip.py",
    "modeling_bcos_clip.py",
    "configuration_bcos.py",
    "modeling_bcos.py",
    "layers.py",
    "explanation.py",
    "rules.py",
}


@pytest.fixture(scope="module")
def clip_source(tmp_path_factory):
    """(folder with a saved tiny CLIP, its processor and tokenizer; the CLIPModel; the tokenizer)."""
    folder = tmp_path_factory.mktemp("clip_src")
    tokenizer = character_tokenizer(tmp_path_factory.mktemp("clip_vocab"))
    model = tiny_clip(tokenizer)
    model.save_pretrained(folder)
    clip_image_processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), model, AutoTokenizer.from_pretrained(folder)


def coloured_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) images in [0, 1]: a distinct colour per image plus a fine texture."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    texture = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return 0.8 * colour + 0.2 * texture


@pytest.fixture(scope="module")
def images():
    return coloured_images(3, seed=1)


def normalize(x):
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("source_kind", ["folder", "instance"])
def test_b1_with_biases_reproduces_the_source_image_embeddings(clip_source, images, source_kind):
    folder, source, tokenizer = clip_source
    if source_kind == "folder":
        model = bcosify_clip(folder, b=1.0, keep_bias=True)
    else:
        processor = CLIPImageProcessor.from_pretrained(folder)
        model = bcosify_clip(source, b=1.0, keep_bias=True, image_processor=processor, tokenizer=tokenizer)
    with torch.no_grad():
        expected = source.get_image_features(pixel_values=normalize(images)).pooler_output
        got = model.get_image_features(pixel_values=images).pooler_output
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_text_tower_is_the_source_one_unchanged_and_frozen(clip_source):
    folder, source, tokenizer = clip_source
    model = bcosify_clip(folder)
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = source.get_text_features(**tokens).pooler_output
        got = model.get_text_features(**tokens).pooler_output
    assert torch.equal(got, expected)
    assert model.logit_scale.item() == source.logit_scale.item()
    frozen = [*model.text_model.parameters(), *model.text_projection.parameters(), model.logit_scale]
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in [*model.vision_model.parameters(), *model.visual_projection.parameters()])


def test_b2_image_tower_is_bias_free(clip_source):
    model = bcosify_clip(clip_source[0], b=2.0)
    bcos_units = [m for m in [*model.vision_model.modules(), model.visual_projection] if hasattr(m, "b")]
    assert bcos_units and all(m.b == 2.0 for m in bcos_units)
    assert all(getattr(m, "bias", None) is None for m in [*model.vision_model.modules(), model.visual_projection])


def test_the_image_tower_is_clips_own_bcosified_by_the_rules_with_clipmodels_keys(clip_source):
    from transformers import CLIPVisionModel

    from transformers_bcos.layers import BcosConv2d, BcosLayerNorm, BcosLinear
    from transformers_bcos.rules import BCOS_ATTENTION, GatedActivation

    folder, source, _ = clip_source
    model = bcosify_clip(folder)
    assert isinstance(model.vision_model, CLIPVisionModel) and model.unconverted == []
    kinds = {type(m) for m in model.vision_model.modules()}
    assert {BcosConv2d, BcosLinear, BcosLayerNorm, GatedActivation} <= kinds and not kinds & {torch.nn.Linear, torch.nn.LayerNorm}
    assert model.vision_model.config._attn_implementation == BCOS_ATTENTION
    image_keys = {k for k in source.state_dict() if k.startswith(("vision_model.", "visual_projection."))}
    bcos_keys = {k for k in model.state_dict() if k.startswith(("vision_model.", "visual_projection."))}
    assert bcos_keys == {k for k in image_keys if not k.endswith(".bias")}  # b = 2 drops the biases only


def test_conversion_checks_exactness_and_names_a_module_that_breaks_it(clip_source, monkeypatch):
    from transformers_bcos.conversion.clip import check_clip_exactness
    from transformers_bcos.conversion.exactness import COMPLETENESS_TOLERANCE, EQUIVALENCE_TOLERANCE, ExactnessError
    from transformers_bcos.rules import GatedActivation

    folder, source, _ = clip_source
    assert check_clip_exactness(bcosify_clip(folder, check=False))["completeness"] <= COMPLETENESS_TOLERANCE
    errors = check_clip_exactness(bcosify_clip(folder, b=1.0, keep_bias=True), source, CLIP_MEAN, CLIP_STD)
    assert errors == {"equivalence": errors["equivalence"]} and errors["equivalence"] <= EQUIVALENCE_TOLERANCE
    # b = 1 with biases compared against a wrongly normalised source image: refused.
    with pytest.raises(ExactnessError, match="does not reproduce the source"):
        check_clip_exactness(bcosify_clip(folder, b=1.0, keep_bias=True, check=False), source, [0.5] * 3, CLIP_STD)
    # An activation whose gate is not detached in explanation mode: refused by name.
    monkeypatch.setattr(GatedActivation, "forward", lambda self, x: self.activation(x))
    with pytest.raises(ExactnessError, match=r"vision_model\.encoder\.layers\.\d\.mlp\.activation_fn \(GatedActivation"):
        bcosify_clip(folder)


def test_a_checkpoint_of_the_earlier_hand_written_image_tower_is_refused_with_what_to_do(clip_source, tmp_path):
    from safetensors.torch import load_file, save_file

    from transformers_bcos.modeling_bcos import CheckpointWeightsError

    folder = tmp_path / "old"
    bcosify_clip(clip_source[0]).save_pretrained(folder)
    # The earlier layout: the encoder layers sat directly under vision_model.
    weights = {k.replace("vision_model.encoder.layers.", "vision_model.layers."): v
               for k, v in load_file(folder / "model.safetensors").items()}  # fmt: skip
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointWeightsError, match=r"hand-written image tower of an earlier transformers-bcos .*trust_remote_code=True"):
        BcosCLIPModel.from_pretrained(folder)


# ------------------------------------------------------------------------------ explanations


@pytest.mark.parametrize("b,keep_bias", [(2.0, False), (1.0, False)])
@pytest.mark.parametrize("cosine_power", [1.0, 3.0])
def test_cosine_explanations_are_complete_for_several_texts(clip_source, images, b, keep_bias, cosine_power):
    model = bcosify_clip(clip_source[0], b=b, keep_bias=keep_bias)
    explanation = model.explain(images, text=TEXTS, cosine_power=cosine_power)
    n, t = len(images), len(TEXTS)
    assert explanation.contributions.shape == (n, t, IMAGE_SIZE, IMAGE_SIZE)
    assert explanation.dynamic_linear_weights.shape == (n, t, 6, IMAGE_SIZE, IMAGE_SIZE)
    assert explanation.explained_output.shape == (n, t)
    assert completeness_error(explanation.contributions, explanation.explained_output) <= 1e-5

    # The explained output is cos·|cos|^(p−1) of the model's own embeddings.
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        image_embeds = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
        text_embeds = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    cosine = image_embeds @ text_embeds.t()
    torch.testing.assert_close(explanation.cosine, cosine, rtol=0, atol=1e-6)
    powered = cosine * cosine.abs() ** (cosine_power - 1)
    torch.testing.assert_close(explanation.explained_output, powered, rtol=0, atol=1e-6)
    torch.testing.assert_close(explanation.logits_per_image, model.logit_scale.exp() * cosine, rtol=1e-5, atol=1e-5)
    # Texts matter: the explanations of different texts differ.
    assert not torch.allclose(explanation.contributions[:, 0], explanation.contributions[:, 1])


def test_cosine_explanations_are_exact_in_float64(clip_source, images):
    for b in (2.0, 1.0):
        model = bcosify_clip(clip_source[0], b=b).double()
        explanation = model.explain(images.double(), text=TEXTS, cosine_power=3.0)
        assert explanation.explained_output.dtype == torch.float64
        assert completeness_error(explanation.contributions, explanation.explained_output) <= 1e-10


def test_explaining_token_ids_equals_explaining_the_texts(clip_source, images):
    folder, _, tokenizer = clip_source
    model = bcosify_clip(folder)
    tokens = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    by_ids = model.explain(images, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    by_text = model.explain(images, text=TEXTS[:2])
    torch.testing.assert_close(by_ids.contributions, by_text.contributions)
    assert all(p.grad is None for p in model.parameters())


def test_zero_shot_classification_and_its_explanation(clip_source, images):
    model = bcosify_clip(clip_source[0], b=1.0)
    classes, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a drawing of a {}."]
    result = model.zero_shot_classify(images, classes, templates=templates, cosine_power=2.0)

    # t̂: the mean of the unit-norm prompt embeddings, normalised again; logits = exp(logit_scale)·ê·t̂.
    with torch.no_grad():
        prompts = [template.format(name) for name in classes for template in templates]
        prompts = model.get_text_features(**model.tokenize(prompts)).pooler_output
        class_embeds = F.normalize(F.normalize(prompts, dim=-1).view(3, 2, -1).mean(1), dim=-1)
        image_embeds = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
    cosine = image_embeds @ class_embeds.t()
    torch.testing.assert_close(result.logits, model.logit_scale.exp() * cosine, rtol=1e-5, atol=1e-5)
    assert torch.equal(result.predictions, result.logits.argmax(1))
    assert result.predicted_labels == [classes[i] for i in result.predictions]
    assert torch.equal(result.target, result.predictions)
    chosen = cosine.gather(1, result.target[:, None]).squeeze(1)
    torch.testing.assert_close(result.explained_output, chosen * chosen.abs(), rtol=0, atol=1e-6)
    assert result.contributions.shape == (len(images), IMAGE_SIZE, IMAGE_SIZE)
    assert completeness_error(result.contributions, result.explained_output) <= 1e-5

    dog = model.zero_shot_classify(images, classes, templates=templates, target="dog")
    assert dog.target.tolist() == [1] * len(images) and completeness_error(dog.contributions, dog.explained_output) <= 1e-5
    assert dog.to_rgba().shape == (len(images), IMAGE_SIZE, IMAGE_SIZE, 4)


# ------------------------------------------------------------------------------ saving and loading


@pytest.mark.slow
def test_save_then_pipeline_in_a_process_without_the_package(clip_source, images, tmp_path):
    model = bcosify_clip(clip_source[0], b=1.0)  # b=1: cosines far from 0, sharp comparison
    folder = tmp_path / "bcos_clip"
    model.save_pretrained(folder)
    saved_files = {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"}
    assert CODE_FILES | saved_files <= set(os.listdir(folder))
    config = json.load(open(folder / "config.json"))
    assert config["auto_map"] == {
        "AutoConfig": "configuration_bcos_clip.BcosCLIPConfig",
        "AutoModel": "modeling_bcos_clip.BcosCLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_bcos_clip.BcosCLIPModel",
    }
    assert json.load(open(folder / "preprocessor_config.json"))["do_normalize"] is False

    reloaded = BcosCLIPModel.from_pretrained(folder)
    assert not any(p.requires_grad for p in reloaded.text_model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=images, **model.tokenize(TEXTS)).logits_per_image,
            model(pixel_values=images, **model.tokenize(TEXTS)).logits_per_image,
        )

    out = run_without_package(
        f"""
        import numpy as np, torch
        from PIL import Image
        from transformers import pipeline
        classify = pipeline("zero-shot-image-classification", model={str(folder)!r}, trust_remote_code=True)
        assert "transformers_bcos" not in type(classify.model).__module__
        labels = ["cat", "dog", "car", "tree"]
        for seed in range(2):
            array = (np.random.RandomState(seed).rand(40, 48, 3) * 255).astype("uint8")  # resized and cropped
            image = Image.fromarray(array)
            scores = {{r["label"]: r["score"] for r in classify(image, candidate_labels=labels)}}
            assert abs(sum(scores.values()) - 1) < 1e-6, scores

            pixel_values = classify.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            assert pixel_values.min() >= 0 and pixel_values.max() <= 1, (pixel_values.min(), pixel_values.max())
            assert pixel_values.max() - pixel_values.min() > 0.5  # pixels, not normalised values
            prompts = [f"This is a photo of {{label}}." for label in labels]  # the pipeline's template
            tokens = classify.tokenizer(prompts, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = classify.model(pixel_values=pixel_values, **tokens).logits_per_image
            expected = logits.softmax(-1)[0].tolist()
            assert np.allclose([scores[label] for label in labels], expected, atol=1e-6), (scores, expected)
            assert max(expected) - min(expected) > 1e-3  # the scores are not trivially uniform

        explanation = classify.model.explain(pixel_values, text=labels)  # the tokenizer is found beside the weights
        error = (explanation.contributions.sum((-2, -1)) - explanation.explained_output).abs().max()
        assert error < 1e-5, error
        print("pipeline ok")
        """
    )
    assert "pipeline ok" in out


# ------------------------------------------------------------------------------ distillation


def test_short_distillation_lowers_the_loss_and_raises_student_teacher_cosine(clip_source):
    _, _, tokenizer = clip_source
    # The perturbed test CLIP maps all images to nearly one direction (pairwise cosine 0.99), where
    # a contrastive loss is lowered by decorrelating student and teacher. Freshly initialised, it
    # embeds differently coloured images apart (pairwise cosine ~0.6), as a trained CLIP does.
    source = tiny_clip(tokenizer, perturb=False)
    student = bcosify_clip(source, b=2.0, image_processor=clip_image_processor(), tokenizer=tokenizer)
    teacher = CLIPImageTeacher(source, CLIP_MEAN, CLIP_STD)
    train_images, held_out = coloured_images(64, seed=2), coloured_images(16, seed=3)
    # Batches of 4: with few, still similar, negatives per image the loss mostly pulls each student
    # embedding onto its own teacher embedding, which is what the cosine measures.
    batch_size = 4

    def measure():
        with torch.no_grad():
            losses = [distillation_loss(student, teacher, batch) for batch in held_out.split(batch_size)]
            loss = torch.stack(losses).mean().item()
            student_embeds = student.get_image_features(pixel_values=held_out).pooler_output
            return loss, F.cosine_similarity(student_embeds, teacher(held_out), dim=-1).mean().item()

    loss_before, cosine_before = measure()
    text_projection = source.text_projection.weight.clone()
    losses = distill_image_tower(student, teacher, train_images, steps=100, batch_size=batch_size, lr=3e-3)
    loss_after, cosine_after = measure()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)  # measured: 0.56 -> 0.36
    assert cosine_after > cosine_before + 0.04, (cosine_before, cosine_after)  # measured: 0.89 -> 0.95
    # Only the B-cos image tower was trained.
    assert torch.equal(student.text_projection.weight, text_projection)
    assert torch.equal(source.text_projection.weight, text_projection)


def test_siglip_distillation_loss_matches_its_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 8), torch.randn(5, 8)
    logits = 10 * F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).t() - 10
    labels = 2 * torch.eye(5) - 1
    expected = -torch.log(torch.sigmoid(labels * logits)).mean()
    torch.testing.assert_close(siglip_distillation_loss(student, teacher), expected)
    # Matching embeddings score better than mismatched ones.
    assert siglip_distillation_loss(teacher, teacher) < siglip_distillation_loss(student, teacher)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors(clip_source, images, tmp_path):
    folder, source, tokenizer = clip_source
    model = bcosify_clip(folder)
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="empty"):
        model.explain(images, text=[])
    with pytest.raises(ValueError, match="not both"):
        model.explain(images, text=TEXTS, input_ids=tokens["input_ids"])
    with pytest.raises(ValueError, match="text=.*or input_ids"):
        model.explain(images)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.explain(images, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"][:2])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(pixel_values=images, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"][:, :3])
    with pytest.raises(ValueError, match=r"\(N, D\) for the same N images"):
        siglip_distillation_loss(torch.randn(4, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match="cosine_power"):
        model.explain(images, text=TEXTS, cosine_power=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.explain(normalize(images), text=TEXTS)
    with pytest.raises(ValueError, match="size"):
        model.explain(images[..., :16], text=TEXTS)
    with pytest.raises(ValueError, match="duplicates"):
        model.zero_shot_classify(images, ["cat", "cat"])
    with pytest.raises(ValueError, match="Unknown label"):
        model.zero_shot_classify(images, ["cat", "dog"], target="horse")

    model.tokenizer = None  # a model built in memory without a tokenizer
    with pytest.raises(ValueError, match="no tokenizer"):
        model.explain(images, text=TEXTS)

    vit_config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    vit = ViTForImageClassification(vit_config)
    with pytest.raises(ValueError, match="needs a CLIPModel"):
        bcosify_clip(vit)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="needs a CLIP model"):
        bcosify_clip(tmp_path / "vit")
    with pytest.raises(TypeError, match="src must be"):
        bcosify_clip(42)
    with pytest.raises(ValueError, match="image processor"):
        bcosify_clip(tiny_clip(tokenizer))  # an in-memory CLIP: its normalisation is unknown


def test_bcosify_pretrained_dispatches_clip_and_auto_classes_know_it(clip_source, tmp_path):
    from transformers import AutoModel, AutoModelForZeroShotImageClassification

    from transformers_bcos import bcosify_pretrained

    model = bcosify_pretrained(clip_source[0])
    assert isinstance(model, BcosCLIPModel)
    model.save_pretrained(tmp_path)
    for auto in (AutoModel, AutoModelForZeroShotImageClassification):
        assert isinstance(auto.from_pretrained(tmp_path), BcosCLIPModel)
