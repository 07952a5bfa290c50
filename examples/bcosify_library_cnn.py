#!/usr/bin/env python
"""B-cosify a torchvision (or timm) CNN trained on the embedded MNIST, fine-tune it, measure it.

    OMP_NUM_THREADS=1 python examples/bcosify_library_cnn.py [--write_results RESULTS.md]

Needs torchvision (``--library timm``: timm). The steps, as for the default transformers ResNet
of RESULTS.md (`examples/reproduce.py`):

1. **Standard source.** torchvision's ``resnet18(num_classes=10)`` is trained with cross-entropy
   on the embedded MNIST training digits with the default ResNet's recipe
   (`transformers_bcos.defaults.STANDARD_MODEL_RECIPES["resnet"]`: AdamW, lr 1e-3, cosine with 5%
   warm-up, batch 64, 5 epochs, seed 0, one torch thread) and cached under
   ``$TRANSFORMERS_BCOS_CACHE`` (default ``~/.cache/transformers_bcos``), as the default models
   are. As there, the grey digits are read as RGB (``to_rgb``) and normalised with MNIST's mean and
   std repeated over the three channels, at their own 28 px.
2. **B-cosify** it (`bcosify_pretrained(module, image_mean=, image_std=, image_size=28)`), give it
   the data's label names and save it: the folder records the library, architecture and
   ``num_classes``, so it reloads without the module.
3. **Fine-tune** that folder with `examples/finetune.py`'s `run_finetuning` (the same as
   ``python examples/finetune.py --model FOLDER --bn_reestimation_images 1000 ...``): BatchNorm
   statistics re-estimated on 1,000 training images, then the embedded-MNIST recipe for a CNN
   (lr 1e-3, cosine, AGC 0.01) for ``--finetune_epochs`` epochs. A saved B-cos folder continues
   training, which re-estimates nothing by default, hence the explicit flag.
4. **Measure** on the test digits: accuracy of the standard source, of the B-cosified model before
   fine-tuning (after the re-estimation), after one epoch and after the last; GridPG 2×2 (200
   grids, seed 42, whole grid and 28-px training-size windows, as RESULTS.md) and the completeness
   error of the B-cos contributions, and of input×gradient of the standard source
   (``--ig_steps N`` adds Integrated Gradients, slow for an 11M-parameter CNN on CPU).

Why ResNet-18: it is torchvision's (and the B-cosification paper's) reference CNN, converts with
the rules (convolutions, batch norms, ReLU, max pooling, global average pooling, a linear head)
and, at MNIST's 28 px, costs 0.6 s per batch of 64 on one CPU thread (40–60 s per epoch measured here),
so the whole run took 10.9 min on 2 shared CPU cores. Its stride-32 design reduces a 28-px
digit to 1×1 in the last stage; that is its standard form, kept as it is (no CIFAR-style stem),
because the point is to convert the library's model unchanged.

Writes results.json and results.md to ``--output_dir``; ``--write_results RESULTS.md`` also puts
the tables into that file, between its ``library-cnn`` markers.
"""

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_scheduler
from transformers.modeling_outputs import ImageClassifierOutput

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers_bcos.data import load_image_classification_data, to_rgb
from transformers_bcos.defaults import MNIST_MEAN, MNIST_STD, STANDARD_MODEL_RECIPES, default_cache_dir
from transformers_bcos.evaluation import (
    PixelClassifier,
    completeness_errors,
    evaluate_grid_pointing_game,
    make_explainer,
    select_confident_images,
    top1_accuracy,
)
from transformers_bcos.evaluation.reporting import gridpg_cell, run_description, write_experiment_results
from transformers_bcos.training import FinetuneOptions, reestimate_batchnorm_statistics, run_finetuning
from transformers_bcos.training.checkpointing import CheckpointManager

# The default transformers ResNet's cross-entropy recipe (epochs, lr, weight decay, batch size).
RECIPE = STANDARD_MODEL_RECIPES["resnet"]
SUMMARY_FILE = "training_summary.json"
SECTION = "library-cnn"
PROTOCOLS = {"whole_grid": "whole grid", "windows": "training-size windows"}
MODEL_NAMES = {
    "finetuned": "B-cosified, fine-tuned {k} epoch(s)",
    "one_epoch": "B-cosified, after 1 epoch",
    "before": "B-cosified, before fine-tuning",
    "source": "standard source",
}
METHOD_NAMES = {"bcos": "B-cos contributions", "input_x_gradient": "input×gradient",
                "integrated_gradients": "Integrated Gradients ({steps})"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--library", choices=["torchvision", "timm"], default="torchvision")
    parser.add_argument("--architecture", default="resnet18",
                        help="torchvision.models.get_model / timm.create_model name, built with num_classes=10.")
    parser.add_argument("--output_dir", default="outputs/bcosify-library-cnn")
    parser.add_argument("--standard_epochs", type=int, default=RECIPE["epochs"], help="Cross-entropy epochs of the source.")
    parser.add_argument("--finetune_epochs", type=int, default=4, help="k: B-cos fine-tuning epochs (RESULTS.md's ResNet: 4).")
    parser.add_argument("--bn_reestimation_images", type=int, default=1000)
    parser.add_argument("--num_grids", type=int, default=200, help="GridPG 2×2 grids per row.")
    parser.add_argument("--grid_seed", type=int, default=42)
    parser.add_argument("--completeness_images", type=int, default=200)
    parser.add_argument("--ig_steps", type=int, default=0, help="Integrated Gradients steps for the source (0: not run).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Training digits (default: all 4,000).")
    parser.add_argument("--max_test_samples", type=int, default=None, help="Test digits (default: all 1,000).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images (grids) explained per pass.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--keep_checkpoints", action="store_true", help="Keep the fine-tuning checkpoints.")
    parser.add_argument("--progress", action="store_true", help="Progress bars.")
    parser.add_argument("--write_results", default=None, metavar="RESULTS.md")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data and the standard source
# ----------------------------------------------------------------------------------------------


def pixel_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, 28, 28) RGB in [0, 1]: the grey digits read as RGB, as the default models do."""
    return torch.stack([torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).float() / 255 for image in images])


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """MNIST's mean/std over the three channels (`transformers_bcos.defaults.mnist_image_processor`)."""
    return (pixels - torch.tensor(MNIST_MEAN).view(1, 3, 1, 1)) / torch.tensor(MNIST_STD).view(1, 3, 1, 1)


def build_standard_model(library: str, architecture: str, num_classes: int) -> nn.Module:
    """A torchvision or timm classifier with random weights (the libraries are imported only here)."""
    if library == "timm":
        import timm

        return timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    import torchvision.models

    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def train_standard_model(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> float:
    """Cross-entropy with the default ResNet's recipe (`transformers_bcos.defaults`); returns the seconds."""
    batch_size = RECIPE["batch_size"]
    steps = epochs * -(-len(labels) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"], weight_decay=RECIPE["weight_decay"])
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    inputs = normalise(pixels)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return time.perf_counter() - started


def standard_source(args, data: dict) -> tuple:
    """(the trained standard model in eval mode, its training summary): from the cache, or trained
    now and cached (the folder appears atomically, as `default_standard_model`'s)."""
    name = (f"mnist-{args.library}-{args.architecture}-standard-e{args.standard_epochs}-n{len(data['train_labels'])}"
            f"-seed{args.seed}-v1")
    cache_dir = default_cache_dir()
    folder = os.path.join(cache_dir, name)
    num_classes = len(data["labels"])
    torch.manual_seed(args.seed)
    model = build_standard_model(args.library, args.architecture, num_classes)
    if os.path.isfile(os.path.join(folder, SUMMARY_FILE)):
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        with open(os.path.join(folder, SUMMARY_FILE), encoding="utf-8") as f:
            return model.eval(), {**json.load(f), "cached": True, "folder": folder}
    seconds = train_standard_model(model, data["train_images"], data["train_labels"], args.standard_epochs, args.seed)
    summary = {"library": args.library, "architecture": args.architecture, "num_classes": num_classes,
               "train_examples": len(data["train_labels"]), "epochs": args.standard_epochs,
               "learning_rate": RECIPE["learning_rate"], "weight_decay": RECIPE["weight_decay"],
               "batch_size": RECIPE["batch_size"], "seed": args.seed, "train_seconds": round(seconds, 1),
               "image_mean": list(MNIST_MEAN), "image_std": list(MNIST_STD), "image_size": 28}
    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(staging, "model.safetensors"))
        with open(os.path.join(staging, SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished first; its folder is complete
            if not os.path.isfile(os.path.join(folder, SUMMARY_FILE)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model.eval(), {**summary, "cached": False, "folder": folder}


class LogitsOutput(nn.Module):
    """A torchvision/timm classifier as the evaluation code calls a transformers one:
    ``model(pixel_values=...).logits``; no hidden states, so no Grad-CAM."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module = module
        self.config = SimpleNamespace(model_type=name, problem_type="single_label_classification")

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        return ImageClassifierOutput(logits=self.module(pixel_values))


# ----------------------------------------------------------------------------------------------
# B-cosify and fine-tune
# ----------------------------------------------------------------------------------------------


def bcosify_and_save(standard: nn.Module, labels: list, folder: str) -> dict:
    """B-cosify the standard model, give it the data's label names, save it; check that the folder
    reloads without the module and gives the same logits."""
    model = bcosify_pretrained(standard, image_mean=list(MNIST_MEAN), image_std=list(MNIST_STD), image_size=28)
    model.config.id2label = {i: name for i, name in enumerate(labels)}
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.save_pretrained(folder)
    reloaded = BcosForImageClassification.from_pretrained(folder).eval()
    probe = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (reloaded(probe).logits - model.eval()(probe).logits).abs().max().item()
    backbone = model.config.backbone_config
    return {"folder": folder, "library": backbone.library, "architecture": backbone.architecture,
            "architecture_kwargs": dict(backbone.architecture_kwargs),
            "parameters": sum(p.numel() for p in model.parameters()), "reload_max_logit_difference": difference}


def finetune_options(args, model_folder: str, run_dir: str, num_train: int) -> FinetuneOptions:
    return FinetuneOptions(
        model=model_folder,
        dataset="embedded:mnist",
        output_dir=run_dir,
        num_train_epochs=args.finetune_epochs,
        bn_reestimation_images=min(args.bn_reestimation_images, num_train),
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_test_samples,
        keep_last_checkpoints=10_000,  # every epoch's: the one-epoch row is read from the first
        overwrite_output_dir=True,
        seed=args.seed,
        disable_progress_bar=not args.progress,
    )


def finetune_command(options: FinetuneOptions) -> str:
    """The examples/finetune.py command line that runs ``options``."""
    flags = [("--model", options.model), ("--output_dir", options.output_dir), ("--num_train_epochs", options.num_train_epochs),
             ("--bn_reestimation_images", options.bn_reestimation_images), ("--keep_last_checkpoints", options.keep_last_checkpoints),
             ("--seed", options.seed), ("--max_train_samples", options.max_train_samples),
             ("--max_eval_samples", options.max_eval_samples)]
    text = " ".join(f"{flag} {shlex.quote(str(value))}" for flag, value in flags if value is not None)
    return f"python examples/finetune.py {text} --overwrite_output_dir"


def load_epoch_checkpoint(run_dir: str, epoch: int) -> BcosForImageClassification:
    """The fine-tuned model with the weights of the checkpoint written after ``epoch``."""
    model = BcosForImageClassification.from_pretrained(run_dir)
    checkpoint = os.path.join(CheckpointManager(run_dir).directory, f"epoch_{epoch:04d}")
    model.load_state_dict(load_file(os.path.join(checkpoint, "model.safetensors")))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Measurements (the evaluation code of examples/reproduce.py)
# ----------------------------------------------------------------------------------------------


def explain_rows(models: dict, data: dict, args) -> list:
    """GridPG 2×2 (whole grid and training-size windows) and completeness for every (model, method)."""
    images, labels = data["test_images"], data["test_labels"]
    progress = args.progress
    window = tuple(images.shape[-2:])
    methods = [("finetuned", "bcos"), ("one_epoch", "bcos"), ("before", "bcos"), ("source", "input_x_gradient")]
    if args.ig_steps:
        methods.append(("source", "integrated_gradients"))
    rows = []
    for model_name, method in methods:
        classifier = models[model_name]
        kwargs = {"steps": args.ig_steps} if method == "integrated_gradients" else {}
        confident = select_confident_images(classifier, images, labels, progress=progress)
        row = {"model": model_name, "method": method, "gridpg": {}, "gridpg_seconds": {}}
        explainers = {"whole_grid": make_explainer(classifier, method, **kwargs),
                      "windows": make_explainer(classifier, method, window=window, **kwargs)}
        for protocol, explainer in explainers.items():
            print(f"  GridPG 2×2: {model_name} / {method} / {PROTOCOLS[protocol]}", flush=True)
            started = time.perf_counter()
            result = evaluate_grid_pointing_game(explainer, images, labels, grid_size=2, num_grids=args.num_grids,
                                                 seed=args.grid_seed, batch_size=args.batch_size, progress=progress,
                                                 confident=confident)
            row["gridpg"][protocol] = result.to_dict()
            row["gridpg_seconds"][protocol] = time.perf_counter() - started
        count = min(args.completeness_images, len(labels))
        errors = completeness_errors(make_explainer(classifier, method, **kwargs), images, labels[:count],
                                     batch_size=args.batch_size, progress=progress, indices=range(count))
        row["completeness"] = {k: v for k, v in errors.items() if not isinstance(v, torch.Tensor)}
        rows.append(row)
    return rows


def _percent(value) -> str:
    return f"{100 * value:.1f}%"


def results_text(record: dict, args) -> str:
    s, c, a, run = record["source"], record["bcos"], record["accuracies"], record["finetuning"]
    k = args.finetune_epochs
    name = f"{args.library} `{args.architecture}`"
    epochs = " / ".join(_percent(e["eval_accuracy"]) for e in run["metrics"]["epochs"])
    lines = [
        f"Embedded MNIST ({record['train_images']:,} training / {record['test_images']:,} test digits, 28 px, read as RGB). "
        f"Source: {name} (`num_classes={c['architecture_kwargs'].get('num_classes')}`), {c['parameters'] / 1e6:.2f}M "
        f"parameters, trained with cross-entropy for {s['epochs']} epoch(s) with the default ResNet's recipe. B-cosified, saved "
        f"(the folder records `{c['library']}` / `{c['architecture']}` and reloads without the module: largest logit "
        f"difference {c['reload_max_logit_difference']:.1e}), then fine-tuned from that folder for k = {k} epoch(s) by "
        f"`run_finetuning` (BatchNorm re-estimation on {run['options']['bn_reestimation_images']:,} training images first).",
        "",
        "| family | params | standard source | B-cosified before FT | B-cosified after 1 epoch | B-cosified after k = "
        f"{k} | after each epoch |",
        "|---|---|---|---|---|---|---|",
        f"| {name} | {c['parameters'] / 1e6:.2f}M | {_percent(a['source'])} | {_percent(a['before'])} | "
        f"{_percent(a['one_epoch'])} | {_percent(a['finetuned'])} | {epochs} |",
        "",
        "\"Before FT\": right after conversion plus BatchNorm re-estimation on the first "
        f"{record['before_bn_images']:,} training images (no gradient step); the fine-tuning run logs "
        f"{_percent(run['metrics']['accuracy_before_bn_reestimation'])} before and "
        f"{_percent(run['metrics']['accuracy_after_bn_reestimation'])} after its own re-estimation.",
        "",
        f"GridPG 2×2 ({args.num_grids} grids per row, seed {args.grid_seed}, uniform = 0.25): mean / median "
        "(quartiles) of the positive attribution mass in the target cell; whole grid and training-size (28-px, "
        f"stride 14) windows as above. Completeness error: the largest over {args.completeness_images} test images.",
        "",
        "| model | method | accuracy | whole grid | training-size windows | completeness error |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for row in record["rows"]:
        model = MODEL_NAMES[row["model"]].format(k=k)
        method = METHOD_NAMES[row["method"]].format(steps=args.ig_steps)
        error = row["completeness"].get("max_relative")
        lines.append(f"| {name}: {model} | {method} | {_percent(a[row['model']])} | "
                     f"{gridpg_cell(row['gridpg']['whole_grid'])} | {gridpg_cell(row['gridpg']['windows'])} | "
                     f"{'n/a' if error is None else f'{error:.1e}'} |")
        for protocol, result in row["gridpg"].items():
            if result["stop_reason"]:
                notes.append(f"- {model}, {PROTOCOLS[protocol]}: {result['report']}")
    if notes:
        lines += ["", "The GridPG reports of grids that could not all be built:", ""] + sorted(set(notes))
    t = record["timings_seconds"]
    source_time = ("cached" if s["cached"] else f"{t['standard source'] / 60:.1f} min")
    lines += [
        "",
        f"Run: {run_description(record['minutes'])}, {record['machine']['torch_threads']} torch thread(s), "
        f"{record['machine']['library']}; code {record['machine']['code_version']}. Time: {record['minutes']:.1f} min "
        f"(standard source {source_time}, fine-tuning {t['fine-tuning'] / 60:.1f} min, "
        f"evaluation {t['evaluation'] / 60:.1f} min); one seed ({args.seed}).",
        f"Command: `{record['command']}`; its fine-tuning is `{run['command']}`.",
    ]
    return "\n".join(lines)


def code_version() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if changed else "")


def machine(library: str) -> dict:
    version = __import__(library).__version__
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "library": f"{library} {version}", "code_version": code_version()}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    # The GridPG reports (how many grids, from how many confident images) are logged by the library.
    logging.getLogger("transformers_bcos.evaluation").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="    %(message)s")
    started = time.perf_counter()
    timings = {}

    split = load_image_classification_data(None, max_train_samples=args.max_train_samples,
                                           max_eval_samples=args.max_test_samples, seed=args.seed)
    data = {"labels": split.labels,
            "train_images": pixel_tensor(split.train[split.image_column]),
            "train_labels": torch.tensor(split.train[split.label_column]),
            "test_images": pixel_tensor(split.eval[split.image_column]),
            "test_labels": torch.tensor(split.eval[split.label_column])}

    step = time.perf_counter()
    standard, source_summary = standard_source(args, data)
    timings["standard source"] = time.perf_counter() - step
    print(f"Standard source: {args.library} {args.architecture} ({'cached' if source_summary['cached'] else 'trained'}, "
          f"{source_summary['folder']}).", flush=True)

    step = time.perf_counter()
    converted = bcosify_and_save(standard, data["labels"], os.path.join(args.output_dir, "bcos-before-finetuning"))
    timings["conversion"] = time.perf_counter() - step

    step = time.perf_counter()
    run_dir = os.path.join(args.output_dir, "bcos-finetuned")
    options = finetune_options(args, converted["folder"], run_dir, len(data["train_labels"]))
    metrics = run_finetuning(options)
    timings["fine-tuning"] = time.perf_counter() - step

    step = time.perf_counter()
    before = BcosForImageClassification.from_pretrained(converted["folder"]).eval()
    before_images = data["train_images"][: args.bn_reestimation_images]
    reestimate_batchnorm_statistics(before, before_images.split(64))
    bcos_models = {"finetuned": BcosForImageClassification.from_pretrained(run_dir).eval(),
                   "one_epoch": load_epoch_checkpoint(run_dir, 1), "before": before.eval()}
    models = {name: PixelClassifier.wrap(model) for name, model in bcos_models.items()}
    models["source"] = PixelClassifier(LogitsOutput(standard, args.library), MNIST_MEAN, MNIST_STD, confidence="softmax")
    accuracies = {name: top1_accuracy(model, data["test_images"], data["test_labels"], progress=args.progress)
                  for name, model in models.items()}
    print("Accuracies: " + ", ".join(f"{name} {_percent(value)}" for name, value in accuracies.items()), flush=True)
    rows = explain_rows(models, data, args)
    timings["evaluation"] = time.perf_counter() - step
    if not args.keep_checkpoints:
        shutil.rmtree(CheckpointManager(run_dir).directory, ignore_errors=True)

    minutes = (time.perf_counter() - started) / 60
    record = {
        "arguments": vars(args),
        "command": "python examples/bcosify_library_cnn.py" + "".join(f" {shlex.quote(a)}" for a in argv),
        "machine": machine(args.library),
        "train_images": len(data["train_labels"]),
        "test_images": len(data["test_labels"]),
        "before_bn_images": len(before_images),
        "source": source_summary,
        "bcos": converted,
        "finetuning": {"options": vars(options), "command": finetune_command(options), "metrics": metrics},
        "accuracies": accuracies,
        "rows": rows,
        "timings_seconds": timings,
        "minutes": minutes,
    }
    text = results_text(record, args)
    write_experiment_results(args.output_dir, record, text, args.write_results, SECTION)
    return record


if __name__ == "__main__":
    main()
