"""Distilling a B-cos CLIP image tower from the original one, end to end with Accelerate.

`run_clip_distillation(ClipDistillationOptions(...))` does what ``examples/bcosify_clip.py``
exposes on the command line: a standard CLIP -> `bcosify_clip` (the student; text tower frozen)
and the original image tower (the frozen teacher) -> distillation on images alone with the
SigLIP-style loss -> zero-shot accuracy of student and teacher on the labelled evaluation set
before training and after each epoch -> a Hub-ready folder (code, config, safetensors, image
processor, tokenizer, README.md). Checkpoints, resuming, progress and export are those of
`run_finetuning` (`transformers_bcos.training.run`).
"""

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import AutoConfig

from ..configuration_bcos_clip import SUPPORTED_CLIP_TYPES, BcosCLIPConfig
from ..conversion.clip import CLIPImageTeacher, ImageTowerDistillation, distillation_pair
from ..data import ImageProcessorCollator, image_processor_from_dict
from ..model_card import TEMPLATES, fill_template, markdown_rows
from ..modeling_bcos_clip import DEFAULT_PROMPT_TEMPLATES, BcosCLIPModel
from .checkpointing import CheckpointManager, TrainingPosition, read_position
from .loop import training_step
from .recipe import CLIP_DISTILLATION_RECIPE, create_optimizer, create_scheduler
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

CLIP_CARD_TEMPLATE = TEMPLATES[BcosCLIPConfig.model_type]
STUDENT_PREFIX = "student."
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


@dataclass
class ClipDistillationOptions(RunOptions):
    """The options of `run_clip_distillation` (the command-line flags of examples/bcosify_clip.py).

    None for a recipe value means `CLIP_DISTILLATION_RECIPE`'s (AdamW lr 1e-4, no weight decay,
    cosine, no warm-up).
    """

    model: Optional[str] = None
    output_dir: str = "outputs/bcos-clip"
    b: float = 2.0
    prompt_templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES
    loss_scale: float = 10.0
    loss_bias: float = -10.0


def validate_options(options: ClipDistillationOptions) -> None:
    """Check everything that needs no data or weights: the source's config, templates, numbers, folder."""
    if options.model is None:
        raise OptionsError("--model is required: the standard CLIP to B-cosify (a Hub id or a local folder).")
    check_positive("b", options.b)
    check_positive("loss_scale", options.loss_scale)
    if not math.isfinite(options.loss_bias):
        raise OptionsError(f"--loss_bias must be a finite number, got {options.loss_bias}.")
    templates = options.prompt_templates
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise OptionsError(f'--prompt_templates must be one or more templates with a "{{}}" for the class name, got {templates!r}.')
    validate_run_options(options, CLIP_CARD_TEMPLATE)
    try:
        model_type = AutoConfig.from_pretrained(options.model).model_type
    except (OSError, ValueError) as error:
        raise OptionsError(f"Cannot load the model config of {options.model!r}: {str(error).splitlines()[0]}") from error
    if model_type == BcosCLIPConfig.model_type:
        raise OptionsError(
            f"{options.model} is already a B-cos CLIP; distillation starts from the standard CLIP it came from "
            "(continue a run with --resume_from_checkpoint)."
        )
    if model_type not in SUPPORTED_CLIP_TYPES:
        raise OptionsError(
            f"{options.model} holds a {model_type!r} model; bcosify_clip.py needs a CLIP model (model_type "
            f"{', '.join(SUPPORTED_CLIP_TYPES)}). Image classifiers are B-cosified by finetune.py."
        )


@torch.no_grad()
def evaluate_zero_shot(accelerator: Accelerator, student: BcosCLIPModel, teacher: CLIPImageTeacher,
                       class_embeds: torch.Tensor, dataloader) -> dict:
    """Zero-shot top-1 accuracy of student and teacher, and their mean image-embedding cosine.

    ``class_embeds`` (C, D) are the unit class embeddings of the (shared, unchanged) text tower;
    the results cover the whole evaluation set, gathered from all processes.
    """
    student.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    count = 0
    for batch in dataloader:
        with accelerator.autocast():
            student_embeds = student.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            teacher_embeds = teacher(batch["pixel_values"])
        student_embeds = F.normalize(student_embeds.float(), dim=-1)
        teacher_embeds = F.normalize(teacher_embeds.float(), dim=-1)
        classes = class_embeds.float().t()
        student_correct = (student_embeds @ classes).argmax(dim=1) == batch["labels"]
        teacher_correct = (teacher_embeds @ classes).argmax(dim=1) == batch["labels"]
        cosine = (student_embeds * teacher_embeds).sum(dim=1)
        student_correct, teacher_correct, cosine = accelerator.gather_for_metrics(
            (student_correct, teacher_correct, cosine)
        )
        totals += torch.stack([student_correct.sum(), teacher_correct.sum(), cosine.sum()]).double()
        count += cosine.numel()
    student_accuracy, teacher_accuracy, cosine = (totals / max(count, 1)).tolist()
    return {"student_zero_shot_accuracy": student_accuracy, "teacher_zero_shot_accuracy": teacher_accuracy,
            "student_teacher_cosine": cosine, "eval_examples": count}


def _describe(measured: dict) -> str:
    return (f"zero-shot accuracy student {percent(measured['student_zero_shot_accuracy'])}, teacher "
            f"{percent(measured['teacher_zero_shot_accuracy'])}; student-teacher cosine "
            f"{measured['student_teacher_cosine']:.4f} on {measured['eval_examples']:,} images")


def model_card_values(options: ClipDistillationOptions, student: BcosCLIPModel, data, schedule: Schedule,
                      learning_rate: float, weight_decay: float, lr_scheduler_type: str, num_warmup_steps: int,
                      metrics: dict, num_processes: int, mixed_precision: str) -> dict:
    params = sum(p.numel() for p in student.parameters())
    before = metrics["before_training"]
    results = [
        ("original CLIP (the teacher)", percent(before["teacher_zero_shot_accuracy"])),
        ("B-cosified, before distillation", percent(before["student_zero_shot_accuracy"])),
    ]
    for entry in metrics["epochs"]:
        results.append((f"after epoch {entry['epoch']} ({entry['step']} steps; student-teacher cosine "
                        f"{entry['student_teacher_cosine']:.3f})", percent(entry["student_zero_shot_accuracy"])))
    training = optimization_rows(options, schedule, len(data.train), num_processes, mixed_precision, learning_rate,
                                 weight_decay, lr_scheduler_type, num_warmup_steps)
    sign = "−" if options.loss_bias < 0 else "+"
    training.insert(0, ("loss", f"SigLIP-style distillation, logits = {options.loss_scale:g}·cos {sign} "
                                f"{abs(options.loss_bias):g}; images only"))
    templates = ", ".join(f"“{t}”" for t in options.prompt_templates)
    return {
        "hub_metadata": hub_metadata(options, options.model),
        "model_name": options.hub_model_id or os.path.basename(os.path.abspath(options.output_dir)),
        "architecture": f"{type(student).__name__}, {params / 1e6:.2f}M parameters",
        "b": f"{student.config.b:g}",
        "origin": (f"It was B-cosified from `{options.model}`, and its image tower was distilled from the original "
                   "one on images alone."),
        "eval_description": f"{len(data.eval):,} images of {data.source}, prompts {templates}",
        "results_rows": markdown_rows(results),
        "training_rows": markdown_rows(training),
        "recipe_source": CLIP_DISTILLATION_RECIPE.source,
        "repo_id": options.hub_model_id or os.path.abspath(options.output_dir),
    }


def run_clip_distillation(options: ClipDistillationOptions) -> dict:
    """Distil a B-cos CLIP image tower as described by ``options``; returns the final metrics.

    Call under ``accelerate launch`` for several processes; a plain call runs one process.
    """
    validate_options(options)
    accelerator = create_accelerator(options)
    try:
        with output_dir_lock(options, accelerator):
            return _run(options, accelerator)
    finally:
        accelerator.end_training()


def _run(options: ClipDistillationOptions, accelerator: Accelerator) -> dict:
    if accelerator.distributed_type in SHARDED:
        # The zero-shot evaluation and the export read the student outside its wrapper, which
        # sharding hides; data-parallel runs (DDP, one or many nodes) are supported.
        raise OptionsError(f"bcosify_clip.py runs data-parallel (DDP); {accelerator.distributed_type.value} is not supported.")
    log = accelerator.print
    set_seed(options.seed)
    data = load_run_data(options)
    student, teacher = distillation_pair(options.model, b=options.b)
    if student.tokenizer is None:
        raise OptionsError(f"{options.model} has no tokenizer: the zero-shot evaluation needs one to embed the prompts.")
    distiller = ImageTowerDistillation(student, options.loss_scale, options.loss_bias)
    collator = ImageProcessorCollator(image_processor_from_dict(student.config.image_processor))
    loaders = build_loaders(options, data, collator)
    schedule = resolve_schedule(options, len(loaders.train_dataset), accelerator.num_processes)
    defaults = CLIP_DISTILLATION_RECIPE
    learning_rate = options.learning_rate if options.learning_rate is not None else defaults.learning_rate
    weight_decay = options.weight_decay if options.weight_decay is not None else defaults.weight_decay
    lr_scheduler_type = options.lr_scheduler_type or defaults.lr_scheduler_type
    num_warmup_steps = options.num_warmup_steps
    if num_warmup_steps is None:
        num_warmup_steps = defaults.warmup_steps(schedule.max_train_steps)
    optimizer = create_optimizer(distiller, learning_rate, weight_decay)
    lr_scheduler = create_scheduler(optimizer, lr_scheduler_type, num_warmup_steps, schedule.max_train_steps,
                                    accelerator.num_processes)
    checkpoints = CheckpointManager(options.output_dir, options.keep_last_checkpoints)
    resume_dir = prepare_output_dir(options, accelerator, checkpoints)

    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log(f"Data: {data.source}: {len(data.train):,} training / {len(data.eval):,} evaluation images, "
        f"{len(data.labels)} classes. Student: B-cos CLIP from {options.model} ({trainable / 1e6:.2f}M trainable "
        f"parameters, text tower frozen), {accelerator.num_processes} process(es).")
    log(f"Recipe ({defaults.source}): lr {learning_rate:g}, weight decay {weight_decay:g}, {lr_scheduler_type} with "
        f"{num_warmup_steps} warm-up steps, {schedule.num_train_epochs} epoch(s) = {schedule.max_train_steps} steps.")

    distiller, optimizer, loaders.train, loaders.eval, lr_scheduler = accelerator.prepare(
        distiller, optimizer, loaders.train, loaders.eval, lr_scheduler
    )
    teacher.to(accelerator.device)
    # The text tower is the same in student and teacher: one set of class embeddings serves both.
    class_embeds = student.class_text_embeddings(data.labels, list(options.prompt_templates))
    if options.with_tracking:
        tracked = {k: v for k, v in recordable(options).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("bcos_clip_distillation", tracked)

    def evaluate(epoch: int, completed_steps: int) -> dict:
        measured = evaluate_zero_shot(accelerator, student, teacher, class_embeds, loaders.eval)
        log(f"epoch {epoch}: {_describe(measured)} (step {completed_steps}).")
        return measured

    if resume_dir is not None:
        incomplete = load_training_state(accelerator, resume_dir)
        position = read_position(resume_dir)
        if incomplete:
            position.metrics.setdefault("resumed_without", []).extend(incomplete)
        log(f"Resumed from {resume_dir} (step {position.completed_steps}, epoch {position.epoch + 1}).")
    else:
        position = TrainingPosition()
        position.metrics["before_training"] = evaluate_zero_shot(accelerator, student, teacher, class_embeds,
                                                                 loaders.eval)
        log(f"Before distillation: {_describe(position.metrics['before_training'])}.")

    def distillation_loss(model, batch: dict) -> torch.Tensor:
        pixel_values = batch["pixel_values"]
        with accelerator.autocast():
            teacher_embeds = teacher(pixel_values)
        return model(pixel_values, teacher_embeds)

    position, completed_steps = train_epochs(
        accelerator, options, model=distiller, loaders=loaders, schedule=schedule, position=position,
        checkpoints=checkpoints, lr_scheduler=lr_scheduler,
        train_step=lambda batch: training_step(accelerator, distiller, batch, optimizer, lr_scheduler,
                                               agc_clip_factor=0.0, compute_loss=distillation_loss),
        evaluate=evaluate, description="distillation",
    )

    metrics = dict(position.metrics)
    if metrics["epochs"]:
        metrics.update({key: metrics["epochs"][-1][key] for key in
                        ("student_zero_shot_accuracy", "teacher_zero_shot_accuracy", "student_teacher_cosine")})
    metrics.update(train_steps=completed_steps, num_processes=accelerator.num_processes,
                   prompt_templates=list(options.prompt_templates))
    state_dict = {key[len(STUDENT_PREFIX):]: value for key, value in accelerator.get_state_dict(distiller).items()}
    save_and_publish(
        options, accelerator, student, state_dict,
        card=lambda: fill_template(
            model_card_values(options, student, data, schedule, learning_rate, weight_decay, lr_scheduler_type,
                              num_warmup_steps, metrics, accelerator.num_processes, accelerator.mixed_precision),
            options.model_card_template or CLIP_CARD_TEMPLATE),
        metrics=metrics, commit_message="B-cos CLIP distillation with transformers-bcos",
    )
    return metrics
