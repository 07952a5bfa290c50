#!/usr/bin/env python
"""Regenerate the pictures the README shows, in docs/images/ (the README's tour writes under outputs/).

    python docs/make_images.py [--retrain]

The same steps as the tour: four real MNIST test digits (the embedded split, indices 3, 6, 10, 14)
saved as PNGs; `examples/finetune.py` with its defaults into outputs/bcos-mnist (reused when it
is complete, unless --retrain); the cached standard source converted into
outputs/bcos-mnist-converted; then `transformers-bcos explain` into docs/images/, and the
explanations of units inside the fine-tuned model (`unit_figure`).
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(REPO, "docs", "images")
DIGITS = os.path.join(IMAGES, "digits")
FINETUNED = os.path.join(REPO, "outputs", "bcos-mnist")
CONVERTED = os.path.join(REPO, "outputs", "bcos-mnist-converted")
TEST_INDICES = (3, 6, 10, 14)


def digit_path(index: int, label: str) -> str:
    return os.path.join(DIGITS, f"mnist-test-{index:03d}-label-{label}.png")


def run_cli(*args) -> None:
    from transformers_bcos.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        sys.exit(code)


def unit_figure(model_folder: str, image_path: str, out_path: str, channels_per_layer: int = 3) -> None:
    """The explanations of the most active channels of the first and the last stage of a B-cos
    ResNet for one image, stacked into one labelled PNG."""
    import torch
    from PIL import Image

    from transformers_bcos import BcosForImageClassification, Unit
    from transformers_bcos.explanation import captured_output
    from transformers_bcos.visualization import explanation_panels
    from transformers_bcos._compat import AutoImageProcessor

    model = BcosForImageClassification.from_pretrained(model_folder).eval()
    pixel_values = AutoImageProcessor.from_pretrained(model_folder)(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
    prefix = "backbone.model.resnet.encoder.stages."
    stages = [name for name, _ in model.named_modules() if name.startswith(prefix) and "." not in name[len(prefix) :]]
    panels = []
    for layer in (stages[0], stages[-1]):
        with captured_output(model.get_submodule(layer)) as captured, torch.no_grad():
            model(pixel_values)
        activity = captured["output"][0].flatten(1).sum(1)
        for channel in activity.topk(channels_per_layer).indices.tolist():
            explanation = model.explain(pixel_values, target=Unit(layer, channel=channel))
            title = f"{layer}, channel {channel}: unit value {float(explanation.explained_output[0]):.3g}"
            panels += explanation_panels(pixel_values, explanation, [title])
    figure = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (0, sum(p.height for p in panels[:i])))
    figure.save(out_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true", help="Fine-tune again even if outputs/bcos-mnist is complete.")
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from transformers_bcos.data import load_embedded_dataset
    from transformers_bcos.defaults import default_standard_model

    os.chdir(REPO)
    test = load_embedded_dataset("mnist")["test"]
    names = test.features["label"].names
    os.makedirs(DIGITS, exist_ok=True)
    digits = []
    for index in TEST_INDICES:
        path = digit_path(index, names[test[index]["label"]])
        digit = test[index]["image"]
        if not os.path.isfile(path) or not np.array_equal(np.asarray(Image.open(path).convert(digit.mode)), np.asarray(digit)):
            digit.save(path)  # only when missing or different: the committed PNGs stay byte for byte
        digits.append(path)

    if args.retrain or not os.path.isfile(os.path.join(FINETUNED, "all_results.json")):
        sys.path.insert(0, os.path.join(REPO, "examples"))
        import finetune

        if finetune.main(["--output_dir", FINETUNED, "--overwrite_output_dir"]) != 0:
            return 1
    run_cli("convert", default_standard_model("resnet"), CONVERTED, "--overwrite")

    three = digit_path(3, "3")
    # --overwrite: these are the committed pictures, made again
    run_cli("explain", FINETUNED, *digits, "--out", os.path.join(IMAGES, "explanations"), "--top-k", 3, "--overwrite")
    run_cli("explain", FINETUNED, three, "--target", 8, "--out", os.path.join(IMAGES, "explanations-target-8"), "--overwrite")
    run_cli("explain", CONVERTED, three, "--target", 3, "--out", os.path.join(IMAGES, "explanations-converted"), "--overwrite")
    unit_figure(FINETUNED, three, os.path.join(IMAGES, "units-mnist-test-003.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
