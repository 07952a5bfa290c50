"""Explanation-enhanced knowledge distillation (e²KD, Parchami-Araghi et al., "Good Teachers
Explain: Explanation-Enhanced Knowledge Distillation", CVPR 2024): the student matches the
teacher's logits (Hinton's KD) and, for the teacher's top-1 class, the teacher's explanation.

loss = T² · KL(softmax(t/T) ‖ softmax(s/T)) + λ · mean over images of (1 − cos(E_s, E_t)),

t, s: the teacher's and the student's logits; E_t, E_s: their explanations of the teacher's
top-1 class, flattened. The student's explanation is `explain(..., create_graph=True)`, so the
cosine term has a gradient to the student's parameters; the teacher's is detached.

A teacher is a B-cos checkpoint (explained by its own `explain`) or a standard transformers image
classifier, explained post hoc by input × gradient summed over the channels, on the teacher's own
input: the batch's pixel values are in [0, 1] (the B-cos student's input), and the standard
teacher gets them normalised with the `image_mean`/`image_std` of its saved image processor.
Teacher maps of another spatial size than the student's are resized bilinearly.
"""

import json
import os

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModelForImageClassification

from ..configuration_bcos import BcosConfig
from ..modeling_bcos import BcosForImageClassification
from .run import OptionsError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), the batch mean (Hinton et al.)."""
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    return temperature**2 * kl.mean()


def explanation_similarity(student_contributions: torch.Tensor, teacher_contributions: torch.Tensor) -> torch.Tensor:
    """(N,) cosine similarity of each image's two maps, flattened; a teacher map of another spatial
    size is first resized bilinearly to the student's."""
    if teacher_contributions.shape[-2:] != student_contributions.shape[-2:]:
        teacher_contributions = F.interpolate(teacher_contributions[:, None].float(), size=student_contributions.shape[-2:],
                                              mode="bilinear", align_corners=False)[:, 0]
    return F.cosine_similarity(student_contributions.flatten(1), teacher_contributions.flatten(1).to(student_contributions), dim=1)


def explanation_similarity_loss(student_contributions: torch.Tensor, teacher_contributions: torch.Tensor) -> torch.Tensor:
    """Mean over images of 1 − the cosine similarity of the maps (0 identical, 2 opposite)."""
    return (1 - explanation_similarity(student_contributions, teacher_contributions)).mean()


def _first_names(names: list, limit: int = 5) -> str:
    return f"{len(names)}: " + ", ".join(map(str, names[:limit])) + (", ..." if len(names) > limit else "")


class Teacher:
    """A frozen teacher in eval mode: its logits and its explanation of a class, both detached."""

    def __init__(self, path: str, device: torch.device = torch.device("cpu")):
        if not os.path.isdir(path):
            raise OptionsError(f"--teacher {path} is not a folder.")
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as error:
            raise OptionsError(f"--teacher {path}: cannot read its config.json: {error}") from None
        self.is_bcos = model_type == BcosConfig.model_type
        try:
            if self.is_bcos:
                self.model = BcosForImageClassification.from_pretrained(path)
                self.mean = self.std = None
            else:
                self.model = AutoModelForImageClassification.from_pretrained(path)
                processor = AutoImageProcessor.from_pretrained(path)
                self.mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                self.std = torch.tensor(processor.image_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        except (OSError, ValueError, AttributeError) as error:
            # AttributeError: a processor without image_mean/image_std (no normalisation to apply).
            raise OptionsError(f"--teacher {path} does not load as an image classifier of model type "
                               f"{model_type!r} with its image processor: {error}") from None
        self.path = path
        self.model.to(device).eval().requires_grad_(False)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def check_compatible(self, labels: list, pixel_values: torch.Tensor) -> None:
        """An OptionsError unless the teacher has the data's ``labels`` (same names, same order) and
        takes the student's input (``pixel_values``, a batch of it)."""
        if self.labels != list(labels):
            raise OptionsError(f"--teacher {self.path} has other labels ({_first_names(self.labels)}) than the data "
                               f"({_first_names(list(labels))}); a teacher must have the data's classes in its order.")
        try:
            self.logits(pixel_values)
        except (RuntimeError, ValueError) as error:
            raise OptionsError(f"--teacher {self.path} cannot take the student's input of size "
                               f"{tuple(pixel_values.shape[-3:])}: {str(error).splitlines()[0]}") from None

    def _input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values if self.mean is None else (pixel_values - self.mean) / self.std

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self._input(pixel_values)).logits

    def explain(self, pixel_values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, H, W) contributions to `target`, detached."""
        if self.is_bcos:
            return self.model.explain(pixel_values=pixel_values, target=target).contributions.detach()
        inputs = self._input(pixel_values).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(pixel_values=inputs).logits
            (gradient,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), inputs)
        return (inputs * gradient).sum(1).detach()


def e2kd_loss(student_logits: torch.Tensor, student, teacher: Teacher, pixel_values: torch.Tensor, temperature: float,
              explanation_weight: float) -> torch.Tensor:
    """KD + λ·(1 − cos) on the teacher's top-1 class. ``student_logits`` come from the caller's
    forward (the prepared model, whose gradients distributed training synchronises); ``student``
    is the B-cos classifier that explains."""
    teacher_logits = teacher.logits(pixel_values)
    loss = kd_loss(student_logits, teacher_logits, temperature)
    if explanation_weight > 0:
        target = teacher_logits.argmax(-1)
        student_map = student.explain(pixel_values=pixel_values, target=target, create_graph=True).contributions
        loss = loss + explanation_weight * explanation_similarity_loss(student_map, teacher.explain(pixel_values, target))
    return loss


@torch.no_grad()
def eval_loader_distillation(accelerator, model, teacher: Teacher, dataloader) -> dict:
    """On the evaluation images (all processes gathered): the student's top-1 agreement with the
    teacher, and the mean cosine similarity of their explanations of the teacher's top-1 class.
    ``model`` is the prepared model; its B-cos classifier is explained."""
    explained = accelerator.unwrap_model(model)
    agreements, similarities = [], []
    for batch in dataloader:
        pixel_values = batch["pixel_values"]
        with accelerator.autocast():
            target = teacher.logits(pixel_values).argmax(-1)
            explanation = explained.explain(pixel_values=pixel_values, target=target)
            similarity = explanation_similarity(explanation.contributions.float(), teacher.explain(pixel_values, target).float())
        agreements.append(accelerator.gather_for_metrics((explanation.logits.argmax(-1) == target).float()))
        similarities.append(accelerator.gather_for_metrics(similarity))
    return {"eval_teacher_agreement": torch.cat(agreements).mean().item(),
            "eval_explanation_similarity": torch.cat(similarities).mean().item()}
