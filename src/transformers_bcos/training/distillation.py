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

import os

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModelForImageClassification

from ..modeling_bcos import BcosForImageClassification
from .run import OptionsError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), the batch mean (Hinton et al.)."""
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    return temperature**2 * kl.mean()


def explanation_similarity_loss(student_contributions: torch.Tensor, teacher_contributions: torch.Tensor) -> torch.Tensor:
    """Mean over images of 1 − the cosine similarity of the flattened maps (0 identical, 2 opposite)."""
    similarity = F.cosine_similarity(student_contributions.flatten(1), teacher_contributions.flatten(1), dim=1)
    return (1 - similarity).mean()


class Teacher:
    """A frozen teacher in eval mode: its logits and its explanation of a class, both detached."""

    def __init__(self, path: str, device: torch.device = torch.device("cpu")):
        if not os.path.isdir(path):
            raise OptionsError(f"--teacher {path} is not a folder")
        try:
            config_text = open(os.path.join(path, "config.json")).read()
        except OSError as error:
            raise OptionsError(f"--teacher {path}: cannot read its config.json: {error}") from None
        self.is_bcos = '"bcos' in config_text.lower()
        try:
            if self.is_bcos:
                self.model = BcosForImageClassification.from_pretrained(path)
                self.mean = self.std = None
            else:
                self.model = AutoModelForImageClassification.from_pretrained(path)
                processor = AutoImageProcessor.from_pretrained(path)
                self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
                self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        except (OSError, ValueError) as error:
            raise OptionsError(f"--teacher {path} does not load as an image classifier: {error}") from None
        self.model.to(device).eval().requires_grad_(False)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}

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
            selected = logits.gather(1, target.view(-1, 1)).sum()
            (gradient,) = torch.autograd.grad(selected, inputs)
        return (inputs * gradient).sum(1).detach()


def e2kd_loss(student, teacher: Teacher, pixel_values: torch.Tensor, temperature: float, explanation_weight: float):
    """KD + λ·(1 − cos) on the teacher's top-1 class; returns (loss, student logits)."""
    teacher_logits = teacher.logits(pixel_values)
    student_logits = student(pixel_values=pixel_values).logits
    loss = kd_loss(student_logits, teacher_logits, temperature)
    if explanation_weight > 0:
        target = teacher_logits.argmax(-1)
        student_map = student.explain(pixel_values=pixel_values, target=target, create_graph=True).contributions
        teacher_map = teacher.explain(pixel_values, target)
        if teacher_map.shape[-2:] != student_map.shape[-2:]:
            teacher_map = F.interpolate(teacher_map[:, None], size=student_map.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        loss = loss + explanation_weight * explanation_similarity_loss(student_map, teacher_map)
    return loss, student_logits
