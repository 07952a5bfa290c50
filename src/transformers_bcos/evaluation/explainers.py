"""Explainers: one interface for B-cos explanations and post-hoc attribution methods.

An `Explainer` turns a batch of RGB images in [0, 1] and one target class per image into
attribution maps (N, H, W) (summed over input channels), so that every metric in this package
scores B-cos models and standard models explained post hoc with the same code:

* `BcosExplainer`: the exact contributions of a B-cos model (``model.explain``);
* `InputXGradientExplainer`, `IntegratedGradientsExplainer`, `GradCAMExplainer`: post-hoc methods
  for any transformers image classifier (own implementations; no Captum needed);
* `SlidingWindowExplainer`: explains images larger than a fixed-size ViT accepts, window by window.

All work on batches, on the model's device, and leave no gradient on the model.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .classifier import PixelClassifier


@dataclass
class Attribution:
    """Attribution maps for a batch and what they claim to explain.

    Attributes:
        maps: (N, H, W) attribution per pixel, summed over the input channels.
        explained_output: (N,) the scalar that a *complete* method's maps sum to (for B-cos: the
            target logit without the fixed logit bias; for Integrated Gradients: f(x) - f(baseline);
            for input×gradient: the target logit, which its maps match only for bias-free
            piecewise-linear models), or None for methods that make no such claim (Grad-CAM).
    """

    maps: torch.Tensor
    explained_output: Optional[torch.Tensor] = None


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Explainer:
    """Base class: ``explain(pixel_values (N, 3, H, W) in [0, 1], targets (N,)) -> Attribution``."""

    name = "explainer"

    def __init__(self, classifier: PixelClassifier):
        if not isinstance(classifier, PixelClassifier):
            raise TypeError(f"Explainers take a PixelClassifier (PixelClassifier.wrap(model, image_processor)), got {type(classifier).__name__}.")
        self.classifier = classifier

    @property
    def fixed_input_size(self) -> Optional[tuple]:
        return self.classifier.fixed_input_size

    def explain(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> Attribution:
        x = self.classifier.prepare(pixel_values)
        targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1).to(x.device)
        if targets.shape[0] != x.shape[0]:
            raise ValueError(f"Got {targets.shape[0]} targets for {x.shape[0]} images.")
        with _eval_mode(self.classifier.model):
            return self._explain(x, targets)

    __call__ = explain

    def _explain(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> Attribution:
        raise NotImplementedError


class BcosExplainer(Explainer):
    """The exact contributions of a B-cos model: W(x) ⊙ x summed over its 6 input channels."""

    name = "bcos"

    def __init__(self, classifier: PixelClassifier):
        super().__init__(classifier)
        if not classifier.is_bcos:
            raise TypeError(f"BcosExplainer needs a B-cos model, got {type(classifier.model).__name__}; use a post-hoc explainer.")

    def _explain(self, pixel_values, targets):
        explanation = self.classifier.model.explain(pixel_values, target=targets)
        return Attribution(explanation.contributions.detach(), explanation.explained_output.detach())


def _target_logits(classifier: PixelClassifier, pixel_values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = classifier(pixel_values).logits
    return logits.gather(1, targets[:, None]).squeeze(1)


def _input_gradients(classifier: PixelClassifier, pixel_values: torch.Tensor, targets: torch.Tensor) -> tuple:
    """(d target logit / d pixels, target logits), without touching parameter gradients."""
    with torch.enable_grad():
        x = pixel_values.detach().requires_grad_(True)
        selected = _target_logits(classifier, x, targets)
        (gradients,) = torch.autograd.grad(selected.sum(), x)
    return gradients, selected.detach()


class InputXGradientExplainer(Explainer):
    """Input × gradient of the target logit with respect to the [0, 1] pixels."""

    name = "input_x_gradient"

    def _explain(self, pixel_values, targets):
        gradients, selected = _input_gradients(self.classifier, pixel_values, targets)
        return Attribution((pixel_values * gradients).sum(1), selected)


class IntegratedGradientsExplainer(Explainer):
    """Integrated Gradients (Sundararajan et al., 2017) along the straight path from a baseline.

    The path integral is the midpoint Riemann sum over ``steps`` points. Path points of all images
    are batched together, at most ``internal_batch_size`` images per forward/backward pass, which
    bounds memory (IG costs ``steps`` forward+backward passes per image).

    Args:
        steps: number of integration points; more steps, smaller completeness error.
        baseline: the reference input: a constant pixel value (default 0, a black image) or a
            tensor broadcastable to the input.
        internal_batch_size: the most images (path points) per pass.
    """

    name = "integrated_gradients"

    def __init__(self, classifier, steps: int = 50, baseline: Union[float, torch.Tensor] = 0.0, internal_batch_size: int = 256):
        super().__init__(classifier)
        if steps < 1 or internal_batch_size < 1:
            raise ValueError("steps and internal_batch_size must be >= 1.")
        self.steps, self.baseline, self.internal_batch_size = steps, baseline, internal_batch_size

    def _explain(self, pixel_values, targets):
        n = pixel_values.shape[0]
        baseline = torch.as_tensor(self.baseline, dtype=pixel_values.dtype, device=pixel_values.device)
        baseline = baseline.expand_as(pixel_values)
        delta = pixel_values - baseline
        alphas = (torch.arange(self.steps, dtype=pixel_values.dtype, device=pixel_values.device) + 0.5) / self.steps
        steps_per_pass = max(1, self.internal_batch_size // n)
        gradient_sum = torch.zeros_like(pixel_values)
        for chunk in alphas.split(steps_per_pass):
            # (k, N, 3, H, W) path points flattened into one batch of k·N images
            points = baseline.unsqueeze(0) + chunk.view(-1, 1, 1, 1, 1) * delta.unsqueeze(0)
            gradients, _ = _input_gradients(self.classifier, points.flatten(0, 1), targets.repeat(len(chunk)))
            gradient_sum += gradients.view(len(chunk), *pixel_values.shape).sum(0)
        with torch.no_grad():
            endpoints = _target_logits(self.classifier, torch.cat([pixel_values, baseline]), targets.repeat(2))
        maps = (delta * gradient_sum / self.steps).sum(1)
        return Attribution(maps, endpoints[:n] - endpoints[n:])


class GradCAMExplainer(Explainer):
    """Grad-CAM (Selvaraju et al., 2017) on the last feature map, upsampled bilinearly to the input.

    CNNs: the output of the last stage, (N, C, h, w). ViT-family models: the patch tokens entering
    the last encoder layer, laid out on the patch grid. After the last layer the patch tokens no
    longer reach the class token, so their gradient would be zero. Both come from the model's
    ``output_hidden_states``, so no module names are needed.
    """

    name = "grad_cam"

    def _explain(self, pixel_values, targets):
        height, width = pixel_values.shape[-2:]
        patch_size = self.classifier.patch_size
        with torch.enable_grad():
            # The input needs a gradient so the graph exists even when the weights are frozen.
            x = pixel_values.detach().requires_grad_(True)
            output = self.classifier(x, output_hidden_states=True)
            features = output.hidden_states[-1] if patch_size is None else output.hidden_states[-2]
            selected = output.logits.gather(1, targets[:, None]).squeeze(1)
            (gradients,) = torch.autograd.grad(selected.sum(), features)
        features, gradients = features.detach(), gradients.detach()
        if patch_size is not None:
            grid = (height // patch_size[0], width // patch_size[1])
            features, gradients = (self._token_map(t, grid) for t in (features, gradients))
        if features.dim() != 4:
            raise ValueError(f"Grad-CAM needs a (N, C, h, w) feature map; the model's last hidden state has shape {tuple(features.shape)}.")
        channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((channel_weights * features).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
        return Attribution(cam[:, 0], None)

    @staticmethod
    def _token_map(tokens: torch.Tensor, grid: tuple) -> torch.Tensor:
        """(N, prefix + h·w, C) tokens -> (N, C, h, w) map of the patch tokens."""
        num_patches = grid[0] * grid[1]
        patches = tokens[:, tokens.shape[1] - num_patches :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class SlidingWindowExplainer(Explainer):
    """Explain images larger than a fixed-size model: a window of the model's size slides with
    ``stride`` (default: half the window), each window is explained for the target, and the maps
    are summed back into place. Images of exactly the window size are explained directly.

    ``explained_output`` is the sum of the windows' explained outputs, which the summed maps
    match whenever the inner method is complete.
    """

    def __init__(self, explainer: Explainer, window: Optional[tuple] = None, stride: Optional[tuple] = None):
        super().__init__(explainer.classifier)
        self.explainer = explainer
        self.name = explainer.name
        window = window or explainer.fixed_input_size
        if window is None:
            raise ValueError("The model takes any input size; pass window=(height, width) to slide a window anyway.")
        self.window = tuple(window)
        self.stride = tuple(stride) if stride is not None else (max(1, self.window[0] // 2), max(1, self.window[1] // 2))

    @property
    def fixed_input_size(self):
        return None  # any image at least as large as the window

    @staticmethod
    def _offsets(size: int, window: int, stride: int) -> list:
        offsets = list(range(0, size - window + 1, stride))
        if offsets[-1] != size - window:  # cover the far border too
            offsets.append(size - window)
        return offsets

    def explain(self, pixel_values, targets):
        height, width = pixel_values.shape[-2:]
        if (height, width) == self.window:
            return self.explainer.explain(pixel_values, targets)
        if height < self.window[0] or width < self.window[1]:
            raise ValueError(f"Images of size {(height, width)} are smaller than the window {self.window}.")
        maps, explained_output = None, None
        for top in self._offsets(height, self.window[0], self.stride[0]):
            for left in self._offsets(width, self.window[1], self.stride[1]):
                crop = pixel_values[..., top : top + self.window[0], left : left + self.window[1]]
                attribution = self.explainer.explain(crop, targets)
                if maps is None:
                    maps = attribution.maps.new_zeros(attribution.maps.shape[0], height, width)
                    if attribution.explained_output is not None:
                        explained_output = torch.zeros_like(attribution.explained_output)
                maps[:, top : top + self.window[0], left : left + self.window[1]] += attribution.maps
                if explained_output is not None:
                    explained_output += attribution.explained_output
        return Attribution(maps, explained_output)


EXPLAINERS = {
    cls.name: cls for cls in (BcosExplainer, InputXGradientExplainer, IntegratedGradientsExplainer, GradCAMExplainer)
}


def make_explainer(
    model, method: str = "bcos", image_processor=None, sliding_window: bool = True, window: Optional[tuple] = None, **method_kwargs
) -> Explainer:
    """An explainer of ``method`` for ``model`` (a B-cos or standard transformers classifier).

    Args:
        model: the model, or a `PixelClassifier` around it.
        method: one of ``"bcos"``, ``"input_x_gradient"``, ``"integrated_gradients"``, ``"grad_cam"``.
        image_processor: the processor a standard model was trained with (its normalisation is
            applied inside, so attributions are with respect to [0, 1] pixels).
        sliding_window: wrap fixed-size models (ViTs) in a `SlidingWindowExplainer`, so that they
            explain larger images such as GridPG grids.
        window: slide a window of this (height, width) for any model, e.g. a CNN's training size
            when grid cells are so small that the CNN's response depends on where a cell sits
            (stride phase, image borders); None: only fixed-size models slide (their own size).
        method_kwargs: options of the method (``steps=``, ``internal_batch_size=`` for IG).
    """
    if method not in EXPLAINERS:
        raise ValueError(f"Unknown explanation method {method!r}; choose from {sorted(EXPLAINERS)}.")
    explainer = EXPLAINERS[method](PixelClassifier.wrap(model, image_processor), **method_kwargs)
    if window is not None:
        explainer = SlidingWindowExplainer(explainer, window=window)
    elif sliding_window and explainer.fixed_input_size is not None:
        explainer = SlidingWindowExplainer(explainer)
    return explainer


def attribution_maps(attributions) -> torch.Tensor:
    """(N, H, W) maps from (N, H, W) or (N, C, H, W) attributions (summed over channels)."""
    maps = torch.as_tensor(attributions)
    if maps.dim() == 4:
        maps = maps.sum(1)
    if maps.dim() != 3:
        raise ValueError(f"attributions must have shape (N, H, W) or (N, C, H, W), got {tuple(maps.shape)}.")
    return maps
