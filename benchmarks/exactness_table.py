"""The README's "Supported sources" figures: how exact each family's conversion is, measured.

    OMP_NUM_THREADS=2 python benchmarks/exactness_table.py --json benchmarks/exactness.json
    # the torchvision and timm models, in the timm tier's environment (README: "Install"):
    OMP_NUM_THREADS=2 python benchmarks/exactness_table.py --library_models all --json benchmarks/exactness-library-models.json

For every supported family, a standard model of the usual size (the default config of its
transformers class, ImageNet-sized, 10 classes) with random weights of a trained model's scale
and norms, biases and tokens far from their initial values (exactness does not depend on the
values; a converter that dropped or misplaced one would show), converted with `bcosify_pretrained`:

* equivalence: b = 1 with biases kept against the source, max |Δ logits| / max |logits|, float64
  (the converter's own check, `check_exactness`);
* completeness at b = 2 without biases (batch-norm statistics re-estimated on random images), |Σ contributions − explained output| / max(|output|,
  Σ|contributions|): float64 by the converter's check, float32 by `explain()` on two random
  224-px images;
* the time of the converter's check (the float64 passes) and of the conversion without it.
"""

import argparse
import json
import platform
import time

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from transformers_bcos import bcosify_pretrained
from transformers_bcos.conversion import check_exactness
from transformers_bcos.training.batchnorm import reestimate_batchnorm_statistics

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PROCESSOR = {"do_normalize": True, "image_mean": MEAN, "image_std": STD, "do_rescale": True, "rescale_factor": 1 / 255}

# model type -> the config's arguments, where its default is not the usual ImageNet model
# (EfficientNet's default is B7 at 600 px: B0 here; BEiT's pretrained checkpoints use relative
# position biases, its default config does not).
FAMILIES = {
    "vit": {},
    "deit": {},
    "resnet": {},
    "convnext": {},
    "dinov2": {},
    "swin": {},
    "beit": {"use_relative_position_bias": True},
    "convnextv2": {},
    "regnet": {},
    "efficientnet": {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 224, "hidden_dim": 1280},
    "mobilenet_v2": {},
    "siglip": {},
}

# "library/architecture" -> input size (Inception-v3 is built for 299 px).
LIBRARY_MODELS = {
    "torchvision/resnet18": 224,
    "torchvision/resnet50": 224,
    "torchvision/densenet121": 224,
    "torchvision/vgg11": 224,
    "torchvision/vgg11_bn": 224,
    "torchvision/inception_v3": 299,
    "timm/resnet50": 224,
    "timm/densenet121": 224,
    "timm/convnext_tiny": 224,
    "timm/vit_small_patch16_224": 224,
    "timm/efficientnet_b0": 224,
}


def randomized(model: nn.Module) -> nn.Module:
    """Weights of std 1/sqrt(fan-in); norms, biases, tokens, positions and scales moved off
    their initial values."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0, module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
        for name, parameter in model.named_parameters():
            if parameter.dim() == 3 or any(key in name for key in ("lambda", "position", "token", "grn", "pos_embed", "gamma")):
                parameter.normal_(0, 0.5)
    return model.eval()


def completeness_error(explanation) -> float:
    contributions, output = explanation.contributions.double(), explanation.explained_output.double()
    scale = torch.maximum(output.abs(), contributions.abs().sum((1, 2)))
    return ((contributions.sum((1, 2)) - output).abs() / scale).max().item()


def library_source(name: str) -> nn.Module:
    """A torchvision or timm model ("library/architecture") with random weights, 10 classes."""
    library, architecture = name.split("/")
    if library == "timm":
        import timm

        return timm.create_model(architecture, pretrained=False, num_classes=10)
    import torchvision

    options = {"init_weights": False} if architecture == "inception_v3" else {}
    return torchvision.models.get_model(architecture, weights=None, num_classes=10, **options)


def measure(model_type: str, overrides: dict) -> dict:
    """The row of a transformers model type, or of a torchvision/timm model ("library/architecture")."""
    torch.manual_seed(0)
    if model_type in LIBRARY_MODELS:
        size = LIBRARY_MODELS[model_type]
        source = randomized(library_source(model_type))
        # timm's data config gives its normalisation; torchvision's models need it passed.
        settings = {"image_size": size} if model_type.startswith("timm/") else {"image_mean": MEAN, "image_std": STD, "image_size": size}
    else:
        classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
        classifier = classes if isinstance(classes, str) else classes[0]  # DeiT has two: without and with a teacher
        config = AutoConfig.for_model(model_type, num_labels=10, architectures=[classifier], **overrides)
        source, size = randomized(AutoModelForImageClassification.from_config(config)), 224
        settings = {"image_processor": PROCESSOR}
    equivalent = bcosify_pretrained(source, b=1, keep_bias=True, check=False, **settings)
    config = equivalent.config.backbone_config
    mean, std = (config.image_mean, config.image_std) if model_type in LIBRARY_MODELS else (MEAN, STD)
    equivalence = check_exactness(equivalent, source, mean, std)["equivalence"]
    started = time.perf_counter()
    bcos = bcosify_pretrained(source, check=False, **settings)
    convert_s = time.perf_counter() - started
    # As the B-cosification recipe does before fine-tuning: without centring and biases the
    # source's statistics no longer fit, and through MobileNetV2's ~50 layers the output
    # underflows to exactly 0.
    reestimate_batchnorm_statistics(bcos, [torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(2))])
    started = time.perf_counter()
    completeness64 = check_exactness(bcos)["completeness"]
    check_s = time.perf_counter() - started
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        largest_output = bcos(images).bias_free_logits.abs().max().item()
    return {
        "family": model_type,
        "largest_output_float32": largest_output,
        "parameters_m": sum(p.numel() for p in source.parameters()) / 1e6,
        "equivalence_b1_float64": equivalence,
        "completeness_float64": completeness64,
        "completeness_float32": completeness_error(bcos.explain(images)),
        "convert_s": convert_s,
        "check_s": check_s,
    }


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help="Comma-separated model types (any of AutoModelForImageClassification; default configs)."
    )
    parser.add_argument(
        "--library_models", help=f"Comma-separated torchvision/timm models instead ('all': {', '.join(LIBRARY_MODELS)}); needs the timm tier."
    )
    parser.add_argument("--json", help="Also write the rows, with the machine, to this JSON file.")
    args = parser.parse_args(argv)
    if args.library_models:
        args.families = ",".join(LIBRARY_MODELS) if args.library_models == "all" else args.library_models
    rows = []
    print("| family | parameters (M) | b = 1 equivalence, float64 | completeness, float64 | completeness, float32 | conversion (s) | check (s) |")
    print("|---|---|---|---|---|---|---|")
    for model_type in args.families.split(","):
        try:
            row = measure(model_type, FAMILIES.get(model_type, {}))
        except Exception as error:  # noqa: BLE001 - a model type outside the supported list may fail anywhere
            rows.append({"family": model_type, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})
            print(f"| {model_type} | {rows[-1]['error'][:300]} |", flush=True)
            continue
        rows.append(row)
        print(
            f"| {model_type} | {row['parameters_m']:.1f} | {row['equivalence_b1_float64']:.1e} | {row['completeness_float64']:.1e} "
            f"| {row['completeness_float32']:.1e} | {row['convert_s']:.2f} | {row['check_s']:.1f} |",
            flush=True,
        )
    if args.json:
        machine = {"processor": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
