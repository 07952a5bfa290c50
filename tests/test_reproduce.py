"""examples/reproduce.py: a CI-sized run completes and writes the tables, the JSON and the plots."""

import importlib.util
import json
import os

import pytest
import torch
from PIL import Image

from transformers_bcos.defaults import STANDARD_MODEL_RECIPES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(REPO, "examples", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_requires_scratch_epochs_at_least_four_times_finetune_epochs():
    reproduce = _load_reproduce()
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--finetune_epochs", "2", "--scratch_epochs", "7"])
    assert reproduce.parse_args(["--finetune_epochs", "2", "--scratch_epochs", "8"]).scratch_epochs == 8


def test_epochs_to_reach_takes_the_first_point_at_or_above_the_target():
    reproduce = _load_reproduce()
    curve = [(0.0, 0.5), (0.25, 0.9), (0.5, 0.97), (0.75, 0.96), (1.0, 0.98)]
    assert reproduce.epochs_to_reach(curve, 0.97) == 0.5
    assert reproduce.epochs_to_reach(curve, 0.99) is None


@pytest.mark.slow
def test_tiny_reproduction_writes_tables_json_and_plots(tmp_path, monkeypatch, capsys):
    # Real standard sources, trained by transformers_bcos.defaults into a temporary cache, with
    # one epoch instead of the recipe's 5/20 to fit the CI budget.
    monkeypatch.setenv("TRANSFORMERS_BCOS_CACHE", str(tmp_path / "cache"))
    for family in ("resnet", "vit"):
        monkeypatch.setitem(STANDARD_MODEL_RECIPES[family], "epochs", 1)
    torch.set_num_threads(1)
    output_dir = tmp_path / "reproduce"
    reproduce = _load_reproduce()
    results = reproduce.main(["--tiny", "--output_dir", str(output_dir), "--no_progress"])
    printed = capsys.readouterr().out
    assert printed.startswith(reproduce.TINY_NOTICE) and printed.rstrip().endswith(reproduce.TINY_NOTICE)

    table = (output_dir / "results.md").read_text()
    assert "**Accuracy and training speed**" in table and "**GridPG 2×2**" in table and "training-size windows" in table
    for family in ("resnet", "vit"):
        assert f"| {family} |" in table
    on_disk = json.loads((output_dir / "results.json").read_text())
    assert on_disk["families"] == ["resnet", "vit"] and on_disk["settings"]["scratch_epochs"] >= 4 * on_disk["settings"]["finetune_epochs"]

    settings = results["settings"]
    for family in ("resnet", "vit"):
        r = results["per_family"][family]
        # Accuracy curves: the converted model at epoch 0, then evals_per_epoch points per epoch.
        assert r["curves"]["bcosified"][0][0] == 0.0
        assert len(r["curves"]["bcosified"]) >= 1 + settings["finetune_epochs"] * settings["evals_per_epoch"]
        assert len(r["curves"]["scratch"]) >= settings["scratch_epochs"] * settings["evals_per_epoch"]
        assert r["curves"]["scratch"][-1][0] == pytest.approx(settings["scratch_epochs"])
        methods = {(row["model"], row["method"]) for row in r["rows"]}
        assert {("scratch", "bcos"), ("bcosified", "bcos"), ("source", "input_x_gradient"),
                ("source", "integrated_gradients"), ("source", "grad_cam")} <= methods
        for row in r["rows"]:
            # Every model is scored with training-size windows; only CNNs can take the whole grid.
            assert set(row["gridpg"]) == ({"windows"} if family == "vit" else {"windows", "whole_grid"})
            for protocol in row["gridpg"].values():
                assert 0 <= protocol["2"]["num_grids_built"] <= settings["num_grids"]
                assert protocol["2"]["report"].startswith("GridPG 2×2")
            if row["method"] == "bcos":  # complete up to float32 round-off (logits here are at most ~15)
                assert row["completeness"]["max_absolute"] < 1e-4
            elif row["method"] == "grad_cam":  # claims no output to sum to
                assert row["completeness"] == {}

    # Any-size CNNs also report how a lone digit's cell changes their accuracy; ViTs cannot take the canvas.
    assert set(results["per_family"]["resnet"]["lone_digit_accuracy_by_cell"]) == {"source", "bcosified", "scratch"}
    assert all(len(by_cell) == 4 for by_cell in results["per_family"]["resnet"]["lone_digit_accuracy_by_cell"].values())
    assert results["per_family"]["vit"]["lone_digit_accuracy_by_cell"] == {}

    for name, path in results["figures"].items():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 150, name
    assert set(results["figures"]) == {"explanations_resnet", "explanations_vit", "accuracy_vs_epoch", "gridpg_boxplots"}
