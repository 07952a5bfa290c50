"""The "image-explanation" pipeline: predictions of a B-cos image classifier with their explanations.

    from transformers import pipeline
    explain = pipeline("image-explanation", model="<folder or Hub id>", trust_remote_code=True)
    result = explain(image, top_k=5, target=None)

``result`` (one dict per image) holds the top-k ``predictions`` and, for the explained class (the
top prediction, or ``target=``: a class index or label name), the RGBA ``explanation`` image
(PIL, the B-cos reference rendering at the model's input resolution), the per-pixel
``contributions`` and the ``completeness_error`` |Σ contributions − explained output|.

The image loader here, `load_rgb_image` / `to_rgb`, is the one the command line and the training
data use too, so that all three see the same pixels: the EXIF orientation applied, and 16-bit,
32-bit integer and float images scaled to 8 bits instead of clipped (PIL's own ``convert("RGB")``
turns a float image in [0, 1] black and a 16-bit one white).

This file travels with saved checkpoints (``trust_remote_code``; the model's ``config.json``
names it in ``custom_pipelines``): it imports torch, transformers and the standard library at
module level, Pillow and numpy (which transformers' vision pipelines need anyway) inside functions.
"""

import os

import torch
from transformers import Pipeline

from .explanation import Unit

# The entry ``save_pretrained`` writes into ``config.custom_pipelines``, so that
# ``pipeline("image-explanation", model=<folder>, trust_remote_code=True)`` finds this class.
IMAGE_EXPLANATION_TASK = "image-explanation"
CUSTOM_PIPELINES = {
    IMAGE_EXPLANATION_TASK: {
        "impl": "pipeline_bcos.ImageExplanationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "tf": [],
        "type": "image",
    }
}


def to_rgb(image):
    """A PIL image as upright 8-bit RGB, whatever its mode.

    The EXIF orientation is applied. 16-bit images (I;16*, and mode I holding values up to
    65535, as PIL opens 16-bit PNGs) are scaled by 1/256 and wider integer images by their
    type's range; float images (F) in [0, 1] are scaled by 255, others clipped to [0, 255].
    L, LA, 1, P (with or without transparency), RGBA, CMYK: PIL's conversion (alpha dropped).
    """
    import numpy as np
    from PIL import Image, ImageOps

    if min(image.size) == 0:
        raise ValueError(f"The image has no pixels (size {image.size[0]}x{image.size[1]}).")
    if image.getexif().get(Image.ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "F" or image.mode.startswith("I"):
        values = np.asarray(image)
        if image.mode == "F":
            values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        elif image.mode.startswith("I;16") or values.max() <= 65535:
            scale = 1 / 256 if image.mode.startswith("I;16") or values.max() > 255 else 1.0
        else:
            scale = 256 / 2**32  # 32-bit integers: the top byte
        grey = np.clip(np.round(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette image with transparency skips RGBA
    return image.convert("RGB")


def load_rgb_image(image, timeout=None):
    """A PIL image, a local path or an http(s) URL (or what transformers' ``load_image`` reads) as
    upright 8-bit RGB (`to_rgb`). An unreadable file raises the OSError (or ValueError) of PIL."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if os.path.isfile(path):
            with Image.open(path) as opened:
                opened.load()
                return to_rgb(opened)
        if path.startswith(("http://", "https://")):
            import io
            import urllib.request

            with urllib.request.urlopen(path, timeout=timeout) as response:
                content = response.read()
            with Image.open(io.BytesIO(content)) as opened:
                opened.load()
                return to_rgb(opened)
        from transformers.image_utils import load_image  # base64 data; raises for anything else

        return load_image(path, timeout=timeout)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, a path or a URL, got {type(image).__name__}.")
    return to_rgb(image)


class ImageExplanationPipeline(Pipeline):
    """Classify images with a B-cos model and explain one class per image exactly.

    Call arguments:
        images: a PIL image, a local path or URL, or a list of them.
        top_k (`int`, defaults to 5): how many predictions to return per image.
        target (`int` or `str`, *optional*): the class to explain in every image, by index or label
            name; by default each image's top prediction.
        unit (`str` or `Unit`, *optional*): instead of a class, a unit inside the network:
            "MODULE:CHANNEL" (a channel of that module's output, summed over positions) or a `Unit`.
        timeout (`float`, *optional*): seconds to wait when fetching an image from a URL.

    Returns one dict per image:
        predictions: ``[{"label", "score"}, ...]``, the top-k classes (scores are sigmoids for
            B-cos models, trained with binary cross-entropy; softmax otherwise);
        label, target: the explained class's name and index (for a unit: "MODULE:CHANNEL" and the
            channel);
        explanation: a PIL RGBA image (colour: the pixel's own colour channels in W(x); opacity:
            the norm of W(x) where the contribution is positive);
        contributions: an (H, W) float32 numpy array, W(x) ⊙ x summed over the input channels;
        explained_output: the explained logit without the model's fixed logit bias;
        completeness_error: |Σ contributions − explained_output| (float32 round-off for B-cos
            models without biases).
    """

    _load_image_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.model.config
        if getattr(config, "model_type", None) != "bcos" or not callable(getattr(self.model, "explain", None)):
            raise ValueError(
                f"The {IMAGE_EXPLANATION_TASK} pipeline needs a B-cos image classifier (model_type 'bcos'), got "
                f"{type(self.model).__name__} (model_type {getattr(config, 'model_type', None)!r})."
            )

    def _sanitize_parameters(self, top_k=None, target=None, unit=None, timeout=None):
        preprocess_params = {} if timeout is None else {"timeout": timeout}
        postprocess_params = {}
        if unit is not None:
            if target is not None:
                raise ValueError("unit and target both say what to explain: give one.")
            if isinstance(unit, str):
                name, _, channel = unit.rpartition(":")
                if not name or not channel.isdigit():
                    raise ValueError(f"unit {unit!r}: expected 'MODULE:CHANNEL' (e.g. 'backbone.model.resnet.encoder.stages.1:5') or a Unit.")
                unit = Unit(name, channel=int(channel))
            if not isinstance(unit, Unit):
                raise TypeError(f"unit must be 'MODULE:CHANNEL' or a Unit, got {type(unit).__name__}.")
            unit.find_module(self.model)  # a ValueError naming similar modules, before any image is read
            postprocess_params["unit_name"] = f"{unit.module}:{unit.channel}" if unit.channel is not None else unit.module
            target = unit
        forward_params = {"target": target}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, images, **kwargs):
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError("No images given: pass a PIL image, a path or URL, or a non-empty list of them.")
        return super().__call__(images, **kwargs)

    def preprocess(self, image, timeout=None):
        image = load_rgb_image(image, timeout=timeout)
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)

    def _forward(self, model_inputs, target=None):
        # Pipelines run _forward under torch.no_grad(); the explanation is a backward pass.
        with torch.enable_grad():
            explanation = self.model.explain(model_inputs["pixel_values"], target=target)
        contributions = explanation.contributions.detach()
        return {
            "logits": explanation.logits.detach(),
            "target": explanation.target,
            "contributions": contributions,
            "explained_output": explanation.explained_output.detach(),
            "rgba": torch.from_numpy(explanation.to_rgba()),
        }

    def postprocess(self, model_outputs, top_k=5, unit_name=None):
        import numpy as np
        from PIL import Image

        config = self.model.config
        logits = model_outputs["logits"][0].float()
        if config.problem_type == "multi_label_classification":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        top = torch.topk(scores, k=min(top_k, scores.shape[-1]))
        target = int(model_outputs["target"][0])
        contributions = model_outputs["contributions"][0]
        explained_output = model_outputs["explained_output"][0]
        rgba = (model_outputs["rgba"][0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        return {
            "predictions": [
                {"label": config.id2label[i], "score": s} for s, i in zip(top.values.tolist(), top.indices.tolist())
            ],
            "label": unit_name or config.id2label[target],
            "target": target,
            "explanation": Image.fromarray(rgba),
            "contributions": contributions.float().cpu().numpy(),
            "explained_output": float(explained_output),
            "completeness_error": float((contributions.double().sum() - explained_output.double()).abs()),
        }
