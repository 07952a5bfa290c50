"""Everything else follows for the families B-cosified by the module-type rules (issue 17, items 2
and 6): torch.compile, fine-tuning from a standard or a B-cos folder, from-scratch training from a
config, the CLI, the explanation pipeline and the GridPG evaluation."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import COMPILED_RULE_FAMILIES, IMAGENET_MEAN, IMAGENET_STD, RULE_FAMILIES, RULES_PROCESSOR, completeness_error, load_example_script, tiny_rules_source
from transformers import AutoConfig, ViTImageProcessor, pipeline

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers_bcos.modeling_bcos import BcosSourceArchitecture

DIGIT = "docs/images/digits/mnist-test-003-label-3.png"
# A transformer (the "bcos" attention function, tokens, layer scale) and a CNN (batch norm,
# squeeze-excitation gates): what the training recipe tells apart.
FINETUNED_FAMILIES = ("dinov2", "regnet")
TINY_RUN = ["--max_train_samples", "256", "--max_eval_samples", "128", "--num_train_epochs", "1", "--per_device_train_batch_size", "32"]


@pytest.fixture(scope="module")
def standard_folders(tmp_path_factory):
    """family -> a saved tiny standard model of a rules family, with a normalising 32-px processor."""
    folders = {}
    for family in FINETUNED_FAMILIES:
        folder = tmp_path_factory.mktemp(f"standard-{family}")
        tiny_rules_source(family).save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.fixture(scope="module")
def finetuned(standard_folders, tmp_path_factory):
    """family -> the output folder of examples/finetune.py B-cosifying the standard folder on the
    embedded MNIST (10 digit classes; the source has 5 classes of its own)."""
    finetune = load_example_script("finetune")
    folders = {}
    for family, source in standard_folders.items():
        output_dir = str(tmp_path_factory.mktemp(f"finetuned-{family}") / "run")
        assert finetune.main(["--model", source, "--output_dir", output_dir, *TINY_RUN]) == 0
        folders[family] = output_dir
    return folders


@pytest.mark.parametrize("family", FINETUNED_FAMILIES)
def test_finetuning_a_standard_folder_of_a_rules_family(family, finetuned):
    metrics = json.loads(open(f"{finetuned[family]}/all_results.json").read())
    assert metrics["eval_examples"] == 128
    model = BcosForImageClassification.from_pretrained(finetuned[family])
    assert isinstance(model.backbone, BcosSourceArchitecture)
    # the source's 5-class head was replaced by one for the data's 10 digits
    assert [model.config.id2label[i] for i in range(10)] == [str(d) for d in range(10)]
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    explanation = model.double().explain(x)
    assert explanation.logits.shape == (2, 10)
    assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-10
    card = open(f"{finetuned[family]}/README.md").read()
    # a model that attends gets the ViT recipe, a CNN the CNN one (BatchNorm re-estimation included)
    assert ("ViT recipe" in card) == (family == "dinov2")
    assert ("accuracy_after_bn_reestimation" in metrics) == (family == "regnet")


def test_finetuning_continues_a_bcos_folder_of_a_rules_family(finetuned, tmp_path):
    output_dir = str(tmp_path / "continued")
    assert load_example_script("finetune").main(["--model", finetuned["regnet"], "--output_dir", output_dir, *TINY_RUN]) == 0
    before = BcosForImageClassification.from_pretrained(finetuned["regnet"]).state_dict()
    after = BcosForImageClassification.from_pretrained(output_dir).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_training_a_rules_family_from_scratch_from_a_config(tmp_path):
    config = AutoConfig.for_model("dinov2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=7)
    (tmp_path / "dinov2.json").write_text(json.dumps(config.to_dict()))
    output_dir = str(tmp_path / "scratch")
    assert load_example_script("finetune").main(["--from_scratch", str(tmp_path / "dinov2.json"), "--output_dir", output_dir, *TINY_RUN]) == 0
    model = BcosForImageClassification.from_pretrained(output_dir)
    assert model.config.backbone_config.model_type == "dinov2" and model.config.normalize_weights
    # the processor feeds the config's own input size, not a default
    assert model.config.image_processor["size"] == {"height": 28, "width": 28}
    explanation = model.double().explain(torch.rand(2, 3, 28, 28, dtype=torch.float64))
    assert completeness_error(explanation.contributions, explanation.explained_output) < 1e-10


@pytest.mark.slow
def test_the_cli_pipeline_and_evaluation_on_a_rules_folder(finetuned, tmp_path):
    folder = finetuned["dinov2"]
    command = [sys.executable, "-m", "transformers_bcos.cli"]
    explained = subprocess.run([*command, "explain", folder, DIGIT, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert explained.returncode == 0, explained.stderr
    assert "contributions sum to" in explained.stdout and (tmp_path / "out" / "mnist-test-003-label-3.png").is_file()

    result = pipeline("image-explanation", model=folder, trust_remote_code=True)(DIGIT)
    assert result["label"] in [str(d) for d in range(10)]
    assert result["completeness_error"] < 1e-5 * max(1.0, abs(result["explained_output"]))

    evaluated = subprocess.run(
        [*command, "evaluate", folder, "--dataset", "embedded:mnist", "--grid-size", "2", "--max-images", "200", "--num-grids", "20"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "top-1 accuracy" in evaluated.stdout and "GridPG 2×2" in evaluated.stdout and "completeness: max relative error" in evaluated.stdout


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(RULE_FAMILIES) - set(COMPILED_RULE_FAMILIES)))
def test_a_rules_family_compiles_in_one_graph_for_inference_and_training(family):
    """The rules families that tests/test_compile.py does not run through its full matrix:
    torch.compile(fullgraph=True) (aot_eager, as there): the source's own forward,
    the rules' modules and the "bcos" attention function trace without a graph break, and the
    compiled model computes what the eager one does, gradients included."""
    torch._dynamo.reset()
    model = bcosify_pretrained(tiny_rules_source(family), image_processor=RULES_PROCESSOR)
    x, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(4) % 5
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model.eval(), fullgraph=True, backend="aot_eager")(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    model(x, labels=labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)  # the same running statistics for the compiled step
    torch.manual_seed(0)
    torch.compile(model, fullgraph=True, backend="aot_eager")(x, labels=labels).loss.backward()
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name in expected:
        # relative to the largest entry: MobileNetV2's first layer gathers float32 round-off of
        # ~50 layers, whose order the compiled backward changes
        error = ((got[name] - expected[name]).abs().max() / expected[name].abs().max().clamp_min(1e-30)).item()
        assert error < 1e-4, (name, error)
    torch._dynamo.reset()
