"""Saved B-cos models load anywhere: Auto classes with trust_remote_code, pipelines, no package."""

import json
import os

import pytest
import torch
from conftest import FAMILIES, run_without_package
from transformers import AutoModel, AutoModelForImageClassification

from transformers_bcos import BcosForImageClassification, bcosify_pretrained

CODE_FILES = {"configuration_bcos.py", "modeling_bcos.py", "layers.py", "explanation.py"}


@pytest.fixture(scope="module")
def saved_models(source_folders, tmp_path_factory, mnist_images):
    """family -> (folder of a saved B-cosified model, its logits on the MNIST images)."""
    saved = {}
    for family in FAMILIES:
        model = bcosify_pretrained(source_folders[family], b=1.0)  # b=1: large logits, sharp comparison
        folder = tmp_path_factory.mktemp(f"bcos_{family}")
        model.save_pretrained(folder)
        with torch.no_grad():
            saved[family] = (str(folder), model(mnist_images[0][:4]).logits)
    return saved


def test_saved_folder_is_hub_ready(saved_models):
    folder = saved_models["vit"][0]
    files = set(os.listdir(folder))
    assert CODE_FILES | {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["auto_map"] == {
        "AutoConfig": "configuration_bcos.BcosConfig",
        "AutoModel": "modeling_bcos.BcosForImageClassification",
        "AutoModelForImageClassification": "modeling_bcos.BcosForImageClassification",
    }
    processor = json.load(open(os.path.join(folder, "preprocessor_config.json")))
    assert processor["do_normalize"] is False and processor["size"] == {"height": 32, "width": 32}


def test_installed_package_registers_the_auto_classes(saved_models, mnist_images):
    folder, logits = saved_models["resnet"]
    for auto in (AutoModel, AutoModelForImageClassification):
        model = auto.from_pretrained(folder).eval()
        assert isinstance(model, BcosForImageClassification)
        with torch.no_grad():
            torch.testing.assert_close(model(mnist_images[0][:4]).logits, logits)


@pytest.mark.slow
def test_loads_with_remote_code_in_a_process_without_the_package(saved_models, mnist_images, tmp_path):
    images = tmp_path / "images.pt"
    torch.save(mnist_images[0][:4].clone(), images)  # test data only; models travel as safetensors
    expected = {family: logits.tolist() for family, (folder, logits) in saved_models.items()}
    folders = {family: folder for family, (folder, _) in saved_models.items()}
    out = run_without_package(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageClassification, pipeline
        x = torch.load({str(images)!r})
        expected = json.loads({json.dumps(expected)!r})
        for family, folder in json.loads({json.dumps(folders)!r}).items():
            a = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            b = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
            assert "transformers_bcos" not in type(a).__module__, type(a).__module__
            with torch.no_grad():
                la, lb = a(x).logits, b(x).logits
            assert torch.equal(la, lb), family
            torch.testing.assert_close(la, torch.tensor(expected[family]))
            e = a.explain(x, target=[0, 1, 2, 3])
            err = ((e.contributions.sum((1, 2)) - e.explained_output).abs() / e.explained_output.abs().clamp_min(1)).max()
            assert err < 1e-5, (family, err)
            classify = pipeline("image-classification", model=folder, trust_remote_code=True)
            image = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
            predictions = classify(image, top_k=3)
            assert len(predictions) == 3 and predictions[0]["label"].startswith("class_"), predictions
            print(family, "ok")
        """
    )
    assert [line.split()[0] for line in out.splitlines() if line.endswith(" ok")] == FAMILIES
