"""B-cos CLIP: a B-cos image tower beside CLIP's unchanged, frozen text tower.

The image tower is transformers' own `CLIPVisionModel` and CLIP's visual projection, as in `CLIPModel`,
reading the 6-channel input [r, g, b, 1-r, 1-g, 1-b] encoded inside the model and B-cosified by
the module-type rules of `rules.py`, as every image classifier is: convolutions and linear
layers are B-cos layers, layer norms detach their std, activations their gate and attention its
probabilities in explanation mode, and the class and position embeddings are made linear in the
input. CLIP's own forward code runs, and the tower's weights keep `CLIPModel`'s keys. The text
tower and its projection are transformers' own `CLIPTextModel` and a linear layer, built from
the CLIP config so that a checkpoint is self-contained, and never trained.

Explanations target the cosine similarity between an image embedding and a text embedding: with
the image embedding's norm detached, the cosine is a dynamic linear function of the image, and
its contributions sum to it exactly.

This file travels with saved checkpoints (``trust_remote_code``): it imports torch,
transformers and the standard library only.
"""

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput, CLIPVisionEmbeddings
from transformers.utils import ModelOutput, logging

from .configuration_bcos_clip import BcosCLIPConfig
from .explanation import BcosExplanationOutput, TargetType, dynamic_linear_weights, resolve_targets, rgba_explanation
from .layers import encode_pixel_values, explanation_constant
from .modeling_bcos import BcosPreTrainedModel, check_pixel_values
from .rules import bcosify_modules, find_pixel_reader, prepare_reader

try:  # transformers >= 5 initialises through guarded functions that skip loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

logger = logging.get_logger(__name__)

# The prompt of OpenAI's zero-shot evaluation when a single template is used.
DEFAULT_PROMPT_TEMPLATES = ("a photo of a {}.",)


def _check_cosine_power(cosine_power) -> float:
    valid = isinstance(cosine_power, (int, float)) and not isinstance(cosine_power, bool)
    if not valid or not math.isfinite(cosine_power) or cosine_power <= 0:
        raise ValueError(f"cosine_power must be a finite number > 0, got {cosine_power!r}.")
    return float(cosine_power)


def powered_cosine(cosine: torch.Tensor, cosine_power: float) -> torch.Tensor:
    """cos·|cos|^(p-1) with the |cos|^(p-1) factor detached (a constant of the explanation,
    `layers.explanation_constant`), so it stays linear in the image.

    p > 1 sharpens explanations towards the evidence of the most similar texts while keeping the
    sign of the cosine.
    """
    if cosine_power == 1:
        return cosine
    return cosine * explanation_constant(lambda c: c.abs().pow(cosine_power - 1), cosine)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class BcosCLIPExplanationOutput(ModelOutput):
    """The explanation of the cosine similarity of each image to each text.

    Args:
        contributions: (N, T, H, W) per-pixel contributions, ``(W(x) ⊙ x)`` summed over the 6 input
            channels. They sum to ``explained_output`` exactly (completeness).
        dynamic_linear_weights: (N, T, 6, H, W) W(x), the gradient of the explained output with
            respect to the encoded input [r, g, b, 1-r, 1-g, 1-b].
        explained_output: (N, T) cos·|cos|^(p-1) for ``cosine_power`` p (the cosine for p = 1).
        cosine: (N, T) the cosine similarity of each image embedding to each text embedding.
        logits_per_image: (N, T) ``exp(logit_scale)·cosine``, CLIP's similarity logits.
        image_embeds: (N, D) the L2-normalised image embeddings.
        text_embeds: (T, D) the L2-normalised text embeddings.
        encoded_pixel_values: (N, 6, H, W) the explained input in the 6-channel encoding.
    """

    contributions: torch.Tensor = None
    dynamic_linear_weights: torch.Tensor = None
    explained_output: torch.Tensor = None
    cosine: torch.Tensor = None
    logits_per_image: torch.Tensor = None
    image_embeds: torch.Tensor = None
    text_embeds: torch.Tensor = None
    encoded_pixel_values: torch.Tensor = None

    def to_rgba(self, smoothing: Optional[int] = None, percentile: float = 99.5):
        """(N, T, H, W, 4) float numpy RGBA images of the explanations (reference recipe)."""
        n, t = self.dynamic_linear_weights.shape[:2]
        weights = self.dynamic_linear_weights.flatten(0, 1)
        inputs = self.encoded_pixel_values.repeat_interleave(t, dim=0)
        rgba = rgba_explanation(weights, inputs, smoothing, percentile)
        return rgba.reshape(n, t, *rgba.shape[1:]).cpu().numpy()


@dataclass
class BcosCLIPZeroShotOutput(BcosExplanationOutput):
    """Zero-shot predictions and the explanation of one class per image.

    ``logits`` (N, C) are ``exp(logit_scale)·cos(image, class)``; ``target`` (N,) the explained
    class (the predicted one unless a target was given); ``explained_output`` (N,) the target's
    cos·|cos|^(p-1), to which ``contributions`` (N, H, W) sum exactly.

    Args:
        predictions: (N,) the index of the most similar class of each image.
        predicted_labels: the class name of each prediction.
        class_embeds: (C, D) the unit-norm class embeddings the images are compared with.
    """

    predictions: torch.Tensor = None
    predicted_labels: list = None
    class_embeds: torch.Tensor = None


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class BcosCLIPModel(BcosPreTrainedModel):
    """CLIP with a B-cos image tower: ``image embedding = W(x)·x``, explained by `explain()`.

    Inputs are RGB pixels in [0, 1] (the saved image processor does not normalise; CLIP's mean/std
    normalisation is folded into the patch embedding). The text tower is CLIP's own and frozen.

    Texts given as strings (``text=[...]``, class names) are tokenised with ``tokenizer=`` if
    passed, else with ``model.tokenizer``: `bcosify_clip` attaches the source's tokenizer,
    `save_pretrained` writes it beside the weights, and ``from_pretrained`` finds it there when it
    is first needed. Token ids (``input_ids=``) need no tokenizer.
    """

    legacy_layout = (
        "vision_model.layers.",
        "holds a B-cos CLIP saved with the hand-written image tower of an earlier transformers-bcos (keys "
        "vision_model.layers.*): load it with AutoModel.from_pretrained(folder, trust_remote_code=True) in a process "
        "that has not imported transformers_bcos, which runs the code saved with it, or B-cosify the source CLIP "
        "again with bcosify_clip.",
    )

    config_class = BcosCLIPConfig
    base_model_prefix = "bcos_clip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPEncoderLayer", "CLIPTextEmbeddings"]

    def __init__(self, config: BcosCLIPConfig):
        super().__init__(config)
        # transformers' image tower, reading the encoded pixels, B-cosified by the module-type rules.
        # Modules no rule covers would be listed here; CLIP's tower has none (tested).
        vision_config = copy.deepcopy(config.vision_config)
        vision_config.num_channels = 2 * vision_config.num_channels
        image_tower = nn.ModuleDict({
            "vision_model": CLIPVisionModel._from_config(vision_config),
            # CLIP's visual projection has no bias.
            "visual_projection": nn.Linear(vision_config.hidden_size, config.projection_dim, bias=False),
        })  # fmt: skip
        self.unconverted = bcosify_modules(image_tower, config.b, config.use_bias)
        for module in image_tower.modules():
            if hasattr(module, "normalize_weights"):
                module.normalize_weights = config.normalize_weights
        prepare_reader(image_tower, find_pixel_reader(image_tower, vision_config.num_channels, encoded=True))
        self.vision_model = image_tower["vision_model"]
        self.visual_projection = image_tower["visual_projection"]
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.clip_config.logit_scale_init_value)))
        self.freeze_text_tower()
        self.tokenizer = None
        self.post_init()

    def freeze_text_tower(self) -> None:
        """Exclude the text tower, its projection and the logit scale from training."""
        for parameter in (*self.text_model.parameters(), *self.text_projection.parameters(), self.logit_scale):
            parameter.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # Loading replaces every parameter by a new one that requires grad: freeze the text side again.
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_text_tower()
        return loaded

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.class_embedding.shape[0] ** -0.5)
            init.normal_(module.position_embedding.weight, std=self.config.vision_config.initializer_range)
        elif isinstance(module, BcosCLIPModel):
            init.constant_(module.logit_scale, self.config.clip_config.logit_scale_init_value)

    def _auto_map(self) -> dict:
        name = "modeling_bcos_clip.BcosCLIPModel"
        return {
            "AutoConfig": "configuration_bcos_clip.BcosCLIPConfig",
            "AutoModel": name,
            "AutoModelForZeroShotImageClassification": name,
        }

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """Save weights, config (with ``auto_map``), code, image processor and tokenizer."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        tokenizer = self._find_tokenizer()
        if tokenizer is None:
            logger.warning(
                "This model has no tokenizer: the saved folder cannot tokenise text (text=[...], the "
                "zero-shot-image-classification pipeline). Set model.tokenizer or save one beside it."
            )
        else:
            tokenizer.save_pretrained(save_directory)

    # ------------------------------------------------------------------------------ inputs

    def encode_inputs(self, pixel_values=None, encoded_pixel_values=None) -> torch.Tensor:
        """Validate the images and return them in the 6-channel encoding [x, 1-x]."""
        if (pixel_values is None) == (encoded_pixel_values is None):
            raise ValueError("Pass exactly one of pixel_values (N, 3, H, W) or encoded_pixel_values (N, 6, H, W).")
        if encoded_pixel_values is not None:
            check_pixel_values(encoded_pixel_values, 6, self.config.image_size, check_range=False, name="encoded_pixel_values")
            x = encoded_pixel_values
        else:
            check_pixel_values(pixel_values, 3, self.config.image_size)
            x = encode_pixel_values(pixel_values)
        return x.to(self.visual_projection.weight.dtype)

    def _find_tokenizer(self):
        if self.tokenizer is None and getattr(self.config, "_name_or_path", ""):
            try:  # the folder (or Hub repository) the model was loaded from
                # config= spares AutoTokenizer from loading this (remote-code) config again.
                self.tokenizer = AutoTokenizer.from_pretrained(self.config._name_or_path, config=self.config)
            except (OSError, ValueError, TypeError):
                pass
        return self.tokenizer

    def tokenize(self, text: Union[str, Sequence[str]], tokenizer=None) -> dict:
        """Token ids and attention mask of a non-empty list of strings, on the model's device."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}.")
        if len(text) == 0:
            raise ValueError("text is empty: pass at least one string.")
        tokenizer = tokenizer if tokenizer is not None else self._find_tokenizer()
        if tokenizer is None:
            raise ValueError(
                "This model has no tokenizer: pass tokenizer= (e.g. AutoTokenizer.from_pretrained(<source CLIP>)), "
                "set model.tokenizer, or pass input_ids= instead of text=."
            )
        encoding = tokenizer(
            list(text),
            padding=True,
            truncation=True,
            max_length=self.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        return {key: encoding[key].to(self.device) for key in ("input_ids", "attention_mask")}

    @staticmethod
    def _check_input_ids(input_ids, attention_mask) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be an integer tensor of shape (T, L): T token sequences of length L.")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no text: pass at least one token sequence.")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                f"{tuple(input_ids.shape)}."
            )

    # ------------------------------------------------------------------------------ features

    def get_image_features(self, pixel_values=None, encoded_pixel_values=None) -> BaseModelOutputWithPooling:
        """Image embeddings (N, D) as ``pooler_output`` (not normalised), as CLIPModel's."""
        x = self.encode_inputs(pixel_values, encoded_pixel_values)
        outputs = self.vision_model(pixel_values=x, return_dict=True)
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    def get_text_features(self, input_ids, attention_mask=None, position_ids=None) -> BaseModelOutputWithPooling:
        """Text embeddings (T, D) as ``pooler_output`` (not normalised): the source CLIP's, unchanged."""
        self._check_input_ids(input_ids, attention_mask)
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True
        )
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return outputs

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        encoded_pixel_values: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
    ):
        r"""
        input_ids (`torch.LongTensor` of shape `(T, L)`): the tokenised texts.
        pixel_values (`torch.Tensor` of shape `(N, 3, H, W)`): RGB in [0, 1], not mean/std normalised.
        attention_mask (`torch.Tensor` of shape `(T, L)`, *optional*): the texts' padding mask.
        encoded_pixel_values (`torch.Tensor` of shape `(N, 6, H, W)`, *optional*): the images already
            encoded as [x, 1-x], instead of ``pixel_values``.

        Returns a `CLIPOutput`: ``logits_per_image`` (N, T) = exp(logit_scale)·cos, ``logits_per_text``
        its transpose, and the normalised ``image_embeds`` / ``text_embeds``.
        """
        if input_ids is None:
            raise ValueError("forward needs input_ids (the tokenised texts) and pixel_values (the images).")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        vision_outputs = self.get_image_features(pixel_values, encoded_pixel_values)
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids)
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1).to(image_embeds.dtype)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp().to(image_embeds.dtype)
        output = CLIPOutput(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------ explanations

    def _unit_text_embeddings(self, text, input_ids, attention_mask, tokenizer, create_graph: bool = False) -> torch.Tensor:
        """(T, D) unit-norm text embeddings of ``text`` or ``input_ids``: constants of the explanation
        (``create_graph``: with their graph to the text tower, which is frozen unless the caller
        unfroze it)."""
        if text is not None and input_ids is not None:
            raise ValueError("Pass either text=[...] or input_ids=..., not both.")
        if text is None and input_ids is None:
            raise ValueError("Pass the texts to compare the images with: text=[...] or input_ids=...")
        if text is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask goes with input_ids; for text=[...] the tokenizer builds it.")
            tokens = self.tokenize(text, tokenizer)
        else:
            tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        with torch.enable_grad() if create_graph else torch.no_grad():
            embeds = self.get_text_features(**tokens).pooler_output
        return F.normalize(embeds, dim=-1).to(self.visual_projection.weight.dtype)

    def _cosine_with_detached_norm(self, encoded_pixel_values: torch.Tensor, unit_text_embeds: torch.Tensor):
        """cos(image, text) (N, T) computed with 1/||image embedding|| detached, and that embedding.

        The detached norm makes the cosine a dynamic linear function of the image (without it the
        degree-0 homogeneous cosine would have contributions that sum to about zero).
        """
        image_embeds = self.get_image_features(encoded_pixel_values=encoded_pixel_values).pooler_output
        inverse_norm = explanation_constant(lambda e: e.norm(dim=-1, keepdim=True).reciprocal(), image_embeds)
        return (image_embeds * inverse_norm) @ unit_text_embeds.t(), image_embeds

    def explain(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        text: Optional[Union[str, Sequence[str]]] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cosine_power: float = 1.0,
        tokenizer=None,
        encoded_pixel_values: Optional[torch.Tensor] = None,
        create_graph: bool = False,
    ) -> BcosCLIPExplanationOutput:
        """Explain the cosine similarity of each image to each text, exactly.

        Args:
            pixel_values: (N, 3, H, W) RGB in [0, 1] (or ``encoded_pixel_values`` (N, 6, H, W)).
            text: T strings (tokenised with ``tokenizer`` or ``model.tokenizer``), or
            input_ids: (T, L) token ids, with their optional ``attention_mask``.
            cosine_power: p in cos·|cos|^(p-1); p > 1 sharpens the explanations (the |cos|^(p-1)
                factor is detached, so completeness holds for every p).
            create_graph: contributions and weights with a graph to the parameters, as in
                `BcosForImageClassification.explain`: the total derivative of the plain
                explanation in the parameters, every dynamic factor (the image embedding's norm
                and |cos|^(p-1) included) constant in the input but not in the parameters.

        Returns:
            A `BcosCLIPExplanationOutput` whose ``contributions`` (N, T, H, W) sum exactly to
            ``explained_output`` (N, T) = cos·|cos|^(p-1), computed with 1/||image embedding||
            detached (the model has no additive terms; the class and position embeddings are
            attributed uniformly to their pixels, see `rules.LinearizedConstants`). One backward pass
            per text. The model's train/eval mode is restored; no gradient is left on it.
        """
        x = self.encode_inputs(pixel_values, encoded_pixel_values)
        power = _check_cosine_power(cosine_power)
        unit_text_embeds = self._unit_text_embeddings(text, input_ids, attention_mask, tokenizer, create_graph)

        def explained_output(inputs):
            cosine, image_embeds = self._cosine_with_detached_norm(inputs, unit_text_embeds)
            return powered_cosine(cosine, power), (cosine.detach(), image_embeds.detach())

        weights, output, (cosine, image_embeds) = dynamic_linear_weights(self, x, explained_output, create_graph)
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):  # the graph asked for, even under no_grad
            contributions = (weights * x[:, None].to(weights.dtype)).sum(2)
        return BcosCLIPExplanationOutput(
            contributions=contributions,
            dynamic_linear_weights=weights,
            explained_output=output,
            cosine=cosine,
            logits_per_image=self.logit_scale.exp().detach() * cosine,
            image_embeds=F.normalize(image_embeds, dim=-1),
            text_embeds=unit_text_embeds.detach(),
            encoded_pixel_values=x.detach(),
        )

    def class_text_embeddings(
        self, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES, tokenizer=None
    ) -> torch.Tensor:
        """(C, D) zero-shot class embeddings: the mean of each class's unit-norm prompt embeddings,
        normalised again (OpenAI's zero-shot recipe), so that image·class is a cosine."""
        if isinstance(class_names, str) or not isinstance(class_names, (list, tuple)) or not class_names:
            raise ValueError("class_names must be a non-empty list of strings.")
        if len(set(class_names)) != len(class_names):
            duplicates = sorted({name for name in class_names if class_names.count(name) > 1})
            raise ValueError(f"class_names holds duplicates: {duplicates}.")
        if isinstance(templates, str):
            templates = [templates]
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ValueError('templates must be a non-empty list of strings with a "{}" for the class name.')
        prompts = [template.format(name) for name in class_names for template in templates]
        with torch.no_grad():
            embeds = self.get_text_features(**self.tokenize(prompts, tokenizer)).pooler_output
        embeds = F.normalize(embeds, dim=-1).view(len(class_names), len(templates), -1).mean(1)
        return F.normalize(embeds, dim=-1).to(self.visual_projection.weight.dtype)

    def zero_shot_classify(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        class_names: Sequence[str] = (),
        templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES,
        target: TargetType = None,
        cosine_power: float = 1.0,
        tokenizer=None,
        encoded_pixel_values: Optional[torch.Tensor] = None,
    ) -> BcosCLIPZeroShotOutput:
        """Classify images among ``class_names`` zero-shot and explain one class per image.

        Args:
            pixel_values: (N, 3, H, W) RGB in [0, 1] (or ``encoded_pixel_values``).
            class_names: the C candidate classes; each is put into every prompt template.
            templates: prompt templates with a "{}" for the class name (OpenAI's 80 ImageNet
                templates, or the default "a photo of a {}.").
            target: the class to explain: None (the prediction), a class index or name for every
                image, or N of them.
            cosine_power: p in cos·|cos|^(p-1), as in `explain`.

        Returns:
            A `BcosCLIPZeroShotOutput`: ``logits`` (N, C) = exp(logit_scale)·cos (100·cos for
            OpenAI's CLIP), ``predictions``, and the explanation of ``target``'s cos·|cos|^(p-1).
        """
        x = self.encode_inputs(pixel_values, encoded_pixel_values)
        power = _check_cosine_power(cosine_power)
        class_embeds = self.class_text_embeddings(class_names, templates, tokenizer)
        label2id = {name: i for i, name in enumerate(class_names)}
        if target is not None:  # validate before any work
            resolve_targets(target, torch.empty(x.shape[0], len(class_names)), label2id)
        scale = self.logit_scale.exp().detach()

        def explained_output(inputs):
            cosine, _ = self._cosine_with_detached_norm(inputs, class_embeds)
            targets = resolve_targets(target, cosine.detach(), label2id)
            explained = powered_cosine(cosine.gather(1, targets[:, None]).squeeze(1), power)
            return explained, (scale * cosine.detach(), targets)

        weights, output, (logits, targets) = dynamic_linear_weights(self, x, explained_output)
        predictions = logits.argmax(dim=1)
        return BcosCLIPZeroShotOutput(
            contributions=(weights * x.to(weights.dtype)).sum(1),
            dynamic_linear_weights=weights,
            target=targets,
            explained_output=output,
            logits=logits,
            encoded_pixel_values=x.detach(),
            predictions=predictions,
            predicted_labels=[class_names[i] for i in predictions.tolist()],
            class_embeds=class_embeds,
        )


BcosCLIPConfig.register_for_auto_class()
BcosCLIPModel.register_for_auto_class("AutoModel")
