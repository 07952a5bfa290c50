#!/usr/bin/env python
"""Reproduce the B-cosification paper's claims, small, on the embedded MNIST (offline, CPU).

    python examples/reproduce.py [--output_dir outputs/reproduce] [--families resnet vit] [...]

For each model family (ResNet, ViT):

1. a standard transformers model trained with cross-entropy is the "pretrained" source
   (`transformers_bcos.defaults.default_standard_model`, cached after the first run);
2. it is B-cosified and fine-tuned for k epochs (``--finetune_epochs``);
3. a B-cos network of the same architecture is trained from scratch for K >= 4k epochs
   (``--scratch_epochs``);
4. the source is explained post hoc (input×gradient, Integrated Gradients, Grad-CAM).

Both training runs are `transformers_bcos.training.run_finetuning` runs; their checkpoints
(``--evals_per_epoch`` per epoch) give the accuracy curves. Every explanation is scored by the
same code (`transformers_bcos.evaluation`): GridPG on 2×2 grids (and 3×3 with
``--grid_sizes 2 3``), with the grid explained whole (CNNs) and with sliding windows of the
training size (all models; see PROTOCOLS), and the completeness error. Outputs in ``--output_dir``: results.json,
results.md (the tables, ready for RESULTS.md) and, in ``--figures_dir``, accuracy_vs_epoch.png,
gridpg_boxplots.png and explanations_<family>.png.

``--tiny`` runs a CI-sized version (a few hundred images, 1 + 4 epochs, a handful of grids).
"""

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers_bcos.data import load_image_classification_data, to_rgb
from transformers_bcos.defaults import TRAINING_SUMMARY_FILE, default_standard_model
from transformers_bcos.evaluation import (
    PixelClassifier,
    build_grid,
    completeness_errors,
    evaluate_grid_pointing_game,
    make_explainer,
    select_confident_images,
    top1_accuracy,
)
from transformers_bcos.evaluation.reporting import gridpg_cell
from transformers_bcos.training import FinetuneOptions, reestimate_batchnorm_statistics, run_finetuning
from transformers_bcos.training.checkpointing import CheckpointManager, read_position
from transformers_bcos.visualization import contribution_heatmap, rgba_on_background

FAMILIES = ("resnet", "vit")
POST_HOC_METHODS = ("input_x_gradient", "integrated_gradients", "grad_cam")
METHOD_NAMES = {
    "bcos": "B-cos contributions",
    "input_x_gradient": "input×gradient",
    "integrated_gradients": "Integrated Gradients",
    "grad_cam": "Grad-CAM",
}
# Images whose explanations the figure shows (the reference figure's digits) and the grid of it.
EXAMPLE_DIGITS = (2, 3, 5, 8)
EXAMPLE_GRID_DIGITS = (1, 4, 7, 9)
# The B-cosification recipe re-estimates BatchNorm statistics on this many training images.
BN_REESTIMATION_IMAGES = 1000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/reproduce")
    parser.add_argument("--figures_dir", default=None, help="Where the PNGs go (default: <output_dir>/figures).")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--finetune_epochs", type=int, default=None, help="k: epochs of B-cosified fine-tuning (default 4).")
    parser.add_argument("--scratch_epochs", type=int, default=None, help="K >= 4k: epochs of B-cos from scratch (default 16).")
    parser.add_argument("--evals_per_epoch", type=int, default=None, help="Accuracy points per epoch on the curves (default 4).")
    parser.add_argument("--grid_sizes", type=int, nargs="+", default=[2], choices=[2, 3], help="GridPG grids: 2 (2×2) and/or 3 (3×3).")
    parser.add_argument("--num_grids", type=int, default=None, help="GridPG grids per model and method (default 200).")
    parser.add_argument("--ig_steps", type=int, default=None, help="Integrated Gradients steps (default 50).")
    parser.add_argument("--completeness_images", type=int, default=None, help="Test images for the completeness error (default 200).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Training images (default: all 4,000).")
    parser.add_argument("--max_test_samples", type=int, default=None, help="Test images (default: all 1,000).")
    parser.add_argument("--reach_tolerance", type=float, default=0.005,
                        help="Also count epochs to reach the from-scratch final accuracy minus this (seed noise is ~0.4 points).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images (grids) explained per pass.")
    parser.add_argument("--seed", type=int, default=0, help="Data split and training seed (GridPG sampling uses --grid_seed).")
    parser.add_argument("--grid_seed", type=int, default=42)
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--keep_checkpoints", action="store_true", help="Keep the training checkpoints (deleted once evaluated).")
    parser.add_argument("--tiny", action="store_true", help="CI-sized run: explicit flags still win.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)

    sizes = dict(finetune_epochs=1, scratch_epochs=4, evals_per_epoch=2, num_grids=4, ig_steps=4,
                 completeness_images=8, max_train_samples=256, max_test_samples=200) if args.tiny else \
        dict(finetune_epochs=4, scratch_epochs=16, evals_per_epoch=4, num_grids=200, ig_steps=50,
             completeness_images=200, max_train_samples=None, max_test_samples=None)
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.scratch_epochs < 4 * args.finetune_epochs:
        parser.error(f"--scratch_epochs K={args.scratch_epochs} must be at least 4× --finetune_epochs k={args.finetune_epochs}.")
    args.figures_dir = args.figures_dir or os.path.join(args.output_dir, "figures")
    return args


# ----------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------


def pixel_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float in [0, 1] (MNIST is 28 px, the models' input size)."""
    return torch.stack([torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).float() / 255 for image in images])


def load_data(args) -> dict:
    """The same train/test split (and subsets) that the training runs see."""
    data = load_image_classification_data(
        None, max_train_samples=args.max_train_samples, max_eval_samples=args.max_test_samples, seed=args.seed
    )
    return {
        "num_train": len(data.train),
        "test_images": pixel_tensor(data.eval[data.image_column]),
        "test_labels": torch.tensor(data.eval[data.label_column]),
        "train_images": pixel_tensor(data.train.select(range(min(len(data.train), BN_REESTIMATION_IMAGES)))[data.image_column]),
    }


def train(family: str, run_dir: str, epochs: int, from_scratch: bool, num_train: int, args) -> dict:
    """One `run_finetuning` run, with a checkpoint ``evals_per_epoch`` times per epoch."""
    steps_per_epoch = math.ceil(num_train / FinetuneOptions.per_device_train_batch_size)
    options = FinetuneOptions(
        model=None if from_scratch else f"default:{family}",
        from_scratch=family if from_scratch else None,
        output_dir=run_dir,
        num_train_epochs=epochs,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_test_samples,
        checkpointing_steps=max(1, steps_per_epoch // args.evals_per_epoch),
        keep_last_checkpoints=10_000,  # all of them: they are the accuracy curve
        overwrite_output_dir=True,
        seed=args.seed,
        disable_progress_bar=args.no_progress,
    )
    started = time.perf_counter()
    metrics = run_finetuning(options)
    return {"metrics": metrics, "seconds": time.perf_counter() - started, "steps_per_epoch": metrics["epochs"][0]["step"]}


def load_checkpoint(run_dir: str, checkpoint_dir: str) -> BcosForImageClassification:
    """The model of the run in ``run_dir`` with the weights of one of its training checkpoints."""
    model = BcosForImageClassification.from_pretrained(run_dir)
    model.load_state_dict(load_file(os.path.join(checkpoint_dir, "model.safetensors")))
    return model.eval()


def accuracy_curve(run_dir: str, steps_per_epoch: int, images, labels, progress: bool) -> list:
    """[(epoch, test accuracy)] at every checkpoint of a run, in training order."""
    curve, seen_steps = [], set()
    for checkpoint in CheckpointManager(run_dir).complete_checkpoints():
        steps = read_position(checkpoint).completed_steps
        if steps in seen_steps:  # an epoch end that coincides with a step checkpoint
            continue
        seen_steps.add(steps)
        accuracy = top1_accuracy(load_checkpoint(run_dir, checkpoint), images, labels, batch_size=250, progress=progress)
        curve.append((steps / steps_per_epoch, accuracy))
    return curve


def epoch_checkpoint(run_dir: str, epoch: int) -> str:
    return os.path.join(CheckpointManager(run_dir).directory, f"epoch_{epoch:04d}")


def bcosified_before_finetuning(source_dir: str, train_images: torch.Tensor) -> BcosForImageClassification:
    """The B-cosified source before any gradient step, as the fine-tuning run starts it:
    converted, then (CNNs) BatchNorm statistics re-estimated on training images."""
    model = bcosify_pretrained(source_dir)
    reestimate_batchnorm_statistics(model, train_images.split(64))
    return model.eval()


def epochs_to_reach(curve: list, target: float):
    """The first epoch on ``curve`` whose accuracy is at least ``target`` (None if never)."""
    return next((epoch for epoch, accuracy in curve if accuracy >= target - 1e-9), None)


def training_speed(curves: dict, target: float, scratch_epochs: int) -> dict:
    """Epochs each run needs to reach ``target`` accuracy and the B-cosified run's speed-up:
    against the whole from-scratch run (K epochs, the papers' comparison) and against the epoch
    at which the from-scratch run first reached the target."""
    bcosified, scratch = epochs_to_reach(curves["bcosified"], target), epochs_to_reach(curves["scratch"], target)
    return {
        "target_accuracy": target,
        "bcosified_epochs": bcosified,
        "scratch_epochs": scratch,
        "speedup_vs_scratch_run": scratch_epochs / bcosified if bcosified else None,
        "speedup_vs_scratch_first_reach": scratch / bcosified if bcosified and scratch else None,
    }


# ----------------------------------------------------------------------------------------------
# Interpretability
# ----------------------------------------------------------------------------------------------


# GridPG protocols. "whole_grid": the papers' protocol for models of any input size: the grid is
# explained in one pass. "windows": a window of the training size slides over the grid (stride
# half of it) and the maps are summed: the papers' protocol for fixed-size ViTs, applied here to
# CNNs too, because a CNN trained on single 28-px digits does not respond to a digit the same way
# at every cell of a 56-px grid (28 px is not a multiple of its total stride 16, and image borders
# differ), so the whole-grid score mixes that with the explanation's quality.
PROTOCOLS = {"whole_grid": "whole grid", "windows": "training-size windows"}


def explainers_by_protocol(model, method: str, window: tuple, args) -> dict:
    kwargs = {"steps": args.ig_steps} if method == "integrated_gradients" else {}
    explainers = {"windows": make_explainer(model, method, window=window, **kwargs)}
    if PixelClassifier.wrap(model).fixed_input_size is None:  # ViTs cannot take the whole grid
        explainers["whole_grid"] = make_explainer(model, method, **kwargs)
    return explainers


def accuracy_by_cell(model, images, labels, grid_size: int = 2) -> list:
    """Top-1 accuracy of each test digit placed alone in cell 0, 1, ... of an otherwise black
    grid-sized canvas: whether the classifier itself responds to a digit the same way in every
    cell (a CNN whose total stride does not divide the cell size may not)."""
    height, width = images.shape[-2:]
    accuracies = []
    for cell in range(grid_size * grid_size):
        row, col = divmod(cell, grid_size)
        canvas = images.new_zeros(len(images), images.shape[1], grid_size * height, grid_size * width)
        canvas[:, :, row * height : (row + 1) * height, col * width : (col + 1) * width] = images
        accuracies.append(top1_accuracy(model, canvas, labels, batch_size=250, progress=False))
    return accuracies


def gridpg(explainer, data, args, confident=None) -> dict:
    results = {}
    for grid_size in args.grid_sizes:
        result = evaluate_grid_pointing_game(
            explainer, data["test_images"], data["test_labels"], grid_size=grid_size, num_grids=args.num_grids,
            seed=args.grid_seed, batch_size=args.batch_size, progress=not args.no_progress, confident=confident,
        )
        results[grid_size] = result
    return results


def completeness(explainer, data, args) -> dict:
    count = min(args.completeness_images, len(data["test_labels"]))
    errors = completeness_errors(
        explainer, data["test_images"], data["test_labels"][:count], batch_size=args.batch_size,
        progress=not args.no_progress, indices=range(count),
    )
    return {key: value for key, value in errors.items() if not isinstance(value, torch.Tensor)}


def evaluate_family(family: str, data: dict, args) -> tuple:
    """Train, evaluate and explain one family; returns (JSON-able results, models for the figure)."""
    timings = {}
    started = time.perf_counter()
    source_dir = default_standard_model(family)
    with open(os.path.join(source_dir, TRAINING_SUMMARY_FILE), encoding="utf-8") as f:
        source_summary = json.load(f)
    timings["source (cached or trained)"] = time.perf_counter() - started
    source = PixelClassifier.from_pretrained(source_dir)
    images, labels = data["test_images"], data["test_labels"]
    progress = not args.no_progress

    print(f"[{family}] B-cosify + fine-tune {args.finetune_epochs} epoch(s); B-cos from scratch {args.scratch_epochs} epoch(s)", flush=True)
    run_dirs = {name: os.path.join(args.output_dir, "runs", f"{family}-{name}") for name in ("bcosified", "scratch")}
    bcosified_run = train(family, run_dirs["bcosified"], args.finetune_epochs, False, data["num_train"], args)
    scratch_run = train(family, run_dirs["scratch"], args.scratch_epochs, True, data["num_train"], args)
    timings["B-cosified fine-tuning"], timings["B-cos from scratch"] = bcosified_run["seconds"], scratch_run["seconds"]

    started = time.perf_counter()
    before = bcosified_before_finetuning(source_dir, data["train_images"])
    curves = {
        "bcosified": [(0.0, top1_accuracy(before, images, labels, progress=progress))]
        + accuracy_curve(run_dirs["bcosified"], bcosified_run["steps_per_epoch"], images, labels, progress),
        "scratch": accuracy_curve(run_dirs["scratch"], scratch_run["steps_per_epoch"], images, labels, progress),
    }
    models = {
        "bcosified": BcosForImageClassification.from_pretrained(run_dirs["bcosified"]).eval(),
        "bcosified_1_epoch": load_checkpoint(run_dirs["bcosified"], epoch_checkpoint(run_dirs["bcosified"], 1)),
        "bcosified_before": before,
        "scratch": BcosForImageClassification.from_pretrained(run_dirs["scratch"]).eval(),
    }
    timings["accuracy curves"] = time.perf_counter() - started
    if not args.keep_checkpoints:
        for run_dir in run_dirs.values():
            shutil.rmtree(CheckpointManager(run_dir).directory, ignore_errors=True)

    accuracies = {
        "source": top1_accuracy(source, images, labels, progress=progress),
        "bcosified": curves["bcosified"][-1][1],
        "bcosified_1_epoch": top1_accuracy(models["bcosified_1_epoch"], images, labels, progress=progress),
        "bcosified_before": curves["bcosified"][0][1],
        "scratch": curves["scratch"][-1][1],
    }
    speed = {
        "scratch_final_accuracy": accuracies["scratch"],
        "exact": training_speed(curves, accuracies["scratch"], args.scratch_epochs),
        "within_tolerance": training_speed(curves, accuracies["scratch"] - args.reach_tolerance, args.scratch_epochs),
    }

    # Interpretability: every (model, method) through the same GridPG and completeness code.
    started = time.perf_counter()
    rows = []
    explained = [("bcosified", "bcos"), ("bcosified_1_epoch", "bcos"), ("bcosified_before", "bcos"), ("scratch", "bcos")]
    explained += [("source", method) for method in POST_HOC_METHODS]
    source_confident = select_confident_images(source, images, labels, progress=progress)
    window = tuple(images.shape[-2:])  # the training size: the models were trained on these images
    for model_name, method in explained:
        model = source if model_name == "source" else models[model_name]
        confident = source_confident if model_name == "source" else select_confident_images(
            PixelClassifier.wrap(model), images, labels, progress=progress)
        row = {"model": model_name, "method": method, "accuracy": accuracies[model_name], "gridpg": {}, "gridpg_scores": {},
               "gridpg_seconds": {}}
        for protocol, explainer in explainers_by_protocol(model, method, window, args).items():
            print(f"  [{family}] {MODEL_NAMES[model_name]} / {METHOD_NAMES[method]} / {PROTOCOLS[protocol]}", flush=True)
            method_started = time.perf_counter()
            grid_results = gridpg(explainer, data, args, confident)
            row["gridpg"][protocol] = {str(g): r.to_dict() for g, r in grid_results.items()}
            row["gridpg_scores"][protocol] = {str(g): r.scores.flatten().tolist() for g, r in grid_results.items()}
            # Mean score per target cell (row-major): flat for a position-independent model.
            row["gridpg_cell_means"] = row.get("gridpg_cell_means", {})
            row["gridpg_cell_means"][protocol] = {str(g): r.scores.mean(0).tolist() for g, r in grid_results.items() if r.num_grids_built}
            row["gridpg_seconds"][protocol] = time.perf_counter() - method_started
        # Single test images at the training size: the same for every protocol.
        row["completeness"] = completeness(make_explainer(model, method, **(
            {"steps": args.ig_steps} if method == "integrated_gradients" else {})), data, args)
        rows.append(row)
    timings["interpretability"] = time.perf_counter() - started
    if models["bcosified"].config.image_size is None:  # any-size models: does a digit's cell matter?
        lone_digit_accuracy = {name: accuracy_by_cell(source if name == "source" else models[name], images, labels)
                               for name in ("source", "bcosified", "scratch")}
    else:
        lone_digit_accuracy = {}

    results = {
        "family": family,
        "source_dir": source_dir,
        "source_training": source_summary,
        "parameters": sum(p.numel() for p in models["scratch"].parameters()),
        "accuracies": accuracies,
        "curves": curves,
        "speed": speed,
        "training_logs": {"bcosified": bcosified_run["metrics"], "scratch": scratch_run["metrics"]},
        "rows": rows,
        "lone_digit_accuracy_by_cell": lone_digit_accuracy,
        "timings_seconds": timings,
    }
    return results, {**models, "source": source}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

MODEL_NAMES = {
    "source": "standard source (cross-entropy)",
    "bcosified": "B-cosified, fine-tuned k epochs",
    "bcosified_1_epoch": "B-cosified, after 1 epoch",
    "bcosified_before": "B-cosified, before fine-tuning",
    "scratch": "B-cos from scratch, K epochs",
}


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _epochs(value) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def _times(value) -> str:
    return "–" if value is None else f"{value:.1f}×"


def markdown_tables(results: dict) -> str:
    settings = results["settings"]
    tolerance = 100 * settings["reach_tolerance"]
    lines = [
        f"Embedded MNIST ({settings['train_images']} training / {settings['test_images']} test images), "
        f"k = {settings['finetune_epochs']} fine-tuning epochs, K = {settings['scratch_epochs']} from-scratch epochs, "
        f"test accuracy measured {settings['evals_per_epoch']}× per epoch.",
        "",
        "**Accuracy and training speed** (speed-up = K / epochs the B-cosified model needs; in brackets: the "
        "from-scratch run's first epoch at that accuracy / the B-cosified model's)",
        "",
        "| family | params | standard source | B-cosified before FT | B-cosified after 1 epoch | B-cosified after k | "
        "B-cos scratch after K | epochs to scratch's final: B-cosified / scratch | speed-up | "
        f"epochs to scratch's final − {tolerance:.1f} pt: B-cosified / scratch | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in results["families"]:
        r = results["per_family"][family]
        a, exact, close = r["accuracies"], r["speed"]["exact"], r["speed"]["within_tolerance"]
        lines.append(
            f"| {family} | {r['parameters'] / 1e6:.2f}M | {_percent(a['source'])} | {_percent(a['bcosified_before'])} | "
            f"{_percent(a['bcosified_1_epoch'])} | {_percent(a['bcosified'])} | {_percent(a['scratch'])} | "
            f"{_epochs(exact['bcosified_epochs'])} / {_epochs(exact['scratch_epochs'])} | "
            f"{_times(exact['speedup_vs_scratch_run'])} ({_times(exact['speedup_vs_scratch_first_reach'])}) | "
            f"{_epochs(close['bcosified_epochs'])} / {_epochs(close['scratch_epochs'])} | "
            f"{_times(close['speedup_vs_scratch_run'])} ({_times(close['speedup_vs_scratch_first_reach'])}) |"
        )
    notes = []
    for grid_size in settings["grid_sizes"]:
        lines += [
            "",
            f"**GridPG {grid_size}×{grid_size}**: mean / median (q1–q3) of the positive attribution mass in the target "
            f"cell; uniform = {1 / grid_size**2:.3f}, perfect = 1; {settings['num_grids']} grids requested per row, "
            f"seed {settings['grid_seed']}, no smoothing (28-px cells). Whole grid: the grid explained in one pass (the "
            "papers' protocol for CNNs); training-size windows: 28-px windows, stride 14, maps summed (the papers' "
            "protocol for fixed-size ViTs). Completeness error: max over "
            f"{settings['completeness_images']} test images of |Σ attribution − explained output| / max(|output|, Σ|attribution|).",
            "",
            "| family | model | method | accuracy | whole grid | training-size windows | completeness error |",
            "|---|---|---|---|---|---|---|",
        ]
        for family in results["families"]:
            for row in results["per_family"][family]["rows"]:
                cells = {p: row["gridpg"].get(p, {}).get(str(grid_size)) for p in PROTOCOLS}
                for protocol, result in cells.items():
                    if result is not None and result["stop_reason"]:
                        notes.append(f"- {family}, {MODEL_NAMES[row['model']]}, {grid_size}×{grid_size}, "
                                     f"{PROTOCOLS[protocol]}: {result['num_grids_built']} of {result['num_grids_requested']} "
                                     f"grids: {result['stop_reason']}.")
                error = row["completeness"].get("max_relative")
                error = "n/a (no output claimed)" if error is None else f"{error:.1e}"
                lines.append(
                    f"| {family} | {MODEL_NAMES[row['model']]} | {METHOD_NAMES[row['method']]} | {_percent(row['accuracy'])} | "
                    f"{gridpg_cell(cells['whole_grid'])} | {gridpg_cell(cells['windows'])} | {error} |"
                )
    position_rows = []
    for family in results["families"]:
        r = results["per_family"][family]
        for row in r["rows"]:
            lone = r["lone_digit_accuracy_by_cell"].get(row["model"])
            means = row.get("gridpg_cell_means", {})
            if lone is None or "whole_grid" not in means or "2" not in means["whole_grid"]:
                continue
            position_rows.append(
                f"| {family} | {MODEL_NAMES[row['model']]} | {METHOD_NAMES[row['method']]} | "
                + " / ".join(_percent(a) for a in lone) + " | "
                + " / ".join(f"{v:.2f}" for v in means["whole_grid"]["2"]) + " | "
                + " / ".join(f"{v:.2f}" for v in means.get("windows", {}).get("2", [])) + " |"
            )
    if position_rows:
        lines += [
            "",
            "**Position dependence of the CNNs** (cells 0 / 1 / 2 / 3 = top left / top right / bottom left / bottom "
            "right of a 2×2 grid): top-1 accuracy on a test digit placed alone in that cell of a black 56-px canvas, "
            "and the mean GridPG score per target cell.",
            "",
            "| family | model | method | lone-digit accuracy by cell | GridPG by cell, whole grid | GridPG by cell, windows |",
            "|---|---|---|---|---|---|",
        ] + position_rows
    if notes:
        lines += ["", "Grids that could not be built (the GridPG report):", ""] + sorted(set(notes))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The figures need matplotlib: pip install 'transformers-bcos[plots]'.") from error
    return plt


def save_figure(figure, path: str, dpi: int = 80) -> None:
    """Save as a PNG with a 256-colour palette: a third of the size, no visible difference."""
    plt = _pyplot()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(256)
    palette.save(path, optimize=True)


def plot_accuracy(results: dict, path: str) -> None:
    plt = _pyplot()
    families = results["families"]
    figure, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 3.6), squeeze=False)
    for axis, family in zip(axes[0], families):
        r = results["per_family"][family]
        for name, style in (("bcosified", "o-"), ("scratch", "s-")):
            epochs, accuracy = zip(*r["curves"][name])
            axis.plot(epochs, [100 * a for a in accuracy], style, markersize=3, label=MODEL_NAMES[name])
        axis.axhline(100 * r["accuracies"]["source"], color="grey", linestyle=":", label="standard source")
        axis.axhline(100 * r["speed"]["scratch_final_accuracy"], color="C1", linestyle="--", linewidth=0.8)
        reach = r["speed"]["exact"]["bcosified_epochs"]
        if reach is not None:
            axis.axvline(reach, color="C0", linestyle="--", linewidth=0.8)
        low = min(100 * a for name in ("bcosified", "scratch") for _, a in r["curves"][name][1:] or r["curves"][name])
        axis.set_ylim(max(0, low - 5), 100)
        axis.set_title(f"{family}: test accuracy")
        axis.set_xlabel("epoch")
        axis.set_ylabel("top-1 accuracy (%)")
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def plot_gridpg(results: dict, path: str) -> None:
    plt = _pyplot()
    families = results["families"]
    panels = [(g, p) for g in results["settings"]["grid_sizes"] for p in PROTOCOLS]
    figure, axes = plt.subplots(len(panels), len(families), figsize=(5.5 * len(families), 3.6 * len(panels)), squeeze=False)
    for i, (grid_size, protocol) in enumerate(panels):
        for axis, family in zip(axes[i], families):
            rows = results["per_family"][family]["rows"]
            boxes = [(row["gridpg_scores"][protocol][str(grid_size)], f"{MODEL_NAMES[row['model']]}\n{METHOD_NAMES[row['method']]}")
                     for row in rows if protocol in row["gridpg_scores"]]
            boxes = [(scores, name) for scores, name in boxes if scores]  # rows without grids have no box
            if boxes:
                axis.boxplot([scores for scores, _ in boxes], showmeans=True)
                axis.set_xticks(range(1, len(boxes) + 1), [name for _, name in boxes], rotation=40, ha="right", fontsize=6)
            else:
                axis.text(0.5, 0.5, "not applicable (fixed input size)", ha="center", va="center", transform=axis.transAxes)
                axis.set_xticks([])
            axis.axhline(1 / grid_size**2, color="grey", linestyle=":", label="uniform")
            axis.set_ylim(-0.02, 1.02)
            axis.set_title(f"{family}: GridPG {grid_size}×{grid_size}, {PROTOCOLS[protocol]}", fontsize=9)
            axis.set_ylabel("positive mass in the target cell", fontsize=8)
            axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def _first_of_class(labels: torch.Tensor, digit: int) -> int:
    return int(torch.nonzero(labels == digit)[0])


def plot_explanations(family: str, models: dict, data: dict, args, path: str) -> None:
    """Rows: example digits, then a 2×2 grid explained for its top-left and bottom-right digit, with
    each GridPG protocol the family has (see PROTOCOLS). Columns: input, the B-cosified model's
    RGBA explanation, contribution maps of the B-cos models, post-hoc maps of the standard source."""
    plt = _pyplot()
    images, labels = data["test_images"], data["test_labels"]
    window = tuple(images.shape[-2:])
    present = set(labels.tolist())
    rows = [(f"digit {d}", images[_first_of_class(labels, d)][None], d, None) for d in EXAMPLE_DIGITS if d in present]
    if all(d in present for d in EXAMPLE_GRID_DIGITS):
        grid = build_grid(torch.stack([images[_first_of_class(labels, d)] for d in EXAMPLE_GRID_DIGITS]), 2)[None]
        # CNNs: the whole grid (as GridPG's whole-grid protocol) and training-size windows; ViTs: windows only.
        protocols = [None, window] if models["bcosified"].config.image_size is None else [window]
        for protocol in protocols:
            how = "whole grid" if protocol is None else "windows"
            rows += [(f"grid ({how}),\ntarget {EXAMPLE_GRID_DIGITS[0]} (top left)", grid, EXAMPLE_GRID_DIGITS[0], protocol),
                     (f"grid ({how}),\ntarget {EXAMPLE_GRID_DIGITS[-1]} (bottom right)", grid, EXAMPLE_GRID_DIGITS[-1], protocol)]
    columns = [("B-cosified FT\nRGBA", "bcosified", "rgba"), ("B-cosified FT\ncontributions", "bcosified", "bcos"),
               ("B-cosified 1 epoch", "bcosified_1_epoch", "bcos"), ("B-cosified\nbefore FT", "bcosified_before", "bcos"),
               ("B-cos scratch", "scratch", "bcos"), ("standard\ninput×gradient", "source", "input_x_gradient"),
               (f"standard\nIG ({args.ig_steps}, black)", "source", "integrated_gradients"), ("standard\nGrad-CAM", "source", "grad_cam")]
    explainers = {}
    figure, axes = plt.subplots(len(rows), len(columns) + 1, figsize=(1.25 * (len(columns) + 1), 1.35 * len(rows) + 0.6), squeeze=False)
    for r, (row_name, pixels, target, protocol) in enumerate(rows):
        axes[r, 0].imshow(pixels[0].permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(row_name, fontsize=6)
        for c, (column_name, model_name, method) in enumerate(columns, start=1):
            axis = axes[r, c]
            model = models[model_name]
            if method == "rgba":
                if protocol is not None and pixels.shape[-2:] != protocol:
                    # One W(x) per window: the windows' weights do not add up to one image's W(x).
                    axis.text(0.5, 0.5, "windows:\nno single W(x)", ha="center", va="center", fontsize=5)
                else:
                    axis.imshow(rgba_on_background(model.explain(pixels, target=target).to_rgba()[0], background=0.0))
            else:
                key = (model_name, method, protocol)
                if key not in explainers:
                    kwargs = {"steps": args.ig_steps} if method == "integrated_gradients" else {}
                    explainers[key] = make_explainer(model, method, window=protocol, **kwargs)
                maps = explainers[key].explain(pixels, torch.tensor([target])).maps[0]
                axis.imshow(contribution_heatmap(maps))
            if r == 0:
                axis.set_title(column_name, fontsize=6)
        axes[0, 0].set_title("input", fontsize=6)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"{family}: explanations of the target logit (red = positive, blue = negative; clipped at the 99.5th percentile)", fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


# ----------------------------------------------------------------------------------------------


def code_version() -> str:
    """The git commit of the checkout (with "+changes" when the working tree differs), if known."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if changed else "")


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "code_version": code_version(),
    }


TINY_NOTICE = (
    "--tiny is a smoke test (a few hundred images, 1 + 4 epochs, a handful of grids): its numbers mean nothing, "
    "ViT rows can be below chance. Run without --tiny for the measurements."
)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        print(TINY_NOTICE, flush=True)
    # The GridPG reports (how many grids, from how many confident images) are logged by the library.
    logging.getLogger("transformers_bcos.evaluation").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="    %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    os.makedirs(args.figures_dir, exist_ok=True)
    data = load_data(args)
    results = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("output_dir", "figures_dir")},
            "train_images": data["num_train"],
            "test_images": len(data["test_labels"]),
        },
        "machine": machine(),
        "families": args.families,
        "per_family": {},
    }
    figures = {}
    for family in args.families:
        family_results, models = evaluate_family(family, data, args)
        results["per_family"][family] = family_results
        figures[f"explanations_{family}"] = os.path.join(args.figures_dir, f"explanations_{family}.png")
        plot_explanations(family, models, data, args, figures[f"explanations_{family}"])
    figures["accuracy_vs_epoch"] = os.path.join(args.figures_dir, "accuracy_vs_epoch.png")
    plot_accuracy(results, figures["accuracy_vs_epoch"])
    figures["gridpg_boxplots"] = os.path.join(args.figures_dir, "gridpg_boxplots.png")
    plot_gridpg(results, figures["gridpg_boxplots"])
    results["figures"] = figures
    results["total_seconds"] = time.perf_counter() - started

    table = markdown_tables(results)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
        f.write(f"\nTotal time: {results['total_seconds'] / 60:.1f} min on {results['machine']['cpu_count']} CPU cores "
                f"({results['machine']['torch_threads']} torch threads).\n")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(table)
    print(f"Wrote {args.output_dir}/results.md, results.json and {len(figures)} figures in {results['total_seconds'] / 60:.1f} min.")
    if args.tiny:
        print(TINY_NOTICE)
    return results


if __name__ == "__main__":
    main()
