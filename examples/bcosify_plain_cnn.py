"""B-cosify a plain PyTorch CNN: train one on the embedded MNIST digits, convert it, measure.

    python examples/bcosify_plain_cnn.py            # ≈ 30 s on 2 CPU cores

The CNN is the classic PyTorch MNIST example (two convolutions, ReLU, max pooling, two linear
layers, ``x.view(N, -1)`` in its forward): not a transformers model, no config. The script trains
it on the 4,000 training digits, then converts it twice with `bcosify_pretrained` (given its input
normalisation and size) and reports the test accuracy of each on the 1,000 test digits:

* b = 1 with biases kept: the same function as the CNN (the converter checks this itself in
  float64 before returning); its accuracy must equal the CNN's;
* b = 2 without biases: a B-cos model, whose explanations are exact, before any fine-tuning
  (B-cosification fine-tunes it afterwards, e.g. with `transformers_bcos.training`).
"""

import argparse
import json
import tempfile

import numpy as np
import torch
from torch import nn

from transformers_bcos import BcosForImageClassification, bcosify_pretrained
from transformers_bcos.data import load_embedded_dataset

# The normalisation of the PyTorch MNIST example: the digits' mean and standard deviation.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MnistCNN(nn.Module):
    """The PyTorch MNIST example network (without dropout): grey 28×28 digits -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 12 * 12, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))
        return self.fc2(self.relu(self.fc1(x.view(x.shape[0], -1))))


def mnist_tensors(split: str) -> tuple:
    """(grey pixels (N, 1, 28, 28) in [0, 1], labels (N,)) of the embedded MNIST split."""
    data = load_embedded_dataset("mnist")[split]
    pixels = np.stack([np.asarray(image.convert("L"), dtype=np.float32) / 255 for image in data["image"]])
    return torch.from_numpy(pixels).unsqueeze(1), torch.tensor(data["label"])


def train(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    """Adam, batch 64, cross-entropy on normalised pixels."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(64):
            loss = nn.functional.cross_entropy(net((images[batch] - MNIST_MEAN) / MNIST_STD), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def predictions(classify, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([classify(batch).argmax(-1) for batch in images.split(256)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs of the plain CNN.")
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    train_images, train_labels = mnist_tensors("train")
    test_images, test_labels = mnist_tensors("test")
    cnn = train(MnistCNN(), train_images, train_labels, args.epochs)
    normalisation = {"image_mean": [MNIST_MEAN], "image_std": [MNIST_STD], "image_size": 28}
    equivalent = bcosify_pretrained(cnn, b=1, keep_bias=True, **normalisation)
    bcos = bcosify_pretrained(cnn, b=2, keep_bias=False, **normalisation)

    source_predictions = predictions(lambda x: cnn((x - MNIST_MEAN) / MNIST_STD), test_images)
    equivalent_predictions = predictions(lambda x: equivalent(x).logits, test_images)
    # Saved and loaded back: the architecture comes from an instance of the class.
    with tempfile.TemporaryDirectory() as folder:
        bcos.save_pretrained(folder)
        reloaded = BcosForImageClassification.from_pretrained(folder, source_module=MnistCNN())
    explanation = bcos.explain(test_images[:8])
    results = {
        "epochs": args.epochs,
        "test_images": len(test_labels),
        "accuracy": {
            "cnn": (source_predictions == test_labels).float().mean().item(),
            "bcos_b1_with_biases": (equivalent_predictions == test_labels).float().mean().item(),
            "bcos_b2_before_finetuning": (predictions(lambda x: bcos(x).logits, test_images) == test_labels).float().mean().item(),
            "bcos_b2_reloaded": (predictions(lambda x: reloaded(x).logits, test_images) == test_labels).float().mean().item(),
        },
        "b1_predictions_differing": int((source_predictions != equivalent_predictions).sum()),
        "b2_completeness_gap_float32": (explanation.contributions.sum((1, 2)) - explanation.explained_output).abs().max().item(),
    }
    print(f"MNIST CNN trained {args.epochs} epochs on {len(train_labels)} digits; accuracy on {len(test_labels)} test digits:")
    for name, value in results["accuracy"].items():
        print(f"  {name:28s} {value:.4f}")
    print(f"  b = 1 predictions that differ from the CNN's: {results['b1_predictions_differing']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return results


if __name__ == "__main__":
    main()
