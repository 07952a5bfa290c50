#!/usr/bin/env python
"""Regenerate the pictures the README shows, in docs/images/ (the README's tour writes under outputs/).

    python docs/make_images.py [--retrain]

The same steps as the tour: four real MNIST test digits (the embedded split, indices 3, 6, 10, 14)
saved as PNGs; `examples/finetune.py` with its defaults into outputs/bcos-mnist (reused when it
is complete, unless --retrain); the cached standard source converted into
outputs/bcos-mnist-converted; then `transformers-bcos explain` into docs/images/.
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
    run_cli("explain", FINETUNED, *digits, "--out", os.path.join(IMAGES, "explanations"), "--top-k", 3)
    run_cli("explain", FINETUNED, three, "--target", 8, "--out", os.path.join(IMAGES, "explanations-target-8"))
    run_cli("explain", CONVERTED, three, "--target", 3, "--out", os.path.join(IMAGES, "explanations-converted"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
