#!/usr/bin/env python
"""Model guidance under a spurious cue, on real MNIST digits (offline, CPU; RESULTS.md's section).

    python examples/model_guidance.py [--seeds 0 1 2] [--fractions 1 0.1 0.01] [--write_results RESULTS.md]

The embedded MNIST digits get a small white mark in the image border. In the training split its
position (one of ten) is the label's in ``--cue_strength`` (95 %) of the images and random in
the others. The default standard ResNet (`default:resnet`) is B-cosified and fine-tuned on them
with `examples/finetune.py`'s `run_finetuning`: once without guidance, and once with the energy
loss on the digit's own box (`foreground_box` of the digit before the mark was drawn) for each
fraction of annotated training images, for each seed. Each model is then tested on the test
digits with the mark at the label's position (the cue holds), at a random position (the cue says
nothing) and without a mark; the energy pointing game (the share of the positive contribution to
the label's logit that lies in the digit's box) is measured on the random-mark test images.

Writes results.json, results.md and explanations.png (the first seed's models explaining six
random-mark test digits) to ``--output_dir``; ``--write_results RESULTS.md`` also puts the table
into that file, between its model-guidance markers.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from transformers_bcos import BcosForImageClassification
from transformers_bcos.data import (
    ImageClassificationDataset,
    ImageProcessorCollator,
    boxes_of,
    image_processor_from_dict,
    load_embedded_dataset,
)
from transformers_bcos.evaluation.energy_pointing_game import energy_pointing_game_scores
from transformers_bcos.evaluation.reporting import mean_and_spread, run_description, write_experiment_results
from transformers_bcos.training import FinetuneOptions, run_finetuning
from transformers_bcos.training.guidance import foreground_box
from transformers_bcos.visualization import contribution_heatmap

# Ten 3×3 mark positions (x, y) in the border rows of a 28×28 digit, one per class.
MARK_SIZE = 3
MARK_POSITIONS = [(x, y) for y in (0, 25) for x in (2, 7, 12, 17, 22)]
TEST_CUES = ("label", "random", "none")


def with_mark(image: PILImage.Image, position) -> PILImage.Image:
    marked = np.array(image)
    x, y = position
    marked[y : y + MARK_SIZE, x : x + MARK_SIZE] = 255
    return PILImage.fromarray(marked)


def spurious_cue_split(split: Dataset, cue: str, cue_strength: float, seed: int) -> Dataset:
    """``split`` with a mark at the label's position ("label": with probability ``cue_strength``, else
    at another random one), at a random position ("random") or none ("none"), and each digit's box
    (computed before the mark is drawn) in an ``objects`` column."""
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for image, label in zip(split["image"], split["label"]):
        box = foreground_box(image, threshold=0.1)
        boxes.append({"bbox": [box] if box else []})
        if cue == "label":
            position = label if rng.random() < cue_strength else rng.choice([p for p in range(10) if p != label])
        else:
            position = int(rng.integers(10))
        images.append(image if cue == "none" else with_mark(image, MARK_POSITIONS[position]))
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)]),
                         "objects": {"bbox": Sequence(Sequence(Value("float32"), length=4))}})
    return Dataset.from_dict({"image": images, "label": split["label"], "objects": boxes}, features=features)


def build_data(folder: str, cue_strength: float) -> dict:
    """The training data set (train: cue 95 %, test: random cue) saved to ``folder``, and the three test variants."""
    mnist = load_embedded_dataset("mnist")
    tests = {cue: spurious_cue_split(mnist["test"], cue, cue_strength, seed=1) for cue in TEST_CUES}
    DatasetDict({"train": spurious_cue_split(mnist["train"], "label", cue_strength, seed=0),
                 "test": tests["random"]}).save_to_disk(folder)
    return tests


@torch.no_grad()
def test_model(folder: str, tests: dict) -> dict:
    model = BcosForImageClassification.from_pretrained(folder).eval()
    collator = ImageProcessorCollator(image_processor_from_dict(model.config.image_processor))
    measured = {}
    for cue, split in tests.items():
        dataset = ImageClassificationDataset(split, "image", "label", box_column="objects")
        loader = torch.utils.data.DataLoader(dataset, batch_size=250, collate_fn=collator)
        correct, scores = 0, []
        for batch in loader:
            correct += (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
            if cue == "random":
                annotated = batch["annotated"]
                explanation = model.explain(pixel_values=batch["pixel_values"][annotated], target=batch["labels"][annotated])
                scores.append(energy_pointing_game_scores(explanation.contributions, masks=batch["guidance_masks"][annotated]))
        measured[f"accuracy_cue_{cue}"] = correct / len(split)
        if scores:
            measured["energy_pointing_game"] = torch.cat(scores).mean().item()
    return measured


@torch.no_grad()
def explanation_figure(path: str, models: dict, split: Dataset, num_images: int = 6, scale: int = 6) -> None:
    """A PNG: the first ``num_images`` digits of ``split`` (their box outlined), then one row per
    model of ``models`` (row label -> folder): the contributions to the label's logit, red for
    evidence for it, blue against, each map scaled to its own 99.5th percentile."""
    dataset = ImageClassificationDataset(split, "image", "label", box_column="objects")
    examples = [dataset[i] for i in range(num_images)]
    side, margin = 28 * scale, 150
    sheet = PILImage.new("RGB", (margin + num_images * (side + 4), (len(models) + 1) * (side + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=15)
    boxes = [boxes_of(split[i]["objects"]) for i in range(num_images)]

    def paste(row: int, column: int, pixels: np.ndarray) -> None:
        x, y = margin + column * (side + 4), row * (side + 4)
        sheet.paste(PILImage.fromarray(pixels).resize((side, side), PILImage.NEAREST), (x, y))
        for x0, y0, x1, y1 in boxes[column]:
            draw.rectangle([x + x0 * scale, y + y0 * scale, x + x1 * scale - 1, y + y1 * scale - 1], outline=(0, 200, 0))

    draw.text((4, side // 2), "test digit,\nmark at random,\ndigit box green", fill="black", font=font)
    for column, example in enumerate(examples):
        paste(0, column, np.asarray(example["image"]))
    for row, (label, folder) in enumerate(models.items(), start=1):
        model = BcosForImageClassification.from_pretrained(folder).eval()
        batch = ImageProcessorCollator(image_processor_from_dict(model.config.image_processor))(examples)
        explanation = model.explain(pixel_values=batch["pixel_values"], target=batch["labels"])
        draw.text((4, row * (side + 4) + side // 2), label, fill="black", font=font)
        for column, contributions in enumerate(explanation.contributions):
            paste(row, column, contribution_heatmap(contributions))
    sheet.save(path)


def results_table(runs: list, args) -> str:
    rows = ["| guidance | annotated training images | accuracy, cue holds | accuracy, random cue | accuracy, no cue | "
            "energy pointing game (random cue) |", "|---|---|---|---|---|---|"]
    settings = [("none", None)] + [("energy", f) for f in args.fractions]
    for loss, fraction in settings:
        chosen = [r for r in runs if r["guidance"] == loss and r["fraction"] == fraction]
        if not chosen:
            continue
        annotated = "–" if fraction is None else f"{fraction:.0%} ({chosen[0]['annotated_images']:,})"
        cells = [mean_and_spread([r[f"accuracy_cue_{cue}"] for r in chosen]) for cue in TEST_CUES]
        cells.append(mean_and_spread([r["energy_pointing_game"] for r in chosen]))
        rows.append(f"| {loss if loss == 'none' else f'energy × {args.guidance_weight:g}'} | {annotated} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/model-guidance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    parser.add_argument("--cue_strength", type=float, default=0.95)
    parser.add_argument("--guidance_weight", type=float, default=1.0)
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--max_train_samples", type=int, default=None, help="Fewer training images (quick runs).")
    parser.add_argument("--learning_rate", type=float, default=1e-3,
                        help="1e-3, the embedded-MNIST value of the recipe (its data set here is a folder).")
    parser.add_argument("--from_scratch", action="store_true", help="Train B-cos ResNets from scratch instead.")
    parser.add_argument("--write_results", default=None, metavar="RESULTS.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    started = time.perf_counter()
    data_folder = os.path.join(args.output_dir, "data")
    tests = build_data(data_folder, args.cue_strength)
    runs = []
    settings = [("none", None)] + [("energy", f) for f in args.fractions]
    for seed in args.seeds:
        for loss, fraction in settings:
            name = f"{loss}-{fraction}-seed{seed}" if fraction is not None else f"none-seed{seed}"
            folder = os.path.join(args.output_dir, "runs", name)
            run_started = time.perf_counter()
            metrics = run_finetuning(FinetuneOptions(
                model=None if args.from_scratch else "default:resnet",
                from_scratch="resnet" if args.from_scratch else None, learning_rate=args.learning_rate,
                dataset=data_folder, output_dir=folder, overwrite_output_dir=True,
                num_train_epochs=args.num_train_epochs, max_train_samples=args.max_train_samples, seed=seed,
                guidance_loss=None if loss == "none" else loss, guidance_weight=args.guidance_weight,
                guidance_box_column="objects", guidance_fraction=fraction or 1.0, disable_progress_bar=True,
            ))
            run = {"guidance": loss, "fraction": fraction, "seed": seed,
                   "annotated_images": metrics.get("guidance_annotated_images", 0),
                   "train_seconds": time.perf_counter() - run_started, **test_model(folder, tests)}
            runs.append(run)
            print(json.dumps(run), flush=True)

    folders = {"no guidance": os.path.join(args.output_dir, "runs", f"none-seed{args.seeds[0]}")}
    for fraction in sorted(set(args.fractions)):
        folders[f"energy loss,\n{fraction:.0%} annotated"] = os.path.join(
            args.output_dir, "runs", f"energy-{fraction}-seed{args.seeds[0]}")
    explanation_figure(os.path.join(args.output_dir, "explanations.png"), folders, tests["random"])
    table = results_table(runs, args)
    minutes = (time.perf_counter() - started) / 60
    text = (f"{table}\n\nMean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; "
            f"{args.num_train_epochs} epochs each; cue strength {args.cue_strength:.0%}; {run_description(minutes)}.")
    write_experiment_results(args.output_dir, {"arguments": vars(args), "runs": runs, "minutes": minutes}, text,
                             args.write_results, "model-guidance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
