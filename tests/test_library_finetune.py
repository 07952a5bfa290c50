"""B-cosified torchvision and timm models through the fine-tuning (issue 18, item 5): a saved B-cos
folder of a library model is a ``--model`` of examples/finetune.py, and
examples/bcosify_library_cnn.py trains, converts, fine-tunes and measures one end to end.

torchvision and timm are imported inside the tests only: the core tier (without them) collects
this file and deselects its tests by the ``timm`` marker."""

import json
import os

import pytest
import torch
from conftest import completeness_error, load_example_script

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers_bcos.defaults import MNIST_MEAN, MNIST_STD
from transformers_bcos.modeling_bcos import BcosPlainModuleArchitecture
from transformers_bcos.training.finetune import adapt_classifier_to_labels
from transformers_bcos.training.recipe import recipe_family

DIGITS = [str(d) for d in range(10)]


def bcos_resnet18_folder(folder) -> str:
    """A B-cosified torchvision resnet18 (random weights, 10 classes, default label names), saved."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10).eval()
    model = bcosify_pretrained(source, image_mean=list(MNIST_MEAN), image_std=list(MNIST_STD), image_size=28)
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.timm
def test_a_torchvision_folder_gets_a_new_head_for_new_labels_and_still_reloads(tmp_path):
    """New labels rebuild the head from the recorded architecture, with num_classes recorded, and
    keep every other tensor; the saved folder then reloads without the module."""
    folder = bcos_resnet18_folder(tmp_path / "bcos")
    model = BcosForImageClassification.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert adapt_classifier_to_labels(model, ["a", "b", "c"])
    assert model.config.backbone_config.architecture_kwargs == {"num_classes": 3}
    assert model.config.logit_bias == pytest.approx(-torch.log(torch.tensor(2.0)).item())
    after = model.state_dict()
    assert after["backbone.model.fc.weight"].shape == (3, 512)
    changed = {k for k in before if k not in after or after[k].shape != before[k].shape or not torch.equal(after[k], before[k])}
    assert changed == {"backbone.model.fc.weight"}
    assert not adapt_classifier_to_labels(model, ["a", "b", "c"])  # the same labels: nothing to do

    model.save_pretrained(tmp_path / "three")
    reloaded = BcosForImageClassification.from_pretrained(tmp_path / "three").eval()
    x = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(reloaded(x).logits, model.eval()(x).logits)
    assert recipe_family(reloaded.config, reloaded) == "cnn"


@pytest.mark.timm
def test_recipe_of_a_plain_module_is_read_from_its_modules():
    """A B-cosified timm ViT (attention) trains with the ViTs' recipe, a torchvision CNN with the CNNs'."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    import torchvision

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=1).eval()
    bcos_vit = bcosify_pretrained(vit, image_size=32)
    assert recipe_family(bcos_vit.config, bcos_vit) == "vit"
    cnn = torchvision.models.resnet18(num_classes=3).eval()
    bcos_cnn = bcosify_pretrained(cnn, image_mean=[0.5] * 3, image_std=[0.25] * 3, image_size=32)
    assert recipe_family(bcos_cnn.config, bcos_cnn) == "cnn"
    with pytest.raises(ValueError, match="pass the model"):
        recipe_family(bcos_cnn.config)


@pytest.mark.timm
@pytest.mark.slow
def test_finetune_script_takes_a_bcos_torchvision_folder(tmp_path, fresh_accelerator_state):
    """``examples/finetune.py --model FOLDER`` of a B-cosified torchvision model: trained with the
    CNN recipe (BatchNorm re-estimation on request), its labels the data's, saved as a folder that
    reloads without the module."""
    folder = bcos_resnet18_folder(tmp_path / "bcos")
    output = tmp_path / "finetuned"
    status = load_example_script("finetune").main([
        "--model", folder, "--output_dir", str(output), "--num_train_epochs", "1", "--max_train_samples", "32",
        "--max_eval_samples", "32", "--bn_reestimation_images", "32", "--disable_progress_bar",
    ])  # fmt: skip
    assert status == 0
    results = json.loads((output / "all_results.json").read_text())
    assert results["bn_reestimation_images"] == 32 and 0 <= results["eval_accuracy"] <= 1
    model = BcosForImageClassification.from_pretrained(output).eval()
    assert isinstance(model.backbone, BcosPlainModuleArchitecture)
    assert [model.config.id2label[i] for i in range(10)] == DIGITS
    assert model.config.backbone_config.architecture_kwargs == {"num_classes": 10}
    card = (output / "README.md").read_text()
    assert "torchvision resnet18 backbone" in card


@pytest.mark.timm
@pytest.mark.slow
def test_bcosify_library_cnn_end_to_end(tmp_path, monkeypatch, fresh_accelerator_state):
    """The script, tiny: train (and cache) the standard resnet18, B-cosify and save it, fine-tune
    the folder for 1 epoch, measure, and write the RESULTS.md section between its markers."""
    pytest.importorskip("torchvision")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("TRANSFORMERS_BCOS_CACHE", str(tmp_path / "cache"))
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nbefore\n\n<!-- library-cnn:begin -->\nstale section\n<!-- library-cnn:end -->\n\nafter\n")
    output = tmp_path / "out"
    record = load_example_script("bcosify_library_cnn").main([
        "--output_dir", str(output), "--max_train_samples", "48", "--max_test_samples", "40", "--standard_epochs", "1",
        "--finetune_epochs", "1", "--bn_reestimation_images", "48", "--num_grids", "2", "--completeness_images", "4",
        "--write_results", str(results_md),
    ])  # fmt: skip

    # The standard source was trained and cached; the B-cos folders reload without the module.
    assert not record["source"]["cached"] and os.path.isfile(os.path.join(record["source"]["folder"], "model.safetensors"))
    assert record["bcos"]["reload_max_logit_difference"] == 0.0
    for folder in ("bcos-before-finetuning", "bcos-finetuned"):
        model = BcosForImageClassification.from_pretrained(output / folder).eval()
        assert isinstance(model.backbone, BcosPlainModuleArchitecture)
        config = model.config.backbone_config
        assert (config.library, config.architecture, config.architecture_kwargs) == ("torchvision", "resnet18", {"num_classes": 10})
        assert [model.config.id2label[i] for i in range(10)] == DIGITS
    x = torch.rand(2, 3, 28, 28)
    explanation = model.explain(x)
    assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-4
    assert not (output / "bcos-finetuned" / "checkpoints").exists()  # removed once measured

    # Accuracies are fractions of the 40 test digits; every (model, method) row was measured.
    assert set(record["accuracies"]) == {"source", "before", "one_epoch", "finetuned"}
    for value in record["accuracies"].values():
        assert 0.0 <= value <= 1.0 and (value * 40) == pytest.approx(round(value * 40))
    assert record["finetuning"]["metrics"]["bn_reestimation_images"] == 48
    assert [(r["model"], r["method"]) for r in record["rows"]] == [
        ("finetuned", "bcos"), ("one_epoch", "bcos"), ("before", "bcos"), ("source", "input_x_gradient")]
    for row in record["rows"]:
        assert set(row["gridpg"]) == {"whole_grid", "windows"}
        assert all(0 <= r["num_grids_built"] <= 2 for r in row["gridpg"].values())
    bcos_errors = [r["completeness"]["max_relative"] for r in record["rows"] if r["method"] == "bcos"]
    assert max(bcos_errors) < 1e-4  # B-cos contributions are complete; input×gradient need not be

    # RESULTS.md: the section replaced between its markers, the rest untouched.
    text = results_md.read_text()
    assert text.startswith("# Results\n\nbefore\n\n<!-- library-cnn:begin -->\n") and text.endswith("<!-- library-cnn:end -->\n\nafter\n")
    assert "stale section" not in text
    section = text.split("<!-- library-cnn:begin -->")[1].split("<!-- library-cnn:end -->")[0]
    assert section.strip() == (output / "results.md").read_text().strip()
    assert "| torchvision `resnet18` | 11.19M |" in section
    for name in ("fine-tuned 1 epoch(s) | B-cos contributions", "after 1 epoch | B-cos contributions",
                 "before fine-tuning | B-cos contributions", "standard source | input×gradient"):
        assert name in section
    assert "python examples/bcosify_library_cnn.py --output_dir" in section
    assert "python examples/finetune.py --model" in section and "CPU cores" in section
