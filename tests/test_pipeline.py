"""The "image-explanation" pipeline: predictions with exact explanations, shared with the model."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, NUM_LABELS, SAVED_RULE_FAMILIES, run_without_package
from PIL import Image

from transformers_bcos import bcosify_pretrained
from transformers_bcos._compat import AutoImageProcessor
from transformers_bcos.pipeline_bcos import CUSTOM_PIPELINES, ImageExplanationPipeline


@pytest.fixture(scope="module")
def saved_vit(source_folders, tmp_path_factory):
    """(folder, model, processor) of a B-cosified tiny ViT saved with save_pretrained."""
    model = bcosify_pretrained(source_folders["vit"])
    folder = tmp_path_factory.mktemp("bcos_vit_pipeline")
    model.save_pretrained(folder)
    return str(folder), model, AutoImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def digit_images(mnist_images):
    """Three real MNIST digits as PIL images of a size other than the model's (the processor resizes)."""
    images = torch.nn.functional.interpolate(mnist_images[0][:3], size=(45, 40), mode="bilinear", align_corners=False)
    return [Image.fromarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)) for image in images]


def test_pipeline_returns_predictions_and_exact_explanations(saved_vit, digit_images):
    _, model, processor = saved_vit
    explain = ImageExplanationPipeline(model=model, image_processor=processor)
    with torch.no_grad():  # as transformers runs pipelines; the pipeline must enable grad itself
        results = explain(digit_images, top_k=3)
    pixel_values = processor(images=digit_images, return_tensors="pt")["pixel_values"]
    reference = model.explain(pixel_values)
    for i, result in enumerate(results):
        assert [p["label"] for p in result["predictions"]][0] == result["label"]
        scores = [p["score"] for p in result["predictions"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert result["target"] == int(reference.target[i]) and result["label"] == model.config.id2label[result["target"]]
        assert isinstance(result["explanation"], Image.Image) and result["explanation"].mode == "RGBA"
        assert result["explanation"].size == (IMAGE_SIZE, IMAGE_SIZE)
        expected = reference.contributions[i].numpy()  # explained in a batch of 3, the pipeline one by one
        np.testing.assert_allclose(result["contributions"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        assert result["explained_output"] == pytest.approx(float(reference.explained_output[i]), rel=1e-5)
        assert result["completeness_error"] <= 1e-4 * max(abs(result["explained_output"]), np.abs(result["contributions"]).sum())
        expected_alpha = (reference.to_rgba()[i, ..., 3] * 255).round()
        alpha = np.asarray(result["explanation"])[..., 3].astype(int)
        assert np.abs(alpha - expected_alpha.astype(int)).max() <= 1  # rounding of batch-size-dependent round-off
    assert all(p.grad is None for p in model.parameters())


def test_pipeline_explains_a_chosen_class_by_name_or_index(saved_vit, digit_images):
    _, model, processor = saved_vit
    explain = ImageExplanationPipeline(model=model, image_processor=processor)
    by_name = explain(digit_images[0], target="class_2")
    by_index = explain(digit_images[0], target=2)
    assert by_name["target"] == by_index["target"] == 2 and by_name["label"] == "class_2"
    np.testing.assert_array_equal(by_name["contributions"], by_index["contributions"])
    assert len(explain(digit_images[0], top_k=50)["predictions"]) == NUM_LABELS


def test_pipeline_rejects_bad_input(saved_vit, source_folders, digit_images):
    _, model, processor = saved_vit
    explain = ImageExplanationPipeline(model=model, image_processor=processor)
    with pytest.raises(ValueError, match="Unknown label 'zebra'"):
        explain(digit_images[0], target="zebra")
    with pytest.raises(ValueError, match="out of range"):
        explain(digit_images[0], target=NUM_LABELS)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        explain(digit_images[0], top_k=0)
    from transformers import AutoModelForImageClassification

    standard = AutoModelForImageClassification.from_pretrained(source_folders["vit"])
    with pytest.raises(ValueError, match="needs a B-cos image classifier"):
        ImageExplanationPipeline(model=standard, image_processor=processor)


def test_saved_model_names_and_carries_its_pipeline(saved_vit):
    folder = saved_vit[0]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["custom_pipelines"] == {
        "image-explanation": {
            "impl": "pipeline_bcos.ImageExplanationPipeline",
            "pt": ["AutoModelForImageClassification"],
            "tf": [],
            "type": "image",
        }
    }
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert os.path.isfile(os.path.join(folder, "pipeline_bcos.py"))


def test_registered_pipeline_takes_a_model_object(saved_vit, digit_images):
    """With the package installed, pipeline("image-explanation") knows the task (PIPELINE_REGISTRY)."""
    from transformers import pipeline

    _, model, processor = saved_vit
    explain = pipeline("image-explanation", model=model, image_processor=processor)
    assert isinstance(explain, ImageExplanationPipeline)
    result = explain(digit_images[0])
    assert result["completeness_error"] < 1e-4 * np.abs(result["contributions"]).sum()


@pytest.mark.slow
def test_pipeline_from_the_saved_folder_in_a_process_without_the_package(saved_vit, digit_images, tmp_path):
    folder, model, processor = saved_vit
    image_path = tmp_path / "digit.png"
    digit_images[1].save(image_path)
    pixel_values = processor(images=digit_images[1], return_tensors="pt")["pixel_values"]
    reference = model.explain(pixel_values, target="class_3")
    out = run_without_package(
        f"""
        import json
        from PIL import Image
        from transformers import pipeline
        explain = pipeline("image-explanation", model={folder!r}, trust_remote_code=True)
        assert "transformers_bcos" not in type(explain).__module__, type(explain).__module__
        result = explain(Image.open({str(image_path)!r}), target="class_3", top_k=2)
        assert result["explanation"].mode == "RGBA" and result["explanation"].size == ({IMAGE_SIZE}, {IMAGE_SIZE})
        print(json.dumps({{
            "label": result["label"],
            "predictions": result["predictions"],
            "total": float(result["contributions"].astype("float64").sum()),
            "total_magnitude": float(abs(result["contributions"].astype("float64")).sum()),
            "explained_output": result["explained_output"],
            "completeness_error": result["completeness_error"],
        }}))
        """
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["label"] == "class_3" and len(result["predictions"]) == 2
    assert result["explained_output"] == pytest.approx(float(reference.explained_output[0]), rel=1e-5)
    # Completeness relative to the size of the terms summed (reference §8), not an absolute tolerance.
    scale = max(abs(result["explained_output"]), result["total_magnitude"])
    assert result["completeness_error"] == pytest.approx(abs(result["total"] - result["explained_output"]), abs=1e-7 * scale)
    assert result["completeness_error"] < 1e-4 * scale  # float32 round-off of a tiny-logit model


@pytest.mark.parametrize("family", SAVED_RULE_FAMILIES)
def test_pipeline_from_a_saved_rules_family_folder_explains_like_the_model(family, bcos_rules_folders, digit_images):
    from transformers import pipeline

    from transformers_bcos import BcosForImageClassification

    folder = bcos_rules_folders[family]
    # The folder's own copy of the code (its rules.py included), as users load it.
    explain = pipeline("image-explanation", model=folder, trust_remote_code=True)
    assert type(explain).__name__ == "ImageExplanationPipeline" and type(explain).__module__.startswith("transformers_modules")
    assert explain.model.config.backbone_config.model_type == family
    results = explain(digit_images, target="class_3", top_k=2)
    model, processor = BcosForImageClassification.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    reference = model.explain(processor(images=digit_images, return_tensors="pt")["pixel_values"], target="class_3")
    for i, result in enumerate(results):
        assert result["label"] == "class_3" and len(result["predictions"]) == 2
        assert result["explanation"].size == (IMAGE_SIZE, IMAGE_SIZE)
        expected = reference.contributions[i].numpy()
        np.testing.assert_allclose(result["contributions"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        assert result["explained_output"] == pytest.approx(float(reference.explained_output[i]), rel=1e-5)
        assert result["completeness_error"] <= 1e-4 * max(abs(result["explained_output"]), np.abs(result["contributions"]).sum())
