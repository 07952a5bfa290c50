"""The rules family against a hand-written backbone (issue 17 item 7): the same source model
B-cosified both ways, timed interleaved in one process with the standard model (medians).

    OMP_NUM_THREADS=1 python benchmarks/rules_vs_hand_written.py resnet50 [repeats]

Prints one JSON line: medians (ms) of inference (no_grad), training step and explain() for
standard / hand / rules, the B-cos ÷ standard ratios, and rules ÷ hand-written. Set the malloc
variables of bench_bcos.py (``MALLOC_SETTINGS``) in the environment for comparable numbers. The
rules model is built with ``SUPPORTED_BACKBONES`` emptied: a tool for deciding whether the
hand-written backbones can go, to go with them.
"""

import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_bcos as bench  # noqa: E402
import transformers_bcos.configuration_bcos as configuration  # noqa: E402
from transformers_bcos import bcosify_pretrained  # noqa: E402


class Settings:
    device, dtype, image_size = "cpu", "float32", 224


def main(name: str, repeats: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    standard = bench.source_model(name, Settings.image_size)
    processor = bench.processor(Settings.image_size)
    hand = bcosify_pretrained(copy.deepcopy(standard), image_processor=processor)
    saved = dict(configuration.SUPPORTED_BACKBONES)
    configuration.SUPPORTED_BACKBONES.clear()
    try:
        rules = bcosify_pretrained(copy.deepcopy(standard), image_processor=processor)
    finally:
        configuration.SUPPORTED_BACKBONES.update(saved)
    assert type(rules.backbone).__name__ == "BcosSourceArchitecture" != type(hand.backbone).__name__
    # The rules model's config names its family again now, which only decides the fixed input size
    # check (224 here).
    x = torch.rand(8, 3, Settings.image_size, Settings.image_size)
    labels = torch.randint(0, 1000, (8,))
    target = torch.arange(8) % 1000
    models = {"standard": standard, "hand": hand, "rules": rules}
    for model in models.values():
        model.eval()

    def infer(model):
        def run():
            with torch.no_grad():
                model(pixel_values=x)

        return run

    inference = bench.interleaved({k: infer(m) for k, m in models.items()}, repeats, "cpu")
    explain = bench.interleaved({k: (lambda m=m: m.explain(x, target=target)) for k, m in models.items() if k != "standard"}, repeats, "cpu")
    for model in models.values():
        model.train()
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    train = bench.interleaved(
        {k: (lambda k=k, m=m: bench.training_step(m, x, labels, optimizers[k], Settings)) for k, m in models.items()}, repeats, "cpu"
    )
    out = {
        "model": name,
        "inference_ms": {k: 1e3 * v for k, v in inference.items()},
        "train_ms": {k: 1e3 * v for k, v in train.items()},
        "explain_ms": {k: 1e3 * v for k, v in explain.items()},
    }
    for k in ("hand", "rules"):
        out[f"{k}_inference_ratio"] = inference[k] / inference["standard"]
        out[f"{k}_train_ratio"] = train[k] / train["standard"]
        out[f"{k}_explain_over_forward"] = explain[k] / inference[k]
    out["rules_over_hand"] = {
        "inference": inference["rules"] / inference["hand"],
        "train": train["rules"] / train["hand"],
        "explain": explain["rules"] / explain["hand"],
    }
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5)))
