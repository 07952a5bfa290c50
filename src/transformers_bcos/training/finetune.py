"""Fine-tuning a B-cos image classifier end to end with Accelerate.

`run_finetuning(FinetuneOptions(...))` does what ``examples/finetune.py`` exposes on the command
line: standard checkpoint -> B-cosify (or continue a B-cos checkpoint, or build one from scratch)
-> BatchNorm re-estimation -> fine-tuning with the B-cos recipe -> evaluation each epoch ->
a Hub-ready folder (code, config, safetensors, image processor, README.md model card).
Every input is checked before any work starts (`validate_options`, then the data set).
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import AutoConfig, ViTConfig

from ..configuration_bcos import SUPPORTED_BACKBONES, BcosConfig
from ..conversion import bcosify_pretrained
from ..data import (
    DEFAULT_DATASET,
    EMBEDDED_PREFIX,
    ImageClassificationData,
    ImageClassificationDataset,
    ImageProcessorCollator,
    image_processor_from_dict,
    load_image_classification_data,
)
from ..defaults import STANDARD_MODEL_RECIPES, TRAINING_SUMMARY_FILE, default_standard_model
from ..layers import BcosLinear
from ..modeling_bcos import BcosForImageClassification
from .batchnorm import batchnorm_layers, reestimate_batchnorm_statistics
from .checkpointing import CheckpointManager, TrainingPosition, read_position
from .loop import RunningMean, ThroughputMeter, check_agc_supported, evaluate_accuracy, training_step
from ..model_card import IMAGE_CLASSIFICATION_TEMPLATE, fill_template, markdown_rows
from .recipe import create_optimizer, create_scheduler, recipe_defaults

# "--model default:resnet" / "default:vit": the cached standard models of transformers_bcos.defaults.
DEFAULT_MODEL_PREFIX = "default:"
DEFAULT_MODEL = DEFAULT_MODEL_PREFIX + "resnet"
# Files of a finished or running fine-tuning in its output folder.
RUN_OPTIONS_FILE = "finetune_options.json"
RESULTS_FILE = "all_results.json"
# Output-folder entries that are not part of the published model.
NOT_PUBLISHED = ["checkpoints/*", "runs/*", RUN_OPTIONS_FILE]


@dataclass
class FinetuneOptions:
    """The options of `run_finetuning` (the command-line flags of examples/finetune.py).

    None for a recipe value (learning rate, weight decay, warm-up, AGC, BN re-estimation) means
    the documented default of the model family (`transformers_bcos.training.recipe`).
    """

    model: Optional[str] = None
    dataset: Optional[str] = None
    output_dir: str = "outputs/bcos-finetune"
    from_scratch: Optional[str] = None
    b: float = 2.0
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: str = "train"
    eval_split: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    image_size: Optional[int] = None
    num_train_epochs: int = 3
    max_train_steps: Optional[int] = None
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int = 256
    gradient_accumulation_steps: int = 1
    learning_rate: Optional[float] = None
    weight_decay: Optional[float] = None
    lr_scheduler_type: Optional[str] = None
    num_warmup_steps: Optional[int] = None
    agc_clip_factor: Optional[float] = None
    bn_reestimation_images: Optional[int] = None
    augment: bool = False
    augment_min_scale: float = 0.08
    checkpointing_steps: Optional[int] = None
    keep_last_checkpoints: int = 2
    resume_from_checkpoint: Optional[str] = None
    overwrite_output_dir: bool = False
    seed: int = 0
    mixed_precision: Optional[str] = None
    with_tracking: bool = False
    report_to: str = "all"
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = None
    model_card_template: Optional[str] = None
    disable_progress_bar: bool = False


class OptionsError(ValueError):
    """Options that cannot work; raised before any work, with a one-line message."""


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise OptionsError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def _holds_another_run(output_dir: str) -> bool:
    return os.path.isdir(output_dir) and any(not name.startswith(".") for name in os.listdir(output_dir))


def validate_options(options: FinetuneOptions) -> None:
    """Check the options that need no data or model: output folder, numbers, Hub access."""
    if options.model is not None and options.from_scratch is not None:
        raise OptionsError("Pass either --model (a checkpoint to start from) or --from_scratch, not both.")
    for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "keep_last_checkpoints", "logging_steps", "b"):
        _positive(name, getattr(options, name))
    for name in ("max_train_steps", "checkpointing_steps", "max_train_samples", "max_eval_samples", "image_size",
                 "learning_rate"):
        _positive(name, getattr(options, name))
    for name in ("weight_decay", "num_warmup_steps", "agc_clip_factor", "bn_reestimation_images", "dataloader_num_workers"):
        _positive(name, getattr(options, name), allow_zero=True)
    if not 0 < options.augment_min_scale <= 1:
        raise OptionsError(f"--augment_min_scale must be in (0, 1], got {options.augment_min_scale}.")
    if options.model_card_template is not None and not os.path.isfile(options.model_card_template):
        raise OptionsError(f"--model_card_template {options.model_card_template} does not exist.")
    if options.model_card_template is None and not os.path.isfile(IMAGE_CLASSIFICATION_TEMPLATE):
        raise OptionsError(f"The model-card template {IMAGE_CLASSIFICATION_TEMPLATE} is missing: pass --model_card_template.")

    if options.resume_from_checkpoint is not None:
        # Raises CheckpointError (a ValueError) naming the problem.
        CheckpointManager(options.output_dir).resolve(options.resume_from_checkpoint)
    elif _holds_another_run(options.output_dir) and not options.overwrite_output_dir:
        raise OptionsError(
            f"Output directory {options.output_dir} already holds files (another run?): pass --overwrite_output_dir, "
            "--resume_from_checkpoint latest, or another --output_dir."
        )
    if options.push_to_hub:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise OptionsError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set.")
        if options.hub_model_id is None:
            raise OptionsError("--push_to_hub needs --hub_model_id ORG/NAME.")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedModel:
    model: BcosForImageClassification
    origin: str  # "bcosified", "continued" or "scratch"
    source: str
    family: str
    source_summary: dict = field(default_factory=dict)


def _scratch_config(spec: str, b: float, labels: list, image_size: Optional[int]) -> tuple:
    """``--from_scratch``: a family name (the small architecture of the default models) or a JSON config."""
    if spec in STANDARD_MODEL_RECIPES:
        backbone = STANDARD_MODEL_RECIPES[spec]["config"]()
        default_size = 28
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            config_dict = json.load(f)
        if config_dict.get("model_type") == BcosConfig.model_type:
            backbone = BcosConfig.from_dict(config_dict).backbone_config
        elif config_dict.get("model_type") in SUPPORTED_BACKBONES:
            backbone = AutoConfig.for_model(**config_dict)
        else:
            raise OptionsError(
                f"--from_scratch {spec}: model_type {config_dict.get('model_type')!r} is not one of "
                f"{', '.join(sorted(SUPPORTED_BACKBONES))} or bcos."
            )
        default_size = 224
    else:
        raise OptionsError(
            f"--from_scratch {spec!r} is neither a family ({', '.join(STANDARD_MODEL_RECIPES)}) nor a JSON config file."
        )
    if isinstance(backbone, ViTConfig) or backbone.model_type == "deit":
        size = backbone.image_size
        if image_size is not None and image_size != size:
            raise OptionsError(f"--image_size {image_size} differs from the ViT config's image_size {size}.")
    else:
        size = image_size or default_size
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
    }
    config = BcosConfig(
        backbone_config=backbone,
        b=b,
        normalize_weights=True,
        image_processor=processor,
        id2label={i: name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
    )
    return config, SUPPORTED_BACKBONES[backbone.model_type]


def _source_model_type(source: str) -> str:
    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as error:
        raise OptionsError(f"Cannot load the model config of {source!r}: {str(error).splitlines()[0]}") from error


def adapt_classifier_to_labels(model: BcosForImageClassification, labels: list) -> bool:
    """Give ``model`` a freshly initialised classifier for ``labels`` unless it already has exactly them.

    Returns True when the classifier was replaced. The fixed logit bias follows the new number of
    classes (-log(C-1)).
    """
    current = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if current == list(labels):
        return False
    old = model.classifier
    model.classifier = BcosLinear(
        old.in_features, len(labels), bias=old.bias is not None, b=old.b, normalize_weights=old.normalize_weights
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    model.config.num_labels = len(labels)
    model.config.id2label = {i: name for i, name in enumerate(labels)}
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.config.logit_bias = -math.log(len(labels) - 1) if len(labels) > 1 else 0.0
    return True


def prepare_model(options: FinetuneOptions, data: ImageClassificationData, accelerator: Accelerator) -> PreparedModel:
    """Build the B-cos model to train: B-cosified, continued or from scratch, with the data's labels."""
    if options.from_scratch is not None:
        config, family = _scratch_config(options.from_scratch, options.b, data.labels, options.image_size)
        return PreparedModel(BcosForImageClassification(config), "scratch", options.from_scratch, family)

    source = options.model or DEFAULT_MODEL
    source_summary = {}
    if source.startswith(DEFAULT_MODEL_PREFIX):
        family = source[len(DEFAULT_MODEL_PREFIX):]
        if family not in STANDARD_MODEL_RECIPES:
            raise OptionsError(f"Unknown default model {source!r}; available: "
                               + ", ".join(DEFAULT_MODEL_PREFIX + f for f in STANDARD_MODEL_RECIPES) + ".")
        # The main process trains and caches it on first use; the others then read the cache.
        with accelerator.main_process_first():
            folder = default_standard_model(family)
        with open(os.path.join(folder, TRAINING_SUMMARY_FILE), encoding="utf-8") as f:
            source_summary = json.load(f)
        source_for_loading = folder
    else:
        source_for_loading = source
    model_type = _source_model_type(source_for_loading)
    if model_type == BcosConfig.model_type:
        model = BcosForImageClassification.from_pretrained(source_for_loading)
        if options.b != model.config.b:
            raise OptionsError(f"--b {options.b} differs from the B-cos checkpoint's b={model.config.b}.")
        origin, family = "continued", model.config.backbone_family
    else:
        if model_type not in SUPPORTED_BACKBONES:
            raise OptionsError(f"Unsupported architecture {model_type!r} in {source}; supported: "
                               f"{', '.join(sorted(SUPPORTED_BACKBONES))} (standard) or B-cos checkpoints.")
        model = bcosify_pretrained(source_for_loading, b=options.b)
        origin, family = "bcosified", SUPPORTED_BACKBONES[model_type]
    adapt_classifier_to_labels(model, data.labels)
    return PreparedModel(model, origin, source, family, source_summary)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class ResolvedRecipe:
    learning_rate: float
    weight_decay: float
    lr_scheduler_type: str
    num_warmup_steps: int
    agc_clip_factor: float
    bn_reestimation_images: int
    max_train_steps: int
    num_train_epochs: int
    steps_per_epoch: int
    source: str


def resolve_recipe(options: FinetuneOptions, prepared: PreparedModel, is_embedded_data: bool, steps_per_epoch: int) -> ResolvedRecipe:
    defaults = recipe_defaults(prepared.family, from_scratch=prepared.origin == "scratch", small_data=is_embedded_data)
    if options.max_train_steps is None:
        max_train_steps = options.num_train_epochs * steps_per_epoch
        epochs = options.num_train_epochs
    else:
        max_train_steps = options.max_train_steps
        epochs = math.ceil(max_train_steps / steps_per_epoch)
    has_batchnorm = bool(batchnorm_layers(prepared.model))
    bn_images = options.bn_reestimation_images
    if bn_images is None:
        bn_images = defaults.bn_reestimation_images if prepared.origin == "bcosified" and has_batchnorm else 0
    warmup = options.num_warmup_steps if options.num_warmup_steps is not None else defaults.warmup_steps(max_train_steps)
    return ResolvedRecipe(
        learning_rate=options.learning_rate if options.learning_rate is not None else defaults.learning_rate,
        weight_decay=options.weight_decay if options.weight_decay is not None else defaults.weight_decay,
        lr_scheduler_type=options.lr_scheduler_type or defaults.lr_scheduler_type,
        num_warmup_steps=warmup,
        agc_clip_factor=options.agc_clip_factor if options.agc_clip_factor is not None else defaults.agc_clip_factor,
        bn_reestimation_images=bn_images,
        max_train_steps=max_train_steps,
        num_train_epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        source=defaults.source,
    )


def _bn_reestimation_loader(data: ImageClassificationData, collator, options, accelerator, num_images: int) -> DataLoader:
    """This process's share of a seeded random subset of ``num_images`` training images, unaugmented.

    Not passed through ``accelerator.prepare``: its sampler must not enter the checkpoints, which
    a resumed run (that skips the re-estimation) could then not load.
    """
    generator = torch.Generator().manual_seed(options.seed)
    subset = torch.randperm(len(data.train), generator=generator)[:num_images]
    shard = subset[accelerator.process_index :: accelerator.num_processes].tolist()
    dataset = ImageClassificationDataset(data.train.select(shard), data.image_column, data.label_column)
    return DataLoader(dataset, batch_size=options.per_device_train_batch_size, collate_fn=collator,
                      num_workers=options.dataloader_num_workers)


def _recordable(options: FinetuneOptions) -> dict:
    """The options without secrets, for the run's record and the trackers."""
    return {key: value for key, value in asdict(options).items() if key != "hub_token"}


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def model_card_values(options, prepared: PreparedModel, data: ImageClassificationData, recipe: ResolvedRecipe,
                      metrics: dict, num_processes: int, mixed_precision: str) -> dict:
    model = prepared.model
    params = sum(p.numel() for p in model.parameters())
    backbone = model.config.backbone_config
    origin = {
        "bcosified": f"It was B-cosified from the standard model `{prepared.source}` ({backbone.model_type}) and fine-tuned.",
        "continued": f"It was fine-tuned from the B-cos checkpoint `{prepared.source}`.",
        "scratch": f"It was trained from scratch (architecture: `{prepared.source}`).",
    }[prepared.origin]
    results = []
    if prepared.source_summary.get("dataset") == (options.dataset or DEFAULT_DATASET):
        results.append(("standard source model (cross-entropy)", _percent(prepared.source_summary.get("test_accuracy"))))
    if "accuracy_before_bn_reestimation" in metrics:
        results.append(("B-cosified, before BatchNorm re-estimation", _percent(metrics["accuracy_before_bn_reestimation"])))
        results.append((f"after BatchNorm re-estimation ({metrics['bn_reestimation_images']} images, no gradient step)",
                        _percent(metrics["accuracy_after_bn_reestimation"])))
    for entry in metrics.get("epochs", []):
        results.append((f"after epoch {entry['epoch']} ({entry['step']} steps)", _percent(entry["eval_accuracy"])))
    global_batch = options.per_device_train_batch_size * num_processes * options.gradient_accumulation_steps
    training = [
        ("training images", f"{len(data.train):,}"),
        ("epochs / optimizer steps", f"{recipe.num_train_epochs} / {recipe.max_train_steps}"),
        ("global batch size", f"{global_batch} ({num_processes} process(es) × {options.per_device_train_batch_size}"
                              f" × {options.gradient_accumulation_steps} accumulation)"),
        ("optimizer", f"AdamW, lr {recipe.learning_rate:g}, weight decay {recipe.weight_decay:g}"),
        ("schedule", f"{recipe.lr_scheduler_type}, {recipe.num_warmup_steps} warm-up steps"),
        ("adaptive gradient clipping", f"{recipe.agc_clip_factor:g}" if recipe.agc_clip_factor > 0 else "off"),
        ("augmentation", f"random resized crop (scale {options.augment_min_scale:g}–1) + horizontal flip"
                         if options.augment else "none"),
        ("mixed precision", mixed_precision),
        ("seed", str(options.seed)),
    ]
    metadata = ["metrics:", "- accuracy"]
    dataset = options.dataset or DEFAULT_DATASET
    if not dataset.startswith(EMBEDDED_PREFIX) and not os.path.isdir(os.path.expanduser(dataset)):
        metadata += ["datasets:", f"- {dataset}"]
    if prepared.origin != "scratch" and not prepared.source.startswith(DEFAULT_MODEL_PREFIX) and not os.path.isdir(prepared.source):
        metadata.append(f"base_model: {prepared.source}")
    labels = ", ".join(f"{i}: {name}" for i, name in list(enumerate(data.labels))[:50])
    if len(data.labels) > 50:
        labels += f", … ({len(data.labels)} classes)"
    return {
        "hub_metadata": "\n".join(metadata),
        "model_name": options.hub_model_id or os.path.basename(os.path.abspath(options.output_dir)),
        "architecture": f"{type(model).__name__}, {backbone.model_type} backbone, {params / 1e6:.2f}M parameters",
        "b": f"{model.config.b:g}",
        "origin": origin,
        "eval_description": f"{len(data.eval):,} images of {data.source}",
        "results_rows": markdown_rows(results),
        "training_rows": markdown_rows(training),
        "recipe_source": recipe.source,
        "repo_id": options.hub_model_id or os.path.abspath(options.output_dir),
        "labels": labels,
    }


def run_finetuning(options: FinetuneOptions) -> dict:
    """Fine-tune (or train) a B-cos classifier as described by ``options``; returns the final metrics.

    Call under ``accelerate launch`` for several processes; a plain call runs one process.
    """
    validate_options(options)
    accelerator = Accelerator(
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        mixed_precision=options.mixed_precision,
        log_with=options.report_to if options.with_tracking else None,
        project_dir=options.output_dir,
        # The sampler's order is a function of (seed, epoch): a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=options.seed),
    )
    try:
        return _run(options, accelerator)
    finally:
        accelerator.end_training()


def _run(options: FinetuneOptions, accelerator: Accelerator) -> dict:
    log = accelerator.print
    set_seed(options.seed)
    # Every process opens the data itself (datasets locks its cache), so that a bad data set fails
    # on all of them alike instead of leaving the others waiting at a barrier.
    data = load_image_classification_data(
        options.dataset,
        image_column=options.image_column,
        label_column=options.label_column,
        train_split=options.train_split,
        eval_split=options.eval_split,
        max_train_samples=options.max_train_samples,
        max_eval_samples=options.max_eval_samples,
        seed=options.seed,
    )
    prepared = prepare_model(options, data, accelerator)
    model = prepared.model
    processor = image_processor_from_dict(model.config.image_processor)
    collator = ImageProcessorCollator(processor)

    train_dataset = ImageClassificationDataset(
        data.train, data.image_column, data.label_column, augment=options.augment, seed=options.seed,
        crop_scale=(options.augment_min_scale, 1.0),
    )
    eval_dataset = ImageClassificationDataset(data.eval, data.image_column, data.label_column)
    # Own generators, so that creating a dataloader iterator never draws from the global RNG.
    train_loader = DataLoader(train_dataset, batch_size=options.per_device_train_batch_size, shuffle=True,
                              collate_fn=collator, num_workers=options.dataloader_num_workers,
                              generator=torch.Generator().manual_seed(options.seed))
    eval_loader = DataLoader(eval_dataset, batch_size=options.per_device_eval_batch_size, collate_fn=collator,
                             num_workers=options.dataloader_num_workers, generator=torch.Generator())

    steps_per_epoch = math.ceil(
        math.ceil(len(train_dataset) / (options.per_device_train_batch_size * accelerator.num_processes))
        / options.gradient_accumulation_steps
    )
    recipe = resolve_recipe(options, prepared, (options.dataset or DEFAULT_DATASET).startswith(EMBEDDED_PREFIX),
                            steps_per_epoch)
    check_agc_supported(accelerator, recipe.agc_clip_factor)
    optimizer = create_optimizer(model, recipe.learning_rate, recipe.weight_decay)
    lr_scheduler = create_scheduler(optimizer, recipe.lr_scheduler_type, recipe.num_warmup_steps,
                                    recipe.max_train_steps, accelerator.num_processes)

    checkpoints = CheckpointManager(options.output_dir, options.keep_last_checkpoints)
    resume_dir = checkpoints.resolve(options.resume_from_checkpoint) if options.resume_from_checkpoint else None
    if accelerator.is_main_process:
        os.makedirs(options.output_dir, exist_ok=True)
        if options.overwrite_output_dir and resume_dir is None:
            shutil.rmtree(checkpoints.directory, ignore_errors=True)  # a stale "latest" must not survive
        checkpoints.remove_leftovers()
        if resume_dir is not None:
            checkpoints.abandon_newer_than(resume_dir)
        _write_json(os.path.join(options.output_dir, RUN_OPTIONS_FILE), _recordable(options))
    accelerator.wait_for_everyone()

    log(f"Data: {data.source}: {len(data.train):,} training / {len(data.eval):,} evaluation images, "
        f"{len(data.labels)} classes. Model: {prepared.origin} from {prepared.source} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {accelerator.num_processes} process(es).")
    log(f"Recipe ({recipe.source}): lr {recipe.learning_rate:g}, weight decay {recipe.weight_decay:g}, "
        f"{recipe.lr_scheduler_type} with {recipe.num_warmup_steps} warm-up steps, AGC {recipe.agc_clip_factor:g}, "
        f"{recipe.num_train_epochs} epoch(s) = {recipe.max_train_steps} steps.")

    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler
    )
    if options.with_tracking:
        tracked = {k: v for k, v in _recordable(options).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("bcos_finetune", {**tracked, **{f"recipe_{k}": v for k, v in asdict(recipe).items()}})

    if resume_dir is not None:
        accelerator.load_state(resume_dir)
        position = read_position(resume_dir)
        log(f"Resumed from {resume_dir} (step {position.completed_steps}, epoch {position.epoch + 1}).")
    else:
        position = TrainingPosition()
        if recipe.bn_reestimation_images > 0:
            before = evaluate_accuracy(accelerator, model, eval_loader).accuracy
            loader = _bn_reestimation_loader(data, collator, options, accelerator, recipe.bn_reestimation_images)
            used = reestimate_batchnorm_statistics(
                accelerator.unwrap_model(model), (_to_device(b, accelerator.device) for b in loader)
            )
            after = evaluate_accuracy(accelerator, model, eval_loader).accuracy
            position.metrics.update(accuracy_before_bn_reestimation=before, accuracy_after_bn_reestimation=after,
                                    bn_reestimation_images=used)
            log(f"BatchNorm re-estimation on {used} training images (no gradient step): accuracy "
                f"{_percent(before)} -> {_percent(after)}.")
            if options.with_tracking:
                accelerator.log({"eval/accuracy_before_bn_reestimation": before,
                                 "eval/accuracy_after_bn_reestimation": after}, step=0)
    position.metrics.setdefault("epochs", [])

    first_epoch, skip_batches = position.resume_point()
    completed_steps = position.completed_steps
    progress = None
    if accelerator.is_main_process and not options.disable_progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=recipe.max_train_steps, initial=completed_steps, desc="fine-tuning", dynamic_ncols=True)
    throughput, running_loss = ThroughputMeter(), RunningMean()

    for epoch in range(first_epoch, recipe.num_train_epochs):
        if completed_steps >= recipe.max_train_steps:
            break
        model.train()
        train_loader.set_epoch(epoch)
        train_dataset.set_epoch(epoch)  # Accelerate's set_epoch does not reach a sharded loader's dataset
        epoch_loader = train_loader
        batches_in_epoch = 0
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(train_loader, skip_batches)
            batches_in_epoch = skip_batches
        throughput.restart()
        epoch_loss, epoch_steps = 0.0, 0
        for batch in epoch_loader:
            loss = training_step(accelerator, model, batch, optimizer, lr_scheduler, recipe.agc_clip_factor)
            batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            epoch_loss, epoch_steps = epoch_loss + loss.item(), epoch_steps + 1
            throughput.update(batch["pixel_values"].shape[0] * accelerator.num_processes * options.gradient_accumulation_steps)
            mean_loss = running_loss.update(loss.item())
            learning_rate = lr_scheduler.get_last_lr()[0]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{learning_rate:.2e}",
                                     img_s=f"{throughput.images_per_second:.0f}", refresh=False)
            if options.with_tracking and completed_steps % options.logging_steps == 0:
                accelerator.log({"train/loss": mean_loss, "train/learning_rate": learning_rate,
                                 "train/images_per_second": throughput.images_per_second}, step=completed_steps)
            if options.checkpointing_steps and completed_steps % options.checkpointing_steps == 0:
                position = TrainingPosition(completed_steps, epoch, batches_in_epoch, False, position.metrics)
                checkpoints.save(accelerator, f"step_{completed_steps:08d}", position)
                throughput.restart()
            if completed_steps >= recipe.max_train_steps:
                break

        result = evaluate_accuracy(accelerator, model, eval_loader)
        position.metrics["epochs"].append(
            {"epoch": epoch + 1, "step": completed_steps, "eval_accuracy": result.accuracy,
             "eval_examples": result.num_examples,
             # Mean loss of this process's steps in this epoch (of the resumed part, after a resume).
             "train_loss": epoch_loss / epoch_steps if epoch_steps else None}
        )
        log(f"epoch {epoch + 1}: top-1 accuracy {_percent(result.accuracy)} on {result.num_examples:,} images "
            f"(step {completed_steps}).")
        if options.with_tracking:
            accelerator.log({"eval/accuracy": result.accuracy, "epoch": epoch + 1}, step=completed_steps)
        position = TrainingPosition(completed_steps, epoch, batches_in_epoch, True, position.metrics)
        checkpoints.save(accelerator, f"epoch_{epoch + 1:04d}", position)
    if progress is not None:
        progress.close()

    metrics = dict(position.metrics)
    if metrics["epochs"]:
        metrics["eval_accuracy"] = metrics["epochs"][-1]["eval_accuracy"]
        metrics["eval_examples"] = metrics["epochs"][-1]["eval_examples"]
    metrics.update(train_steps=completed_steps, num_processes=accelerator.num_processes)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(options.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        card = fill_template(model_card_values(options, prepared, data, recipe, metrics, accelerator.num_processes,
                                                   accelerator.mixed_precision),
                                 options.model_card_template)
        with open(os.path.join(options.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        _write_json(os.path.join(options.output_dir, RESULTS_FILE), metrics)
        log(f"Saved the model, its image processor and README.md to {options.output_dir}.")
        if options.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=options.hub_token)
            repo_id = api.create_repo(options.hub_model_id, exist_ok=True).repo_id
            api.upload_folder(folder_path=options.output_dir, repo_id=repo_id, ignore_patterns=NOT_PUBLISHED,
                              commit_message="B-cos fine-tuning with transformers-bcos")
            log(f"Pushed to https://huggingface.co/{repo_id}.")
    accelerator.wait_for_everyone()
    return metrics
