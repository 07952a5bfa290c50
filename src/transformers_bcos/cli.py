"""The ``transformers-bcos`` command: convert, explain, evaluate and publish B-cos models.

    transformers-bcos convert SRC OUT [--b 2] [--keep-bias] [--overwrite]
    transformers-bcos explain MODEL IMAGE... [--target LABEL|INDEX | --unit MODULE:CHANNEL] [--text PROMPT...] [--out DIR] [--top-k 5] [--overwrite]
    transformers-bcos evaluate MODEL --dataset DATA [--split SPLIT] [--grid-size 2] [--source SRC] [--save]
    transformers-bcos push DIR ORG/NAME [--dry-run] [--private]

Bad input (a missing file, an unreadable image, an unknown label, a model of the wrong type, a
non-empty output folder) stops a command before any work, with one line on stderr and exit
code 1 (2 for malformed command lines). ``--debug`` shows the traceback instead.
"""

import argparse
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

# Errors that mean "bad input" (the libraries raise these for missing files, unreadable images,
# unknown labels, unsupported models, offline Hub access): reported in one line.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, ImportError, pickle.UnpicklingError)
NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
EXPLAIN_BATCH_SIZE = 8
EXAMPLE_IMAGE = "explanation_examples.png"
EXAMPLE_ROWS = 4
BCOS_MODEL_TYPES = ("bcos", "bcos_clip")
DATASETS_PROGRESS_BARS_VARIABLE = "HF_DATASETS_DISABLE_PROGRESS_BARS"

# Files of a model folder that `push` uploads (besides *.safetensors, the *.py code files and
# the pictures its README.md shows); anything else (checkpoints, logs, run options) stays local.
PUBLISHED_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "README.md",
    "all_results.json",  # the fine-tuning run's results (examples/finetune.py)
)


class CLIError(Exception):
    """Bad input: the message, one line, tells the user what to change."""


# ----------------------------------------------------------------------------------------------
# Checks of files and folders (before any work)
# ----------------------------------------------------------------------------------------------


def looks_like_local_path(location: str) -> bool:
    """Whether ``location`` names a local path rather than a Hub id, even though it does not exist.

    "org/name" reads as both; it is taken as a path when it has more than one "/", a trailing "/"
    or a backslash, or when its first part is an existing local folder ("outputs/bcos-mnist" with
    an "outputs" folder here), so that a mistyped path is "not found" at once instead of being
    looked up on the Hub first (seconds of retries, longer offline).
    """
    if location.endswith(("/", os.sep)) or "\\" in location or location.count("/") > 1:
        return True
    first, _, rest = location.partition("/")
    return bool(rest) and os.path.isdir(os.path.expanduser(first))


def check_model_location(location: str, role: str = "MODEL") -> None:
    """A local model folder must exist and hold config.json; anything else is tried as a Hub id."""
    from huggingface_hub import constants

    from .model_card import is_hub_repo_id

    from .modeling_bcos import saved_weight_keys

    path = os.path.expanduser(location)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"{role} {location} is not a saved model folder (no config.json).")
        saved_weight_keys(path)  # an OSError naming an unreadable weight file
    elif os.path.exists(path):
        raise CLIError(f"{role} {location} is a file; expected a model folder or a Hub id.")
    elif looks_like_local_path(location):
        raise CLIError(f"{role} {location}: no such folder.")
    elif not is_hub_repo_id(location):
        raise CLIError(f"{role} {location}: no such folder, and not a Hub id either.")
    elif constants.HF_HUB_OFFLINE:
        raise CLIError(f"{role} {location}: no such folder (and the Hub is offline, HF_HUB_OFFLINE, so it is no Hub id either).")


def check_output_folder(folder: str, overwrite: bool) -> None:
    if os.path.isfile(folder):
        raise CLIError(f"{folder} is a file; expected an output folder.")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise CLIError(f"{folder} exists and is not empty: choose another folder or pass --overwrite.")


def write_folder_atomically(folder: str, write) -> None:
    """``write(staging)`` fills a new folder that then replaces ``folder`` in one rename.

    The staging folder sits beside ``folder`` (same file system), so a failure or a kill leaves
    either the old folder or the new one, never a half-written one.
    """
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        write(staging)
        if os.path.isdir(folder) and os.listdir(folder):
            replaced = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.rename(folder, os.path.join(replaced, name))
            os.rename(staging, folder)
            shutil.rmtree(replaced)
        else:
            if os.path.isdir(folder):
                os.rmdir(folder)
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_png_atomically(image, path: str) -> None:
    temporary = f"{path}.partial-{os.getpid()}.png"
    try:
        image.save(temporary, format="PNG", optimize=True)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def expand_image_arguments(paths) -> list:
    """The image files named on the command line, a folder standing for the image files in it."""
    from PIL import Image

    extensions = {extension for extension, format in Image.registered_extensions().items() if format in Image.OPEN}
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(
            os.path.join(path, name) for name in os.listdir(path)
            if os.path.isfile(os.path.join(path, name)) and os.path.splitext(name)[1].lower() in extensions
        )
        if not found:
            raise CLIError(f"image {path} is a folder with no image files in it; give image files, or a folder of images.")
        files.extend(found)
    return files


def read_image(path: str):
    """The image at ``path`` as 8-bit RGB, or a CLIError naming why it cannot be read."""
    from PIL import Image

    from .pipeline_bcos import load_rgb_image

    if not os.path.isfile(path):
        raise CLIError(f"image {path} not found.")
    try:
        return load_rgb_image(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CLIError(f"cannot read image {path}: {first_line(error)}") from error


def load_bcos_model(location: str):
    """(model in eval mode, its image processor) of a saved B-cos model; CLIError for anything else."""
    from transformers import AutoConfig, AutoModel

    from ._compat import AutoImageProcessor

    check_model_location(location)
    config = AutoConfig.from_pretrained(location)
    if config.model_type not in BCOS_MODEL_TYPES:
        raise CLIError(
            f"{location} holds a {config.model_type!r} model, not a B-cos model: B-cosify it first with "
            f"`transformers-bcos convert {location} OUT`."
        )
    model = AutoModel.from_pretrained(location).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise CLIError(f"{location} has no image processor (preprocessor_config.json): {first_line(error)}") from error
    return model, processor


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------


IMAGENET_NORMALISATION = "--image-mean 0.485 0.456 0.406 --image-std 0.229 0.224 0.225"


def source_image_processor(args, config):
    """The processor whose normalisation `convert` folds into the first layer: --image-processor,
    else the source's own, with --image-mean/--image-std if given (a resize to the model's size
    and those values when the source has no processor)."""
    from ._compat import AutoImageProcessor, ViTImageProcessor

    if (args.image_mean is None) != (args.image_std is None):
        raise CLIError("--image-mean and --image-std go together: give both (three numbers each, R G B).")
    if args.image_processor is not None:
        try:
            return AutoImageProcessor.from_pretrained(os.path.expanduser(args.image_processor))
        except (OSError, ValueError) as error:
            raise CLIError(f"--image-processor {args.image_processor}: no image processor there ({first_line(error)}).") from None
    try:
        processor = AutoImageProcessor.from_pretrained(args.src)
    except (OSError, ValueError):
        processor = None
    if args.image_mean is None:
        if processor is None:
            raise CLIError(
                f"SRC {args.src} has no image processor (preprocessor_config.json), so the input normalisation to fold "
                f"into the first layer is unknown: give the one it was trained with, e.g. {IMAGENET_NORMALISATION}, "
                "or --image-processor FOLDER."
            )
        return processor
    if processor is None:
        vision_config = getattr(config, "vision_config", config)
        size = getattr(vision_config, "image_size", None) or 224
        return ViTImageProcessor(size={"height": size, "width": size}, do_normalize=True, image_mean=args.image_mean, image_std=args.image_std)
    processor.do_normalize, processor.image_mean, processor.image_std = True, list(args.image_mean), list(args.image_std)
    return processor


def run_convert(args) -> None:
    from transformers import AutoConfig

    from .conversion import bcosify_pretrained

    check_model_location(args.src, "SRC")
    out = os.path.abspath(os.path.expanduser(args.out))
    check_output_folder(out, args.overwrite)
    config = AutoConfig.from_pretrained(args.src)
    if config.model_type in BCOS_MODEL_TYPES:
        raise CLIError(
            f"SRC {args.src} is already a B-cos model (model_type {config.model_type!r}): explain, evaluate or fine-tune "
            "it as it is; convert takes a standard model."
        )
    processor = source_image_processor(args, config)
    model = bcosify_pretrained(args.src, b=args.b, keep_bias=args.keep_bias, image_processor=processor)
    write_folder_atomically(out, model.save_pretrained)
    kind = "CLIP image tower" if model.config.model_type == "bcos_clip" else f"{model.config.backbone_config.model_type} classifier"
    print(f"B-cosified {args.src} ({kind}, b={args.b:g}, biases {'kept' if args.keep_bias else 'removed'}) -> {out}")
    if not (args.b == 1 and args.keep_bias):
        print(
            "Its explanations are exact already. Its accuracy is below the source's until it is fine-tuned "
            "(examples/finetune.py): the B-cos exponent and the removed biases change its activations."
        )


# ----------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------


def parse_class_target(target, config):
    """--target for a classifier: a label name, else a class index; None for the prediction."""
    if target is None:
        return None
    if target in config.label2id:
        return int(config.label2id[target])
    try:
        index = int(target)
    except ValueError:
        known = ", ".join(list(config.label2id)[:20])
        raise CLIError(f"unknown label {target!r}; the model's labels include: {known}.") from None
    if not 0 <= index < config.num_labels:
        raise CLIError(f"class index {index} is out of range: the model has {config.num_labels} classes (0..{config.num_labels - 1}).")
    return index


def parse_prompt_target(target, prompts):
    """--target for CLIP: one of the --text prompts, or its index; None for the most similar one."""
    if target is None:
        return None
    if target in prompts:
        return prompts.index(target)
    try:
        index = int(target)
    except ValueError:
        raise CLIError(f"--target {target!r} is not one of the --text prompts (or their index 0..{len(prompts) - 1}).") from None
    if not 0 <= index < len(prompts):
        raise CLIError(f"prompt index {index} is out of range: {len(prompts)} prompts given (0..{len(prompts) - 1}).")
    return index


def parse_unit(unit: str, model):
    """--unit MODULE:CHANNEL -> a `Unit` of ``model``, validated (the module exists)."""
    from .explanation import Unit

    name, _, channel = unit.rpartition(":")
    if not name or not channel.isdigit():
        raise CLIError(f"--unit {unit!r}: expected MODULE:CHANNEL, a module name of the model and a channel index (e.g. backbone.model.resnet.encoder.stages.1:5).")
    parsed = Unit(name, channel=int(channel))
    try:
        parsed.find_module(model)
    except ValueError as error:
        raise CLIError(str(error)) from None
    return parsed


def output_paths(image_paths, out_dir: str) -> list:
    """One PNG per image, named after it; images that share a name get -2, -3, ... suffixes."""
    paths, taken = [], set()
    for image_path in image_paths:
        stem = os.path.splitext(os.path.basename(image_path))[0]
        name, count = f"{stem}.png", 1
        while name in taken:
            count += 1
            name = f"{stem}-{count}.png"
        taken.add(name)
        paths.append(os.path.join(out_dir, name))
    return paths


def class_scores(model, logits):
    """Class probabilities: sigmoids for models trained with binary cross-entropy (B-cos), else softmax."""
    import torch

    if model.config.problem_type == "multi_label_classification":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)


def explain_batch(model, pixel_values, target, prompts):
    """(explanation, class scores, class names) for a batch: a classifier's classes or CLIP's prompts."""
    import torch

    if prompts is None:
        explanation = model.explain(pixel_values, target=target)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return explanation, class_scores(model, explanation.logits), names
    # Each prompt is its own class: the template "{}" keeps it as typed.
    explanation = model.zero_shot_classify(pixel_values, class_names=prompts, templates=["{}"], target=target)
    return explanation, torch.softmax(explanation.logits.float(), dim=-1), list(prompts)


def run_explain(args) -> None:
    import torch

    from .visualization import explanation_panels

    args.images = expand_image_arguments(args.images)
    images = [read_image(path) for path in args.images]
    out_dir = os.path.abspath(os.path.expanduser(args.out))
    if os.path.isfile(out_dir):
        raise CLIError(f"--out {args.out} is a file; expected a folder.")
    destinations = output_paths(args.images, out_dir)
    existing = [path for path in destinations if os.path.exists(path)]
    if existing and not args.overwrite:
        raise CLIError(
            f"{existing[0]} exists ({len(existing)} of the {len(destinations)} output PNGs do): pass --overwrite to "
            "replace them, or choose another --out."
        )
    if args.unit and args.target is not None:
        raise CLIError("--unit and --target both say what to explain: give one.")
    model, processor = load_bcos_model(args.model)
    if model.config.model_type == "bcos":
        if args.text:
            raise CLIError(f"--text is for B-cos CLIP models; {args.model} is an image classifier (choose a class with --target).")
        target = parse_unit(args.unit, model) if args.unit else parse_class_target(args.target, model.config)
        prompts = None
    else:
        if args.unit:
            raise CLIError(f"--unit is for B-cos image classifiers; {args.model} is a B-cos CLIP model.")
        if not args.text:
            raise CLIError(f"{args.model} is a B-cos CLIP model: give the texts to compare the images with (--text PROMPT ...).")
        prompts = list(args.text)
        if len(set(prompts)) != len(prompts):
            raise CLIError("--text holds the same prompt twice.")
        target = parse_prompt_target(args.target, prompts)
    os.makedirs(out_dir, exist_ok=True)
    if prompts is not None:
        scores_name = "softmax over the --text prompts"
    elif model.config.problem_type == "multi_label_classification":
        scores_name = "sigmoid of each class's logit, independent per class as in B-cos training: they need not sum to 1"
    else:
        scores_name = "softmax over the classes"
    print(f"scores: {scores_name}")
    score_kind = scores_name.split()[0]

    for start in range(0, len(images), EXPLAIN_BATCH_SIZE):
        batch = slice(start, start + EXPLAIN_BATCH_SIZE)
        pixel_values = processor(images=images[batch], return_tensors="pt")["pixel_values"]
        explanation, scores, names = explain_batch(model, pixel_values, target, prompts)
        top = torch.topk(scores, k=min(args.top_k, scores.shape[-1]), dim=-1)
        explained_names = [args.unit if args.unit else names[int(index)] for index in explanation.target]
        titles = [
            f"predicted: {names[int(top.indices[i, 0])]} ({score_kind} {float(top.values[i, 0]):.2f})   "
            f"explained: {explained_names[i]}"
            for i in range(pixel_values.shape[0])
        ]
        panels = explanation_panels(pixel_values, explanation, titles)
        for i, (panel, image_path, destination) in enumerate(zip(panels, args.images[batch], destinations[batch])):
            save_png_atomically(panel, destination)
            total = float(explanation.contributions[i].double().sum())
            output = float(explanation.explained_output[i])
            print(f"{image_path} -> {destination}")
            for rank, (score, index) in enumerate(zip(top.values[i].tolist(), top.indices[i].tolist()), start=1):
                print(f"  {rank}. {names[index]}  score {score:.3f}")
            what = "cosine" if prompts is not None else "unit value" if args.unit else "logit - logit bias"
            print(f"  explained {explained_names[i]}: contributions sum to {total:.6g}, {what} {output:.6g}")


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def dataset_label_indices(dataset_labels, label2id, model_role: str) -> list:
    """Each data-set class index -> the model's class index of the same name."""
    missing = [name for name in dataset_labels if name not in label2id]
    if missing:
        raise CLIError(
            f"the data set's labels {missing[:10]} are not among the {model_role}'s labels "
            f"{list(label2id)[:10]}: evaluate on data with the labels the model was trained for."
        )
    return [int(label2id[name]) for name in dataset_labels]


def example_picture(model, images, labels, confident, rows: int):
    """Panels (input | explanation | contributions) of up to ``rows`` images of distinct classes,
    preferring the most confidently classified one of each class, stacked into one picture."""
    from PIL import Image

    from .evaluation import gather_images
    from .visualization import explanation_panels

    chosen = []
    for label in sorted(set(labels.tolist()))[:rows]:
        confident_indices = confident.per_class.get(label) or []
        # A model without confident images (e.g. freshly converted) still gets one image per class.
        chosen.append(confident_indices[0] if confident_indices else int((labels == label).nonzero()[0]))
    pixel_values = gather_images(images, chosen)
    targets = labels[chosen]
    explanation = model.explain(pixel_values, target=targets)
    scores = class_scores(model, explanation.logits)
    id2label = model.config.id2label
    titles = [
        f"label: {id2label[int(t)]}   predicted: {id2label[int(s.argmax())]} ({float(s.max()):.2f})   explained: {id2label[int(t)]}"
        for t, s in zip(targets, scores)
    ]
    panels = explanation_panels(pixel_values, explanation, titles)
    picture = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    for row, panel in enumerate(panels):
        picture.paste(panel, (0, row * panel.height))
    return picture


def run_evaluate(args) -> None:
    import torch

    from .data import load_image_classification_data, to_rgb
    from .evaluation import (
        PixelClassifier,
        TransformedImages,
        completeness_errors,
        evaluate_grid_pointing_game,
        make_explainer,
        predict_logits,
        select_confident_images,
    )
    from .model_card import EVALUATION_FILE, is_rendered_card, render_model_card

    model, processor = load_bcos_model(args.model)
    if model.config.model_type != "bcos":
        raise CLIError(
            f"{args.model} is a B-cos CLIP model; evaluate measures B-cos image classifiers (zero-shot CLIP "
            "evaluation is not available yet)."
        )
    if args.save and not os.path.isdir(os.path.expanduser(args.model)):
        raise CLIError("--save writes into the model folder: MODEL must be a local folder.")
    source = None
    if args.source is not None:
        check_model_location(args.source, "--source")
        source = PixelClassifier.from_pretrained(args.source)
        if source.is_bcos:
            raise CLIError(f"--source {args.source} is a B-cos model; give the standard model it was converted from.")
    # With --split, that split alone is read (data sets without a train split included); without
    # it, the evaluation split is the one fine-tuning evaluates on.
    data = load_image_classification_data(
        args.dataset, train_split=args.split or "train", eval_split=args.split, max_eval_samples=args.max_images,
        image_column=args.image_column, label_column=args.label_column,
    )
    to_model = dataset_label_indices(data.labels, model.config.label2id, "model")
    labels = torch.tensor([to_model[label] for label in data.eval[data.label_column]])

    def transform(image):
        return processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]

    images = TransformedImages(data.eval, transform, column=data.image_column)
    explainer = make_explainer(model)
    logits = predict_logits(explainer.classifier, images, batch_size=args.batch_size, progress=False)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    confident = select_confident_images(explainer.classifier, images, labels, logits=logits, progress=False)
    grid = evaluate_grid_pointing_game(
        explainer, images, labels, grid_size=args.grid_size, num_grids=args.num_grids, confident=confident,
        batch_size=args.batch_size, progress=False,
    )
    checked = min(args.completeness_images, len(images))
    errors = completeness_errors(explainer, images, labels[:checked], batch_size=args.batch_size, progress=False,
                                 indices=range(checked))
    metrics = {
        "dataset": args.dataset,
        # ImageClassificationData names its splits only in `source`: "<data> (train: <split>, eval: <split>)".
        "split": data.source.rsplit("eval: ", 1)[-1][:-1],
        "num_images": len(images),
        "accuracy": accuracy,
        "grid_pointing_game": grid.to_dict(),
        "completeness": {
            "max_relative": errors["max_relative"],
            "median_relative": errors["median_relative"],
            "max_absolute": errors["max_absolute"],
            "num_explanations": checked,
        },
    }
    print(f"data: {len(images):,} images of {data.source}")
    print(f"top-1 accuracy: {100 * accuracy:.2f}%")
    if source is not None:
        to_source = dataset_label_indices(data.labels, source.config.label2id, "source model")
        source_labels = torch.tensor([to_source[label] for label in data.eval[data.label_column]])
        source_logits = predict_logits(source, images, batch_size=args.batch_size, progress=False)
        metrics["source_accuracy"] = (source_logits.argmax(1) == source_labels).float().mean().item()
        print(f"source model top-1 accuracy: {100 * metrics['source_accuracy']:.2f}%")
    print(grid.report)
    print(
        f"completeness: max relative error {errors['max_relative']:.1e} (median {errors['median_relative']:.1e}) "
        f"over {checked} explanations"
    )
    if not args.save:
        return
    folder = os.path.expanduser(args.model)
    save_png_atomically(example_picture(model, images, labels, confident, EXAMPLE_ROWS), os.path.join(folder, EXAMPLE_IMAGE))
    metrics["example_image"] = EXAMPLE_IMAGE
    write_json_atomically(os.path.join(folder, EVALUATION_FILE), metrics)
    print(f"saved {EVALUATION_FILE} and {EXAMPLE_IMAGE} in {folder}")
    readme = os.path.join(folder, "README.md")
    if os.path.isfile(readme) and not is_rendered_card(readme):
        print("kept its README.md (not rendered from an evaluation, e.g. written by fine-tuning); `push` uploads it as is")
    else:
        print(f"wrote the model card {render_model_card(folder, metrics, license=args.license)}")


def finite_or_none(value):
    """``value`` with NaN/inf floats (e.g. GridPG statistics without grids) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json_atomically(path: str, value: dict) -> None:
    temporary = f"{path}.partial-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(finite_or_none(value), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------
# push
# ----------------------------------------------------------------------------------------------

# Run in a fresh Python where `import transformers_bcos` fails, as on a machine without the
# package: the staged folder must load with its own code (trust_remote_code) and explain.
LOAD_CHECK = textwrap.dedent(
    """
    import json, sys

    class _BlockTransformersBcos:
        def find_spec(self, name, path=None, target=None):
            if name == "transformers_bcos" or name.startswith("transformers_bcos."):
                raise ImportError("transformers_bcos is deliberately not importable here")

    sys.meta_path.insert(0, _BlockTransformersBcos())

    import numpy as np
    from PIL import Image
    from transformers import AutoModel, pipeline
    # transformers.AutoImageProcessor needs torchvision on transformers 5.17; this path does not.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    if "transformers_bcos" in type(model).__module__:
        raise SystemExit(f"the model class came from the package, not the folder: {type(model).__module__}")
    processor = AutoImageProcessor.from_pretrained(folder)
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    image = Image.fromarray(gradient)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    if model.config.model_type == "bcos_clip":
        explanation = model.explain(pixel_values, text=["a photo"])
    else:
        explanation = model.explain(pixel_values)
    total = explanation.contributions.double().sum((-2, -1))
    output = explanation.explained_output.double()
    scale = max(float(output.abs().max()), float(explanation.contributions.double().abs().sum()), 1e-30)
    report = {"model_class": type(model).__name__, "completeness_error": float((total - output).abs().max()) / scale}
    if "image-explanation" in (getattr(model.config, "custom_pipelines", None) or {}):
        result = pipeline("image-explanation", model=folder, trust_remote_code=True)(image)
        report["pipeline_label"] = result["label"]
    print(json.dumps(report))
    """
)


def check_loads_without_package(folder: str) -> dict:
    """Load ``folder`` in a clean process without transformers_bcos; return what it reported."""
    with tempfile.TemporaryDirectory(prefix="transformers-bcos-modules-") as modules_cache:
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            # Remote code is copied into this cache: keep the user's cache free of staging copies.
            "HF_MODULES_CACHE": modules_cache,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
        }
        result = subprocess.run(
            [sys.executable, "-c", LOAD_CHECK, folder], capture_output=True, text=True, env=environment, timeout=600
        )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise CLIError(f"the staged folder {folder} does not load without transformers_bcos: {lines[-1] if lines else 'no output'}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def published_files(folder: str) -> list:
    from .model_card import EVALUATION_FILE

    return [
        name
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
        and (name in PUBLISHED_FILES or name == EVALUATION_FILE or name.endswith((".safetensors", ".py")))
    ]


def stage_upload(folder: str, staging: str, repo_id: str, license) -> list:
    """Copy what `push` uploads into ``staging``: model, code, processor, tokenizer, card and its pictures.

    The card is the folder's README.md, unless that was rendered from an evaluation (then it is
    rendered again here, for ``repo_id``); without a README.md it is rendered from the folder's
    `EVALUATION_FILE`, or, when there is none, as a card that says no measurements were made (with
    a warning). Returns the staged file names.
    """
    from .model_card import EVALUATION_FILE, is_rendered_card, local_pictures, render_model_card

    files = published_files(folder)
    if not any(name.endswith(".safetensors") for name in files):
        raise CLIError(f"{folder} holds no safetensors weights: save the model with save_pretrained first.")
    readme = os.path.join(folder, "README.md")
    evaluation = os.path.join(folder, EVALUATION_FILE)
    render = not os.path.isfile(readme) or (is_rendered_card(readme) and os.path.isfile(evaluation))
    measured = os.path.isfile(evaluation)
    if render and not measured:
        # Hub users share models at any stage: the card then says that nothing was measured.
        print(
            f"warning: {folder} was never evaluated (no {EVALUATION_FILE}): its model card says no measurements were "
            f"made; `transformers-bcos evaluate {folder} --dataset DATA --save` adds them.",
            file=sys.stderr,
        )
    for name in files:
        if not (render and name == "README.md"):
            shutil.copy2(os.path.join(folder, name), os.path.join(staging, name))
    if render:
        metrics = None
        if measured:
            with open(evaluation, encoding="utf-8") as f:
                metrics = json.load(f)
        pictures = [metrics.get("example_image")] if metrics and metrics.get("example_image") else []
    else:
        with open(readme, encoding="utf-8") as f:
            pictures = local_pictures(f.read())
    for picture in pictures:
        source = os.path.join(folder, picture)
        if os.path.isfile(source):  # a missing picture is reported by the card's validation
            os.makedirs(os.path.dirname(os.path.join(staging, picture)), exist_ok=True)
            shutil.copy2(source, os.path.join(staging, picture))
    if render:
        render_model_card(staging, metrics, repo_id=repo_id, license=license)
    return sorted(os.path.relpath(os.path.join(root, name), staging) for root, _, names in os.walk(staging) for name in names)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CLIError(f"invalid repository id {repo_id!r}: {first_line(error)}") from None
    if repo_id.count("/") != 1:
        raise CLIError(f"repository id {repo_id!r} must read ORG/NAME (your user name or an organisation).")


def check_hub_access() -> None:
    """Before any staging: a token, and a Hub that answers (one short request, no retries)."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise CLIError("the Hub is offline here (HF_HUB_OFFLINE is set): unset it to upload, or check the upload with --dry-run.")
    token = get_token()
    if token is None:
        raise CLIError("no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) to upload, or check the upload with --dry-run.")
    try:
        HfApi().whoami(token=token)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise CLIError("the Hugging Face token was refused (401): log in again with `hf auth login`.") from None
        raise CLIError(f"the Hub at {constants.ENDPOINT} answered with an error: {first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - transport errors are httpx's (hub 1.x) or httpx2's (hub 2.x)
        raise CLIError(f"cannot reach the Hub at {constants.ENDPOINT}: {first_line(error)}") from None


def run_push(args) -> None:
    from .model_card import read_model_config, validate_model_card

    check_repo_id(args.repo_id)
    folder = os.path.abspath(os.path.expanduser(args.dir))
    if not os.path.isdir(folder):
        raise CLIError(f"DIR {args.dir} is not a folder.")
    read_model_config(folder)
    if not args.dry_run:
        check_hub_access()
    if args.staging_dir is not None:
        staging = os.path.abspath(os.path.expanduser(args.staging_dir))
        check_output_folder(staging, overwrite=False)
        os.makedirs(staging, exist_ok=True)
    else:
        staging = tempfile.mkdtemp(prefix="transformers-bcos-push-")
    # A dry run leaves the staged folder for inspection; an upload cleans up its temporary one.
    keep_staging = args.dry_run or args.staging_dir is not None
    try:
        files = stage_upload(folder, staging, args.repo_id, args.license)
        card = validate_model_card(staging)
        report = check_loads_without_package(staging)
        if args.dry_run:
            print(f"dry run: {len(files)} files staged in {staging} for {args.repo_id}")
            for name in files:
                print(f"  {name}")
            print(
                f"checked: README.md parses as a model card ({card.data.pipeline_tag}, licence {card.data.license or 'none'}); "
                f"the folder loads without transformers_bcos ({report['model_class']}, completeness error "
                f"{report['completeness_error']:.1e}" + (", image-explanation pipeline ok" if "pipeline_label" in report else "") + ")"
            )
            return
        from huggingface_hub import HfApi

        api = HfApi()
        repo_url = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(repo_id=args.repo_id, folder_path=staging, commit_message="Upload B-cos model with transformers-bcos")
        print(f"uploaded {len(files)} files to {repo_url}")
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported in one line (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineErrorParser(
        prog="transformers-bcos",
        description="B-cosify, explain, evaluate and publish inherently interpretable B-cos models.",
    )
    parser.add_argument("--version", action="version", version=f"transformers-bcos {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="Show the traceback of an error.")
    common.add_argument("--verbose", action="store_true", help="Show the libraries' warnings and progress bars.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)

    convert = commands.add_parser(
        "convert", parents=[common], help="B-cosify a pretrained model and save it.",
        description="B-cosify a pretrained transformers model (ViT, DeiT, ResNet, ConvNeXt classifier, or CLIP) and "
        "save it as a Hub-ready folder (weights, code, config, image processor). The folder appears only once complete.",
    )
    convert.add_argument("src", metavar="SRC", help="A Hub id or a folder written by save_pretrained.")
    convert.add_argument("out", metavar="OUT", help="The output folder (must not exist or be empty, unless --overwrite).")
    convert.add_argument("--b", type=positive_float, default=2.0, help="The B-cos exponent (default: 2).")
    convert.add_argument("--keep-bias", action="store_true", help="Keep biases and batch-norm centring (with --b 1: the source model exactly).")
    convert.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT.")
    convert.add_argument("--image-processor", metavar="FOLDER", default=None,
                         help="Where the source's image processor is, if SRC has none (a folder or Hub id).")
    convert.add_argument("--image-mean", metavar="X", type=float, nargs=3, default=None,
                         help="The per-channel mean (R G B) the source normalises with; overrides the processor's.")
    convert.add_argument("--image-std", metavar="X", type=positive_float, nargs=3, default=None,
                         help="The per-channel std (R G B) the source normalises with; overrides the processor's.")
    convert.set_defaults(run=run_convert)

    explain = commands.add_parser(
        "explain", parents=[common], help="Explain images: one PNG panel each, top predictions printed.",
        description="Classify images with a saved B-cos model and explain one class per image. Writes OUT/<image "
        "name>.png: input | explanation (RGBA) | contribution map, titled with the predicted and explained class.",
    )
    explain.add_argument("model", metavar="MODEL", help="A saved B-cos model: folder or Hub id.")
    explain.add_argument("images", metavar="IMAGE", nargs="+", help="Image files, or folders: every image file in them.")
    explain.add_argument("--target", metavar="LABEL|INDEX", help="The class to explain (default: the prediction). CLIP: a --text prompt or its index.")
    explain.add_argument(
        "--unit", metavar="MODULE:CHANNEL", help="Explain a channel of a module's output (summed over positions) instead of a class, e.g. backbone.model.resnet.encoder.stages.1:5."
    )
    explain.add_argument("--text", metavar="PROMPT", nargs="+", help="B-cos CLIP: texts to compare each image with; explains the image-text cosine.")
    explain.add_argument("--out", metavar="DIR", default="explanations", help="Output folder (default: ./explanations).")
    explain.add_argument("--top-k", type=positive_int, default=5, help="Predictions to print per image (default: 5).")
    explain.add_argument("--overwrite", action="store_true", help="Replace PNGs of the same names in --out.")
    explain.set_defaults(run=run_explain)

    evaluate = commands.add_parser(
        "evaluate", parents=[common], help="Accuracy, GridPG and completeness of a B-cos classifier.",
        description="Measure a saved B-cos image classifier on a labelled data set: top-1 accuracy (and the standard "
        "source model's with --source), the grid pointing game (GridPG) and the completeness of its explanations.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="A saved B-cos image classifier: folder or Hub id.")
    evaluate.add_argument("--dataset", required=True, metavar="DATA", help="A Hub dataset id, an imagefolder directory, or embedded:mnist.")
    evaluate.add_argument("--split", default=None, help="The split to evaluate (default: validation/valid/val/test, else a held-out 15%% of train).")
    evaluate.add_argument("--image-column", default=None, help="The image column (default: the Image-typed one).")
    evaluate.add_argument("--label-column", default=None, help="The label column (default: the ClassLabel-typed one).")
    evaluate.add_argument("--max-images", type=positive_int, default=None, help="Evaluate a seeded random subset of this size.")
    evaluate.add_argument("--grid-size", type=int, choices=(2, 3), default=2, help="GridPG grid: 2×2 or 3×3 (default: 2).")
    evaluate.add_argument("--num-grids", type=positive_int, default=200, help="GridPG grids to sample (default: 200).")
    evaluate.add_argument("--completeness-images", type=positive_int, default=100, help="Images whose completeness is checked (default: 100).")
    evaluate.add_argument("--batch-size", type=positive_int, default=32, help="Images per forward/backward pass (default: 32).")
    evaluate.add_argument("--source", metavar="SRC", default=None, help="The standard source model, to measure its accuracy too.")
    evaluate.add_argument(
        "--save", action="store_true",
        help=f"Write {EXAMPLE_IMAGE} and the metrics (bcos_evaluation.json) into MODEL, and the model card README.md "
        "unless MODEL has one written otherwise (e.g. by fine-tuning), which is kept.",
    )
    evaluate.add_argument("--license", default=None, help="Licence for the model card (default: the source model's).")
    evaluate.set_defaults(run=run_evaluate)

    push = commands.add_parser(
        "push", parents=[common], help="Upload a model folder with its code, processor and card to the Hub.",
        description="Upload a saved B-cos model to the Hugging Face Hub: weights, code, config, image processor, "
        "tokenizer (CLIP) and model card. The upload is staged first and checked: the card must parse with the "
        "required metadata, and the staged folder must load and explain in a Python process without transformers_bcos.",
    )
    push.add_argument("dir", metavar="DIR", help="The saved B-cos model folder.")
    push.add_argument("repo_id", metavar="ORG/NAME", help="The Hub repository to create or update.")
    push.add_argument("--dry-run", action="store_true", help="Stage and check only; print the staged folder.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--staging-dir", default=None, help="Where to stage the upload (default: a new temporary folder).")
    push.add_argument("--license", default=None, help="Licence for a card rendered here (default: the source model's).")
    push.set_defaults(run=run_push)
    return parser


@contextlib.contextmanager
def quiet_libraries():
    """One line per error on stderr: silence library warnings, log messages and progress bars
    while a command runs, and restore them afterwards (main() may run inside another program)."""
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    # The evaluation code logs warnings (e.g. a GridPG that stopped early) that the command prints itself.
    package_logger = logging.getLogger("transformers_bcos")
    previous_level = package_logger.level
    previous_verbosity = transformers_logging.get_verbosity()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    hub_bars_disabled = are_progress_bars_disabled()
    # datasets reads this when first imported; if it already is, switch its bars off directly.
    previous_datasets_bars = os.environ.get(DATASETS_PROGRESS_BARS_VARIABLE)
    os.environ[DATASETS_PROGRESS_BARS_VARIABLE] = "1"
    datasets = sys.modules.get("datasets")
    datasets_bars = datasets is not None and datasets.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package_logger.setLevel(logging.ERROR)
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()
        if datasets_bars:
            datasets.disable_progress_bars()
        try:
            yield
        finally:
            package_logger.setLevel(previous_level)
            transformers_logging.set_verbosity(previous_verbosity)
            if transformers_bars:
                transformers_logging.enable_progress_bar()
            if not hub_bars_disabled:
                enable_progress_bars()
            if datasets_bars:
                datasets.enable_progress_bars()
            if previous_datasets_bars is None:
                del os.environ[DATASETS_PROGRESS_BARS_VARIABLE]
            else:
                os.environ[DATASETS_PROGRESS_BARS_VARIABLE] = previous_datasets_bars


def check_single_dash_arguments(argv) -> None:
    """argparse reads any word that starts with '-' as an option, so a model, image or Hub id
    written that way ends in a puzzling "arguments are required"; say what happened instead."""
    for word in argv:
        if word == "--":
            return
        if word.startswith("-") and not word.startswith("--") and word != "-h" and not NEGATIVE_NUMBER.match(word):
            raise CLIError(
                f"{word!r} is read as an option, and there is none of that name: a path that starts with '-' can be "
                f"written ./{word} (or put it after --); Hub ids never start with '-'."
            )


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_single_dash_arguments(argv)
    except CLIError as error:
        print(f"transformers-bcos: error: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    with contextlib.nullcontext() if args.verbose else quiet_libraries():
        try:
            args.run(args)
        except KeyboardInterrupt:
            print(f"transformers-bcos {args.command}: interrupted", file=sys.stderr)
            return 130
        except (CLIError, *USER_ERRORS, subprocess.TimeoutExpired) as error:
            if args.debug:
                raise
            print(f"transformers-bcos {args.command}: error: {first_line(error)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
