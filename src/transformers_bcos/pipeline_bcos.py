"""The "image-explanation" pipeline: predictions of a B-cos image classifier with their explanations.

    from transformers import pipeline
    explain = pipeline("image-explanation", model="<folder or Hub id>", trust_remote_code=True)
    result = explain(image, top_k=5, target=None)

``result`` (one dict per image) holds the top-k ``predictions`` and, for the explained class (the
top prediction, or ``target=``: a class index or label name), the RGBA ``explanation`` image
(PIL, the B-cos reference rendering at the model's input resolution), the per-pixel
``contributions`` and the ``completeness_error`` |Σ contributions − explained output|.

This file travels with saved checkpoints (``trust_remote_code``; the model's ``config.json``
names it in ``custom_pipelines``): it imports torch, transformers and the standard library at
module level, Pillow and numpy (which transformers' vision pipelines need anyway) inside functions.
"""

import torch
from transformers import Pipeline

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


class ImageExplanationPipeline(Pipeline):
    """Classify images with a B-cos model and explain one class per image exactly.

    Call arguments:
        images: a PIL image, a local path or URL, or a list of them.
        top_k (`int`, defaults to 5): how many predictions to return per image.
        target (`int` or `str`, *optional*): the class to explain in every image, by index or label
            name; by default each image's top prediction.
        timeout (`float`, *optional*): seconds to wait when fetching an image from a URL.

    Returns one dict per image:
        predictions: ``[{"label", "score"}, ...]``, the top-k classes (scores are sigmoids for
            B-cos models, trained with binary cross-entropy; softmax otherwise);
        label, target: the explained class's name and index;
        explanation: a PIL RGBA image (colour: the pixel's own colour channels in W(x); opacity:
            the norm of W(x) where the contribution is positive);
        contributions: an (H, W) float32 numpy array, W(x) ⊙ x summed over the input channels;
        explained_output: the explained logit minus the model's fixed logit bias;
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

    def _sanitize_parameters(self, top_k=None, target=None, timeout=None):
        preprocess_params = {} if timeout is None else {"timeout": timeout}
        forward_params = {"target": target}
        postprocess_params = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, timeout=None):
        from transformers.image_utils import load_image

        image = load_image(image, timeout=timeout)
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

    def postprocess(self, model_outputs, top_k=5):
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
            "label": config.id2label[target],
            "target": target,
            "explanation": Image.fromarray(rgba),
            "contributions": contributions.float().cpu().numpy(),
            "explained_output": float(explained_output),
            "completeness_error": float((contributions.double().sum() - explained_output.double()).abs()),
        }
