"""Fine-tuning a B-cos image classifier end to end with Accelerate.

`run_finetuning(FinetuneOptions(...))` does what ``examples/finetune.py`` exposes on the command
line: standard checkpoint -> B-cosify (or continue a B-cos checkpoint, or build one from scratch)
-> BatchNorm re-estimation -> fine-tuning with the B-cos recipe -> evaluation each epoch ->
a Hub-ready folder (code, config, safetensors, image processor, README.md model card).
Every input is checked before any work starts (`validate_options`, then the starting checkpoint,
then the data set, each image of which is decoded once).
"""

import copy
import json
import math
import os
import pickle
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from transformers import AutoConfig

from ..configuration_bcos import FIXED_SIZE_MODEL_TYPES, PLAIN_MODULE_FAMILY, BcosConfig, backbone_family_of
from ..conversion import bcosify_pretrained
from ..data import (
    DEFAULT_DATASET,
    EMBEDDED_PREFIX,
    ImageClassificationData,
    ImageClassificationDataset,
    ImageProcessorCollator,
    boxes_of,
    image_processor_from_dict,
)
from ..defaults import STANDARD_MODEL_RECIPES, TRAINING_SUMMARY_FILE, default_standard_model
from ..model_card import IMAGE_CLASSIFICATION_TEMPLATE, fill_template, markdown_rows
from ..modeling_bcos import BcosForImageClassification, BcosPlainModuleArchitecture, BcosSourceArchitecture, build_library_model
from .batchnorm import batchnorm_layers, reestimate_batchnorm_statistics
from .checkpointing import CheckpointError, CheckpointManager, TrainingPosition, check_checkpoint_files, read_position
from .distillation import Teacher, e2kd_loss, eval_loader_distillation
from .guidance import GUIDANCE_LOSSES, annotated_rows, eval_loader_energy_pointing_game, guidance_loss
from .loop import check_agc_supported, classification_loss, evaluate_accuracy, training_step
from .recipe import create_optimizer, create_scheduler, recipe_defaults, recipe_family
from .run import (
    OptionsError,
    RunOptions,
    Schedule,
    build_loaders,
    check_positive,
    create_accelerator,
    hub_metadata,
    load_run_data,
    load_training_state,
    optimization_rows,
    output_dir_lock,
    percent,
    prepare_output_dir,
    recordable,
    resolve_schedule,
    save_and_publish,
    train_epochs,
    validate_run_options,
)

# "--model default:resnet" / "default:vit": the cached standard models of transformers_bcos.defaults.
DEFAULT_MODEL_PREFIX = "default:"
DEFAULT_MODEL = DEFAULT_MODEL_PREFIX + "resnet"


@dataclass
class FinetuneOptions(RunOptions):
    """The options of `run_finetuning` (the command-line flags of examples/finetune.py).

    None for a recipe value (learning rate, weight decay, warm-up, AGC, BN re-estimation) means
    the documented default of the model family (`transformers_bcos.training.recipe`).
    """

    model: Optional[str] = None
    output_dir: str = "outputs/bcos-finetune"
    from_scratch: Optional[str] = None
    b: float = 2.0
    image_size: Optional[int] = None
    agc_clip_factor: Optional[float] = None
    bn_reestimation_images: Optional[int] = None
    # Model guidance (`transformers_bcos.training.guidance`): the loss, its weight, the boxes'
    # column (default "objects" with a loss; without one, the boxes only score the evaluation's
    # energy pointing game) and the fraction of training images with boxes that use them.
    guidance_loss: Optional[str] = None
    guidance_weight: float = 1.0
    guidance_box_column: Optional[str] = None
    guidance_fraction: float = 1.0
    # e²KD (`transformers_bcos.training.distillation`): with a teacher, the loss is KD at the
    # temperature + the weight × (1 − cosine) of the explanations of the teacher's top-1 class,
    # as in the paper; the labels are not used by the loss.
    teacher: Optional[str] = None
    distillation_temperature: float = 1.0
    explanation_distillation_weight: float = 1.0

    @property
    def box_column(self) -> Optional[str]:
        return self.guidance_box_column or ("objects" if self.guidance_loss else None)


def _read_scratch_config(spec: str) -> dict:
    """The JSON config file of ``--from_scratch``, or an OptionsError naming what is wrong with it."""
    try:
        with open(spec, encoding="utf-8") as f:
            config_dict = json.load(f)
    except (OSError, UnicodeDecodeError) as error:
        raise OptionsError(f"--from_scratch {spec}: cannot read it: {error}") from None
    except json.JSONDecodeError as error:
        raise OptionsError(f"--from_scratch {spec} is not valid JSON: {error}") from None
    if not isinstance(config_dict, dict):
        raise OptionsError(f"--from_scratch {spec} holds a JSON {type(config_dict).__name__}, not a config object.")
    if config_dict.get("model_type") != BcosConfig.model_type:
        try:
            backbone_family_of(config_dict.get("model_type"))
        except ValueError as error:
            raise OptionsError(f"--from_scratch {spec}: {error}") from None
    return config_dict


def _check_model_folder(source: str) -> None:
    """A local --model folder must hold config.json and readable weights (checked before any work)."""
    folder = os.path.expanduser(source)
    if not os.path.isdir(folder):
        return
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise OptionsError(f"--model {source} is not a saved model folder: it has no config.json.")
    weights = [name for name in os.listdir(folder) if name.endswith((".safetensors", ".bin"))]
    if not weights:
        raise OptionsError(f"--model {source} holds no weights (model.safetensors).")
    try:
        check_checkpoint_files(folder)
    except CheckpointError as error:
        raise OptionsError(f"--model {source}: {error}") from None


def validate_options(options: FinetuneOptions) -> None:
    """Check the options that need no data or model: output folder, numbers, Hub access."""
    if options.model is not None and options.from_scratch is not None:
        raise OptionsError("Pass either --model (a checkpoint to start from) or --from_scratch, not both.")
    if options.from_scratch is not None and os.path.isfile(options.from_scratch):
        _read_scratch_config(options.from_scratch)
    if options.model is not None:
        _check_model_folder(options.model)
    check_positive("b", options.b)
    check_positive("image_size", options.image_size)
    check_positive("agc_clip_factor", options.agc_clip_factor, allow_zero=True)
    check_positive("bn_reestimation_images", options.bn_reestimation_images, allow_zero=True)
    if options.guidance_loss is not None and options.guidance_loss not in GUIDANCE_LOSSES:
        raise OptionsError(f"--guidance_loss {options.guidance_loss!r} is not one of {', '.join(GUIDANCE_LOSSES)}.")
    check_positive("guidance_weight", options.guidance_weight, allow_zero=True)
    if not 0 < options.guidance_fraction <= 1:  # also false for NaN
        raise OptionsError(f"--guidance_fraction must be in (0, 1], got {options.guidance_fraction}.")
    if options.teacher is not None and not os.path.isdir(options.teacher):
        raise OptionsError(f"--teacher {options.teacher} is not a folder.")
    check_positive("distillation_temperature", options.distillation_temperature)
    check_positive("explanation_distillation_weight", options.explanation_distillation_weight, allow_zero=True)
    validate_run_options(options, IMAGE_CLASSIFICATION_TEMPLATE)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedModel:
    model: BcosForImageClassification
    origin: str  # "bcosified", "continued" or "scratch"
    source: str
    family: str  # whose recipe it trains with (`recipe_family`)
    source_summary: dict = field(default_factory=dict)


def _scratch_config(spec: str, b: float, labels: list, image_size: Optional[int]) -> tuple:
    """``--from_scratch``: a family name (the small architecture of the default models) or a JSON config."""
    if spec in STANDARD_MODEL_RECIPES:
        backbone = STANDARD_MODEL_RECIPES[spec]["config"]()
        default_size = 28
    elif os.path.isfile(spec):
        config_dict = _read_scratch_config(spec)
        try:
            if config_dict["model_type"] == BcosConfig.model_type:
                backbone = BcosConfig.from_dict(config_dict).backbone_config
            else:
                backbone = AutoConfig.for_model(**config_dict)
        except (TypeError, ValueError, KeyError) as error:
            raise OptionsError(f"--from_scratch {spec} is not a valid config: {str(error).splitlines()[0]}") from None
        default_size = 224
    else:
        raise OptionsError(
            f"--from_scratch {spec!r} is neither a family ({', '.join(STANDARD_MODEL_RECIPES)}) nor a JSON config file."
        )
    if backbone.model_type in FIXED_SIZE_MODEL_TYPES:
        size = backbone.image_size
        if image_size is not None and image_size != size:
            raise OptionsError(f"--image_size {image_size} differs from the ViT config's image_size {size}.")
    else:
        # The size the architecture is built for (position embeddings, attention windows), if it names one.
        built_for = getattr(getattr(backbone, "vision_config", backbone), "image_size", None)
        size = image_size or (built_for if isinstance(built_for, int) else default_size)
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
    return config, recipe_family(config)


def _source_model_type(source: str) -> str:
    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as error:
        raise OptionsError(f"Cannot load the model config of {source!r}: {str(error).splitlines()[0]}") from error


def adapt_classifier_to_labels(model: BcosForImageClassification, labels: list) -> bool:
    """Give ``model`` a freshly initialised classifier for ``labels`` unless it already has exactly them.

    Returns True when the classifier was replaced. The fixed logit bias follows the new number of
    classes (-log(C-1)). A model converted from a torchvision or timm model records the new number
    of classes among the arguments that rebuild it, so that its saved folder loads again.
    """
    current = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if current == list(labels):
        return False
    plain = model.config.backbone_config if model.config.backbone_family == PLAIN_MODULE_FAMILY else None
    if plain is not None and plain.library is None:
        raise OptionsError(
            f"The B-cos model of the plain PyTorch module {plain.module_class or '(unnamed)'} has the labels "
            f"{current[:5]}..., not the data's {list(labels)[:5]}...: its classifier cannot be rebuilt from the config "
            "(only torchvision and timm models can). Give the model the data's labels (config.id2label) before saving it."
        )
    model.config.num_labels = len(labels)
    model.config.id2label = {i: name for i, name in enumerate(labels)}
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.config.logit_bias = -math.log(len(labels) - 1) if len(labels) > 1 else 0.0
    if plain is not None:
        plain.architecture_kwargs = {**plain.architecture_kwargs, "num_classes": len(labels)}
    model.backbone = _with_new_head(model.backbone, model.config)
    return True


def _source_architecture(config: BcosConfig) -> BcosSourceArchitecture:
    """The B-cos source architecture of ``config`` with fresh weights; a torchvision or timm model
    is rebuilt from the library, architecture and arguments its config records."""
    if config.backbone_family == PLAIN_MODULE_FAMILY:
        return BcosPlainModuleArchitecture(config, build_library_model(config.backbone_config))
    return BcosSourceArchitecture(config)


def _with_new_head(backbone: BcosSourceArchitecture, config: BcosConfig) -> BcosSourceArchitecture:
    """The source architecture built again for ``config``'s classes, with every tensor of ``backbone``
    but its freshly initialised classification head.

    The head is found by shape, as its modules differ from family to family: the tensors whose shape
    follows the number of classes (those of an architecture built for one more class, on the meta
    device, differ). Tensors of the same shape are not enough: new labels may be as many as the old.
    """
    wider_config = copy.deepcopy(config)
    wider_config.num_labels = config.num_labels + 1
    if config.backbone_family == PLAIN_MODULE_FAMILY:
        wider_config.backbone_config.architecture_kwargs["num_classes"] = config.num_labels + 1
    with torch.device("meta"):
        wider = _source_architecture(wider_config).state_dict()
    reference = next(iter(backbone.parameters()))
    rebuilt = _source_architecture(config).to(device=reference.device, dtype=reference.dtype)
    head = {key for key, tensor in rebuilt.state_dict().items() if wider[key].shape != tensor.shape}
    rebuilt.load_state_dict({key: tensor for key, tensor in backbone.state_dict().items() if key not in head}, strict=False)
    return rebuilt


def load_starting_model(options: FinetuneOptions, accelerator: Accelerator) -> Optional[PreparedModel]:
    """The checkpoint to start from, B-cosified or continued; None for ``--from_scratch``.

    Loaded before the data (except a ``default:`` model, trained on first use), so that a
    checkpoint that does not load (missing or unexpected weights, other shapes, an unreadable
    file) is reported before any work on the data.
    """
    if options.from_scratch is not None:
        return None
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
    if model_type != BcosConfig.model_type:
        try:
            backbone_family_of(model_type)
        except ValueError as error:
            raise OptionsError(f"--model {source}: {error}") from None
    try:
        if model_type == BcosConfig.model_type:
            model = BcosForImageClassification.from_pretrained(source_for_loading)
            origin = "continued"
        else:
            model = bcosify_pretrained(source_for_loading, b=options.b)
            origin = "bcosified"
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        # transformers reports shape mismatches as RuntimeError, refused pickles as UnpicklingError.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OptionsError(f"Cannot load the model {source}: {message}") from None
    if origin == "continued" and options.b != model.config.b:
        raise OptionsError(f"--b {options.b} differs from the B-cos checkpoint's b={model.config.b}.")
    return PreparedModel(model, origin, source, recipe_family(model.config, model), source_summary)


def prepare_model(options: FinetuneOptions, data: ImageClassificationData, starting: Optional[PreparedModel]) -> PreparedModel:
    """The B-cos model to train, with the data's labels: ``starting`` (`load_starting_model`) with
    its classifier adapted, or, for ``--from_scratch``, a new one."""
    if starting is None:
        config, family = _scratch_config(options.from_scratch, options.b, data.labels, options.image_size)
        return PreparedModel(BcosForImageClassification(config), "scratch", options.from_scratch, family)
    adapt_classifier_to_labels(starting.model, data.labels)
    return starting


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def guided_rows(options: FinetuneOptions, data: ImageClassificationData) -> list:
    """The training rows whose boxes the guidance loss uses (`annotated_rows`); [] without guidance."""
    if not options.guidance_loss:
        return []
    boxes = data.train[data.box_column]
    rows = annotated_rows(len(boxes), lambda i: bool(boxes_of(boxes[i])), options.guidance_fraction, options.seed)
    if not rows:
        raise OptionsError(f"--guidance_loss needs boxes, but no training image has any in the column {data.box_column!r}.")
    return rows


@dataclass
class ResolvedRecipe:
    learning_rate: float
    weight_decay: float
    lr_scheduler_type: str
    num_warmup_steps: int
    agc_clip_factor: float
    bn_reestimation_images: int
    schedule: Schedule
    source: str


def resolve_recipe(options: FinetuneOptions, prepared: PreparedModel, is_embedded_data: bool, schedule: Schedule) -> ResolvedRecipe:
    defaults = recipe_defaults(prepared.family, from_scratch=prepared.origin == "scratch", small_data=is_embedded_data)
    has_batchnorm = bool(batchnorm_layers(prepared.model))
    bn_images = options.bn_reestimation_images
    if bn_images is None:
        bn_images = defaults.bn_reestimation_images if prepared.origin == "bcosified" and has_batchnorm else 0
    warmup = options.num_warmup_steps
    if warmup is None:
        warmup = defaults.warmup_steps(schedule.max_train_steps)
    return ResolvedRecipe(
        learning_rate=options.learning_rate if options.learning_rate is not None else defaults.learning_rate,
        weight_decay=options.weight_decay if options.weight_decay is not None else defaults.weight_decay,
        lr_scheduler_type=options.lr_scheduler_type or defaults.lr_scheduler_type,
        num_warmup_steps=warmup,
        agc_clip_factor=options.agc_clip_factor if options.agc_clip_factor is not None else defaults.agc_clip_factor,
        bn_reestimation_images=bn_images,
        schedule=schedule,
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


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def _backbone_name(backbone_config) -> str:
    """The model type, or for a B-cosified torchvision or timm model its library and architecture."""
    library = getattr(backbone_config, "library", None)
    if library:
        return f"{library} {backbone_config.architecture}"
    return backbone_config.model_type


def model_card_values(options, prepared: PreparedModel, data: ImageClassificationData, recipe: ResolvedRecipe,
                      metrics: dict, num_processes: int, mixed_precision: str) -> dict:
    model = prepared.model
    params = sum(p.numel() for p in model.parameters())
    backbone = model.config.backbone_config
    origin = {
        "bcosified": f"It was B-cosified from the standard model `{prepared.source}` ({_backbone_name(backbone)}) and fine-tuned.",
        "continued": f"It was fine-tuned from the B-cos checkpoint `{prepared.source}`.",
        "scratch": f"It was trained from scratch (architecture: `{prepared.source}`).",
    }[prepared.origin]
    results = []
    if prepared.source_summary.get("dataset") == (options.dataset or DEFAULT_DATASET):
        results.append(("standard source model (cross-entropy)", percent(prepared.source_summary.get("test_accuracy"))))
    if "accuracy_before_bn_reestimation" in metrics:
        results.append(("B-cosified, before BatchNorm re-estimation", percent(metrics["accuracy_before_bn_reestimation"])))
        results.append((f"after BatchNorm re-estimation ({metrics['bn_reestimation_images']} images, no gradient step)",
                        percent(metrics["accuracy_after_bn_reestimation"])))
    for entry in metrics.get("epochs", []):
        value = percent(entry["eval_accuracy"])
        if "eval_energy_pointing_game" in entry:
            value += f" (energy pointing game {entry['eval_energy_pointing_game']:.3f})"
        if "eval_teacher_agreement" in entry:
            value += (f" (agreement with the teacher {percent(entry['eval_teacher_agreement'])}, explanation similarity "
                      f"{entry['eval_explanation_similarity']:.3f})")
        results.append((f"after epoch {entry['epoch']} ({entry['step']} steps)", value))
    training = optimization_rows(options, recipe.schedule, len(data.train), num_processes, mixed_precision,
                                 recipe.learning_rate, recipe.weight_decay, recipe.lr_scheduler_type,
                                 recipe.num_warmup_steps)
    training.insert(5, ("adaptive gradient clipping", f"{recipe.agc_clip_factor:g}" if recipe.agc_clip_factor > 0 else "off"))
    if options.teacher:
        training.append(("distillation", f"e²KD from `{options.teacher}`: KD at temperature "
                                         f"{options.distillation_temperature:g} + {options.explanation_distillation_weight:g}"
                                         " × (1 − cosine) of the explanations of the teacher's top-1 class"))
    if options.guidance_loss:
        training.append(("model guidance", f"{options.guidance_loss} loss × {options.guidance_weight:g} on the boxes "
                                           f"(`{options.box_column}`) of {metrics['guidance_annotated_images']:,} training images"))
    base_model = None
    if prepared.origin != "scratch" and not prepared.source.startswith(DEFAULT_MODEL_PREFIX):
        base_model = prepared.source
    labels = ", ".join(f"{i}: {name}" for i, name in list(enumerate(data.labels))[:50])
    if len(data.labels) > 50:
        labels += f", … ({len(data.labels)} classes)"
    return {
        "hub_metadata": hub_metadata(options, base_model),
        "model_name": options.hub_model_id or os.path.basename(os.path.abspath(options.output_dir)),
        "architecture": f"{type(model).__name__}, {_backbone_name(backbone)} backbone, {params / 1e6:.2f}M parameters",
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
    accelerator = create_accelerator(options)
    try:
        with output_dir_lock(options, accelerator):
            return _run(options, accelerator)
    finally:
        accelerator.end_training()


def _run(options: FinetuneOptions, accelerator: Accelerator) -> dict:
    log = accelerator.print
    set_seed(options.seed)
    # A default model is trained on first use: that work waits until the data has been checked.
    trained_on_first_use = options.from_scratch is None and (options.model or DEFAULT_MODEL).startswith(DEFAULT_MODEL_PREFIX)
    starting = None if trained_on_first_use else load_starting_model(options, accelerator)
    data = load_run_data(options, box_column=options.box_column)
    annotated = guided_rows(options, data)
    # Each process holds its own frozen teacher on its device; it is never prepared (no DDP).
    teacher = Teacher(options.teacher, accelerator.device) if options.teacher else None
    if trained_on_first_use:
        starting = load_starting_model(options, accelerator)
    prepared = prepare_model(options, data, starting)
    model = prepared.model
    collator = ImageProcessorCollator(image_processor_from_dict(model.config.image_processor))
    if teacher is not None:
        first_images = collator([ImageClassificationDataset(data.train.select(range(1)), data.image_column,
                                                            data.label_column)[0]])["pixel_values"]
        teacher.check_compatible(data.labels, first_images.to(accelerator.device))
    loaders = build_loaders(options, data, collator, annotated)
    schedule = resolve_schedule(options, len(loaders.train_dataset), accelerator.num_processes)
    recipe = resolve_recipe(options, prepared, (options.dataset or DEFAULT_DATASET).startswith(EMBEDDED_PREFIX),
                            schedule)
    check_agc_supported(accelerator, recipe.agc_clip_factor)
    optimizer = create_optimizer(model, recipe.learning_rate, recipe.weight_decay)
    lr_scheduler = create_scheduler(optimizer, recipe.lr_scheduler_type, recipe.num_warmup_steps,
                                    schedule.max_train_steps, accelerator.num_processes)
    checkpoints = CheckpointManager(options.output_dir, options.keep_last_checkpoints)
    resume_dir = prepare_output_dir(options, accelerator, checkpoints)

    log(f"Data: {data.source}: {len(data.train):,} training / {len(data.eval):,} evaluation images, "
        f"{len(data.labels)} classes. Model: {prepared.origin} from {prepared.source} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {accelerator.num_processes} process(es).")
    log(f"Recipe ({recipe.source}): lr {recipe.learning_rate:g}, weight decay {recipe.weight_decay:g}, "
        f"{recipe.lr_scheduler_type} with {recipe.num_warmup_steps} warm-up steps, AGC {recipe.agc_clip_factor:g}, "
        f"{schedule.num_train_epochs} epoch(s) = {schedule.max_train_steps} steps.")
    if options.guidance_loss:
        log(f"Model guidance: {options.guidance_loss} loss, weight {options.guidance_weight:g}, boxes of "
            f"{len(annotated):,} training images ({options.box_column!r}).")
    if teacher is not None:
        log(f"e²KD from {options.teacher}: temperature {options.distillation_temperature:g}, "
            f"explanation weight {options.explanation_distillation_weight:g}.")
    explained_model = model  # the B-cos classifier itself, which the guidance and e²KD losses explain

    if model.config.backbone_family != PLAIN_MODULE_FAMILY:
        # The source architecture may hold parameters its classifier never uses (DINOv2's and
        # BEiT's mask token, for masked image modelling), which DDP refuses unless it looks for
        # them each step; transformers' Trainer looks for them by default too.
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    model, optimizer, loaders.train, loaders.eval, lr_scheduler = accelerator.prepare(
        model, optimizer, loaders.train, loaders.eval, lr_scheduler
    )
    if options.with_tracking:
        tracked = {k: v for k, v in recordable(options).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("bcos_finetune", {**tracked, **{f"recipe_{k}": v for k, v in asdict(recipe).items()
                                                                  if isinstance(v, (int, float, str))}})

    if data.skipped_images:
        log(f"Left out {len(data.skipped_images)} unreadable image(s) (--skip_unreadable_images), e.g. "
            f"{data.skipped_images[0][1]}: {data.skipped_images[0][2]}.")
    if resume_dir is not None:
        incomplete = load_training_state(accelerator, resume_dir)
        position = read_position(resume_dir)
        if incomplete:
            position.metrics.setdefault("resumed_without", []).extend(incomplete)
        log(f"Resumed from {resume_dir} (step {position.completed_steps}, epoch {position.epoch + 1}).")
    else:
        position = TrainingPosition()
        if recipe.bn_reestimation_images > 0:
            before = evaluate_accuracy(accelerator, model, loaders.eval).accuracy
            loader = _bn_reestimation_loader(data, collator, options, accelerator, recipe.bn_reestimation_images)
            used = reestimate_batchnorm_statistics(
                accelerator.unwrap_model(model), (_to_device(b, accelerator.device) for b in loader)
            )
            after = evaluate_accuracy(accelerator, model, loaders.eval).accuracy
            position.metrics.update(accuracy_before_bn_reestimation=before, accuracy_after_bn_reestimation=after,
                                    bn_reestimation_images=used)
            log(f"BatchNorm re-estimation on {used} training images (no gradient step): accuracy "
                f"{percent(before)} -> {percent(after)}.")
            if options.with_tracking:
                accelerator.log({"eval/accuracy_before_bn_reestimation": before,
                                 "eval/accuracy_after_bn_reestimation": after}, step=0)

    def evaluate(epoch: int, completed_steps: int) -> dict:
        result = evaluate_accuracy(accelerator, model, loaders.eval)
        measured = {"eval_accuracy": result.accuracy, "eval_examples": result.num_examples}
        epg = eval_loader_energy_pointing_game(accelerator, model, loaders.eval) if data.box_column else None
        if epg is not None:
            measured["eval_energy_pointing_game"] = epg
        if teacher is not None:
            measured.update(eval_loader_distillation(accelerator, model, teacher, loaders.eval))
        log(f"epoch {epoch}: top-1 accuracy {percent(result.accuracy)} on {result.num_examples:,} images"
            + (f", energy pointing game {epg:.3f}" if epg is not None else "")
            + (f", agreement with the teacher {percent(measured['eval_teacher_agreement'])}, explanation similarity "
               f"{measured['eval_explanation_similarity']:.3f}" if teacher is not None else "")
            + f" (step {completed_steps}).")
        return measured

    def compute_loss(model, batch: dict) -> torch.Tensor:
        if teacher is None:
            loss = classification_loss(model, batch)
        else:
            with accelerator.autocast():
                loss = e2kd_loss(model(pixel_values=batch["pixel_values"]).logits, explained_model, teacher,
                                 batch["pixel_values"], options.distillation_temperature,
                                 options.explanation_distillation_weight)
        if options.guidance_loss and options.guidance_weight > 0 and batch["annotated"].any():
            annotated = batch["annotated"]
            with accelerator.autocast():
                guidance = guidance_loss(options.guidance_loss, explained_model, batch["pixel_values"][annotated],
                                         batch["labels"][annotated], batch["guidance_masks"][annotated])
            loss = loss + options.guidance_weight * guidance
        return loss

    position, completed_steps = train_epochs(
        accelerator, options, model=model, loaders=loaders, schedule=schedule, position=position,
        checkpoints=checkpoints, lr_scheduler=lr_scheduler,
        train_step=lambda batch: training_step(accelerator, model, batch, optimizer, lr_scheduler, recipe.agc_clip_factor,
                                               compute_loss),
        evaluate=evaluate, description="fine-tuning",
    )

    metrics = dict(position.metrics)
    if metrics["epochs"]:
        for key in ("eval_accuracy", "eval_examples", "eval_energy_pointing_game", "eval_teacher_agreement",
                    "eval_explanation_similarity"):
            if key in metrics["epochs"][-1]:
                metrics[key] = metrics["epochs"][-1][key]
    if options.guidance_loss:
        metrics["guidance_annotated_images"] = len(annotated)
    metrics.update(train_steps=completed_steps, num_processes=accelerator.num_processes)
    save_and_publish(
        options, accelerator, accelerator.unwrap_model(model), accelerator.get_state_dict(model),
        card=lambda: fill_template(model_card_values(options, prepared, data, recipe, metrics, accelerator.num_processes,
                                                     accelerator.mixed_precision), options.model_card_template),
        metrics=metrics, commit_message="B-cos fine-tuning with transformers-bcos",
    )
    return metrics
