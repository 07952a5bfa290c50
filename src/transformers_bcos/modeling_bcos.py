"""B-cos image classifiers: any image classifier of transformers, or a plain PyTorch (torchvision,
timm) classifier, B-cosified by the module-type rules of `rules.py`.

The source architecture keeps its own modules and forward code; every convolution and linear
layer is a B-cos layer, normalisations detach their std, activations and gates detach their gates,
attention detaches its probabilities, and the model reads the 6-channel input
[r, g, b, 1-r, 1-g, 1-b], encoded inside the model. A model is either B-cosified from a pretrained
checkpoint (``transformers_bcos.bcosify_pretrained``) or built from a `BcosConfig` with random
weights (the B-cos-from-scratch baseline).

This file travels with saved checkpoints (``trust_remote_code``): it imports torch,
transformers and the standard library only.
"""

import copy
import inspect
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from .configuration_bcos import PLAIN_MODULE_FAMILY, BcosConfig
from .explanation import BcosExplanationOutput, TargetType, captured_output, dynamic_linear_weights, is_unit, resolve_targets
from .layers import encode_pixel_values
from .rules import bcosify_modules, find_pixel_reader, prepare_reader

# Pixels may overshoot [0, 1] by resampling round-off; anything beyond this is an input mistake.
PIXEL_RANGE_TOLERANCE = 1e-3


def bcos_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against targets whose off-labels are 1/C (the B-cos loss).

    ``labels`` holds class indices (N,) or target probabilities (N, C) (e.g. from mixup). Either
    way every target is floored at 1/C, as in the B-cos reference (``UniformOffLabelsBCEWithLogitsLoss``):
    a one-hot target becomes 1 on its class and 1/C elsewhere, and a soft target's small entries
    are raised to 1/C.
    """
    num_classes = logits.shape[-1]
    if labels.dim() == logits.dim():
        targets = labels.float()
    else:
        targets = F.one_hot(labels.long(), num_classes).float()
    return F.binary_cross_entropy_with_logits(logits.float(), targets.clamp_min(1.0 / num_classes))


# ----------------------------------------------------------------------------------------------
# Source architectures: their own modules and forward, B-cosified by the rules
# ----------------------------------------------------------------------------------------------


def encoded_image_config(backbone_config, num_labels: int):
    """A copy of ``backbone_config`` whose models read the encoding [x, 1 - x] (twice the pixel
    channels, in the config and in any sub-config that names them) with ``num_labels`` classes."""
    encoded = copy.deepcopy(backbone_config)
    configs = [encoded] + [getattr(encoded, key) for key in getattr(encoded, "sub_configs", {}) if getattr(encoded, key, None) is not None]
    for config in configs:
        if hasattr(config, "num_channels"):
            config.num_channels = 2 * config.num_channels
    encoded.num_labels = num_labels
    if encoded.architectures is None:
        # A config built in code names no class; where a model type has several image classifiers
        # (DeiT's with and without the distillation head) the auto class needs one: the first.
        encoded.architectures = [_first_image_classifier(encoded.model_type)]
    return encoded


def _first_image_classifier(model_type: str) -> str:
    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
    return names if isinstance(names, str) else names[0]


class BcosSourceArchitecture(nn.Module):
    """The source's own image classifier, built from ``config.backbone_config`` and B-cosified by
    the module-type rules (`rules.bcosify_modules`): its own forward code runs, its own head
    classifies.

    (N, 2C, H, W) encoded pixels -> (logits before the logit bias, hidden states). Modules that no
    rule covers stay as they are and are listed in ``unconverted``; the conversion refuses a model
    whose output depends on them.
    """

    def __init__(self, config: BcosConfig, model: Optional[nn.Module] = None):
        super().__init__()
        if model is None:
            model = AutoModelForImageClassification.from_config(encoded_image_config(config.backbone_config, config.num_labels))
        self.model = model
        self.unconverted = bcosify_modules(self.model, config.b, config.use_bias, config.normalize_weights)
        reader = find_pixel_reader(self.model, 2 * config.num_channels, encoded=True)
        self._pixel_reader_name = next(name for name, module in self.model.named_modules() if module is reader)
        prepare_reader(self.model, reader)
        # Position embeddings learned for one size (SigLIP's) are interpolated for other sizes where
        # the source's forward offers it, as DINOv2's always are: the model takes any input size, as
        # `BcosConfig.image_size` (None) says, GridPG grids included. At that size they are unchanged.
        self.interpolate_pos_encoding = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters

    @property
    def pixel_reader(self) -> nn.Conv2d:
        """The convolution that reads the encoded pixels (the source's first convolution)."""
        return self.model.get_submodule(self._pixel_reader_name)

    def forward(self, encoded_pixel_values: torch.Tensor, output_hidden_states: bool = False):
        options = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        out = self.model(pixel_values=encoded_pixel_values, output_hidden_states=output_hidden_states, return_dict=True, **options)
        return out.logits, out.hidden_states if output_hidden_states else None


class BcosPlainModuleArchitecture(BcosSourceArchitecture):
    """A plain PyTorch classifier (``source_module``: pixels (N, C, H, W) -> logits) B-cosified by
    the same rules: a copy of it, whose first convolution reads the encoded (N, 2C, H, W) pixels.

    The architecture is the module's code, so the model is rebuilt from an instance of it (the
    caller's module is copied, never changed); ``config.backbone_config`` is a
    `PlainModuleConfig`. The module's forward may return logits, a tuple starting with them or an
    output with ``logits``; it has no hidden states to give.
    """

    def __init__(self, config: BcosConfig, source_module: nn.Module):
        super().__init__(config, widen_pixel_reader(copy.deepcopy(source_module), config.num_channels))

    def forward(self, encoded_pixel_values: torch.Tensor, output_hidden_states: bool = False):
        return logits_of(self.model(encoded_pixel_values)), None


def library_with_architecture(library_name: str, name: str):
    """The module of ``library_name`` ("timm", or "torchvision" for ``torchvision.models``) that
    builds the model ``name``, imported here (only these models need it); a ValueError for a name
    the library does not know."""
    library = __import__("timm" if library_name == "timm" else "torchvision.models", fromlist=["_"])
    if library_name == "timm" and not library.is_model(name):
        raise ValueError(f"Unknown timm architecture {name!r} (timm {library.__version__} has no model of that name).")
    if library_name == "torchvision" and name not in library.list_models(module=library):
        raise ValueError(f"Unknown torchvision classification model {name!r} (torchvision.models.list_models() names them).")
    return library


def build_library_model(config) -> nn.Module:
    """The timm or torchvision model named by a `PlainModuleConfig` (``library``,
    ``architecture``, ``architecture_kwargs``), with random weights."""
    try:
        library = library_with_architecture(config.library, config.architecture)
    except ImportError:
        raise ImportError(
            f"This B-cos model is the {config.library} model {config.architecture!r} B-cosified: loading it needs "
            f"{config.library} (pip install 'transformers-bcos[timm]', which installs timm and torchvision)."
        ) from None
    if config.library == "timm":
        return library.create_model(config.architecture, pretrained=False, **config.architecture_kwargs)
    return library.get_model(config.architecture, weights=None, **config.architecture_kwargs)


def logits_of(output) -> torch.Tensor:
    """The logits in a classifier's output: the tensor itself, its ``logits`` or its first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return output[0] if logits is None else logits


def widen_pixel_reader(module: nn.Module, channels: int) -> nn.Module:
    """``module`` with its first convolution of ``channels`` input channels made to read twice as
    many (the encoding [x, 1 - x]); its new weight is allocated here and written by the conversion
    or by loading."""
    reader = find_pixel_reader(module, channels)
    if reader.groups != 1:
        raise ValueError(f"The convolution that reads the pixels has {reader.groups} groups; B-cosification needs 1.")
    reader.in_channels = 2 * channels
    reader.weight = nn.Parameter(reader.weight.new_empty(reader.out_channels, 2 * channels, *reader.kernel_size))
    return module


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class CheckpointWeightsError(ValueError):
    """A B-cos checkpoint whose weights do not fit the model its config describes."""


def _listed(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def saved_weight_keys(folder: str) -> set:
    """The keys of the tensors in a local checkpoint's safetensors files (as saved: transformers may
    rename them when loading); an OSError naming an unreadable (truncated, empty) file."""
    from safetensors import SafetensorError, safe_open

    keys = set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt") as weights:
                    keys.update(weights.keys())
            except (SafetensorError, OSError) as error:
                raise OSError(f"{os.path.join(folder, name)} cannot be read (truncated or corrupt?): {error}") from None
    return keys


class BcosPreTrainedModel(PreTrainedModel):
    config_class = BcosConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    # (key prefix, message): the keys of a hand-written architecture of an earlier
    # transformers-bcos, and what to do with such a checkpoint.
    legacy_layout: Optional[tuple] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load as transformers does, but refuse a checkpoint whose weights do not fit the model.

        transformers fills missing weights with fresh random values and drops unexpected ones,
        with a log message; for a B-cos checkpoint that is a silently different model (a renamed
        key, a half-written file, a config naming another backbone). So missing or unexpected
        weights raise a `CheckpointWeightsError` naming them, and so do weights of another shape
        unless ``ignore_mismatched_sizes=True`` asks for them to be replaced; an unreadable weight
        file or a pickle that ``torch.load(weights_only=True)`` refuses raises an OSError naming it.
        A local checkpoint of a hand-written architecture of an earlier transformers-bcos
        (``legacy_layout``) is refused with what to do, before anything is loaded.
        """
        import pickle

        from safetensors import SafetensorError

        location = None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
        wants_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        if location is not None and os.path.isdir(location):
            if kwargs.get("config") is None and not os.path.isfile(os.path.join(location, "config.json")):
                raise OSError(f"{location} is not a saved model folder: it has no config.json.")
            saved = saved_weight_keys(location)
            if cls.legacy_layout is not None and any(key.startswith(cls.legacy_layout[0]) for key in saved):
                raise CheckpointWeightsError(f"{location} {cls.legacy_layout[1]}")
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(f"The weights of {location} cannot be read (truncated or corrupt?): {error}") from None
        except pickle.UnpicklingError as error:
            raise OSError(
                f"The pickled weights of {location} were refused (torch.load with weights_only=True; only safetensors "
                f"weights are safe to load): {str(error).splitlines()[0]}"
            ) from None
        problems = []
        if loading_info["missing_keys"]:
            problems.append(f"missing {_listed(loading_info['missing_keys'])}")
        if loading_info["unexpected_keys"]:
            problems.append(f"unexpected {_listed(loading_info['unexpected_keys'])}")
        if loading_info["mismatched_keys"] and not ignore_mismatched_sizes:
            shapes = {f"{key} {tuple(saved)} (model: {tuple(expected)})" for key, saved, expected in loading_info["mismatched_keys"]}
            problems.append(f"of another shape {_listed(shapes)} (pass ignore_mismatched_sizes=True to replace them)")
        if problems:
            architecture = getattr(model.config, "backbone_config", None)
            described = f"{type(model).__name__}, {architecture.model_type}" if architecture is not None else type(model).__name__
            raise CheckpointWeightsError(f"The weights of {location} do not fit its config ({described}): " + "; ".join(problems) + ".")
        return (model, loading_info) if wants_loading_info else model

    def _auto_map(self) -> dict:
        return {"AutoConfig": "configuration_bcos.BcosConfig"}

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """Save weights, config (with ``auto_map``), the model's code and its image processor."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(self._auto_map())
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process and self.config.image_processor:
            with open(os.path.join(save_directory, "preprocessor_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config.image_processor, f, indent=2, sort_keys=True)
                f.write("\n")


def check_pixel_values(pixel_values, channels: int = 3, image_size=None, check_range: bool = True, name: str = "pixel_values") -> None:
    """Raise a ValueError/TypeError that names the problem with ``pixel_values``, if any."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, {channels}, H, W), got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        raise ValueError(f"{name} must have shape (N, {channels}, H, W), got shape {tuple(pixel_values.shape)}.")
    if pixel_values.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels, got shape {tuple(pixel_values.shape)}"
            + (" (B-cos models take pixels in [0, 1] and encode [x, 1-x] themselves)." if name == "pixel_values" else ".")
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {pixel_values.dtype}.")
    if image_size is not None and tuple(pixel_values.shape[-2:]) != tuple(image_size):
        raise ValueError(f"This model takes images of size {tuple(image_size)}, got {tuple(pixel_values.shape[-2:])}.")
    if pixel_values.numel() == 0:
        raise ValueError(f"{name} holds no pixels (shape {tuple(pixel_values.shape)}): pass at least one non-empty image.")
    if torch.compiler.is_compiling():
        return
    if not torch.isfinite(pixel_values).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    low, high = torch.aminmax(pixel_values)
    if check_range and (low < -PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE):
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{low.item():.3g}, {high.item():.3g}]. B-cos models take "
            "unnormalised pixels: use the model's image processor (do_normalize=False)."
        )
    # The encoding [x, 1 - x] of pixels in [0, 1] (or a positive multiple of it: the models are
    # homogeneous) is never negative; negative values mean normalised pixels were encoded.
    if not check_range and low < -PIXEL_RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must be non-negative (the encoding [x, 1 - x] of pixels x in [0, 1]), got a minimum of "
            f"{low.item():.3g}: pass unnormalised pixel_values, or encode them with model.encode_inputs."
        )


def check_labels(labels, batch_size: int, num_labels: int) -> None:
    """Raise a ValueError/TypeError that names the problem with ``labels``, if any."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices (N,) or target probabilities (N, C), got {type(labels).__name__}.")
    if labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
        if labels.shape[0] != batch_size:
            raise ValueError(f"labels holds {labels.shape[0]} class indices for a batch of {batch_size} images.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(
                f"labels holds class indices in [{labels.min().item()}, {labels.max().item()}]; this model has "
                f"{num_labels} classes (0..{num_labels - 1})."
            )
    elif labels.dim() == 2 and labels.is_floating_point():
        if tuple(labels.shape) != (batch_size, num_labels):
            raise ValueError(f"labels of target probabilities must have shape ({batch_size}, {num_labels}), got {tuple(labels.shape)}.")
        if not torch.isfinite(labels).all() or labels.min() < 0 or labels.max() > 1:
            raise ValueError("labels of target probabilities must lie in [0, 1].")
    else:
        raise ValueError(
            f"labels must be integer class indices of shape ({batch_size},) or float target probabilities of shape "
            f"({batch_size}, {num_labels}), got dtype {labels.dtype} and shape {tuple(labels.shape)}."
        )


@dataclass
class BcosImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the logits before the fixed logit bias is added.

    Args:
        bias_free_logits: (N, C) W(x)·x, what `explain()` explains: ``logits`` minus
            ``config.logit_bias``, but not computed as that difference. A freshly converted or
            randomly initialised model's W(x)·x can be 1e-5 or 1e-9 next to a bias of -log(C-1)
            (-1.39 for 5 classes), where ``logits - logit_bias`` in float32 keeps few or none of
            its digits.
    """

    bias_free_logits: Optional[torch.FloatTensor] = None


class BcosForImageClassification(BcosPreTrainedModel):
    """A B-cos image classifier: ``logits = W(x)·x + logit_bias``, explained by `explain()`."""

    legacy_layout = (
        "classifier.",
        "holds a B-cos classifier saved with a hand-written ViT/DeiT/ResNet/ConvNeXt backbone of an earlier "
        "transformers-bcos (keys classifier.*, backbone.* outside backbone.model.*): load it with "
        "AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True) in a process that has not "
        "imported transformers_bcos, which runs the code saved with it, or B-cosify the source model again with "
        "bcosify_pretrained.",
    )

    def __init__(self, config: BcosConfig, source_module: Optional[nn.Module] = None):
        r"""
        source_module (`nn.Module`, *optional*): for a model converted from a plain PyTorch
            classifier (``config.backbone_config`` a `PlainModuleConfig`), an instance of its class:
            its code is the architecture. ``from_pretrained(folder, source_module=Net())`` passes it.
        """
        super().__init__(config)
        if config.backbone_family == PLAIN_MODULE_FAMILY:
            if source_module is None and config.backbone_config.library is not None:
                source_module = build_library_model(config.backbone_config)
            if not isinstance(source_module, nn.Module):
                raise ValueError(
                    f"This B-cos model was converted from the plain PyTorch module {config.backbone_config.module_class or '(unnamed)'}, "
                    "whose code is its architecture: pass source_module=<an instance of that class> (to from_pretrained or "
                    "the constructor)."
                )
            self.backbone = BcosPlainModuleArchitecture(config, source_module)
        elif source_module is not None:
            raise ValueError(f"source_module applies to models converted from a plain PyTorch module, not to a {config.backbone_config.model_type} model.")
        else:
            self.backbone = BcosSourceArchitecture(config)
        self.post_init()

    def _auto_map(self) -> dict:
        name = "modeling_bcos.BcosForImageClassification"
        return {**super()._auto_map(), "AutoModel": name, "AutoModelForImageClassification": name}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as `BcosPreTrainedModel` does, plus the "image-explanation" pipeline.

        ``config.custom_pipelines`` names the pipeline class, so that
        ``pipeline("image-explanation", model=<folder>, trust_remote_code=True)`` finds it; and because
        this module imports ``pipeline_bcos`` (here, not at the top: only saving needs it), the code
        copy of ``save_pretrained`` (custom_object_save) puts pipeline_bcos.py beside this file.
        """
        from .pipeline_bcos import CUSTOM_PIPELINES

        self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
        super().save_pretrained(save_directory, *args, **kwargs)

    def encode_inputs(self, pixel_values=None, encoded_pixel_values=None) -> torch.Tensor:
        """Validate the input and return it in the encoding [x, 1-x] (6 channels for RGB)."""
        channels = self.config.num_channels
        if (pixel_values is None) == (encoded_pixel_values is None):
            raise ValueError(f"Pass exactly one of pixel_values (N, {channels}, H, W) or encoded_pixel_values (N, {2 * channels}, H, W).")
        if encoded_pixel_values is not None:
            check_pixel_values(encoded_pixel_values, 2 * channels, self.config.image_size, check_range=False, name="encoded_pixel_values")
            return encoded_pixel_values
        check_pixel_values(pixel_values, channels, self.config.image_size)
        return encode_pixel_values(pixel_values)

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        encoded_pixel_values: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        r"""
        pixel_values (`torch.Tensor` of shape `(N, 3, H, W)`): RGB in [0, 1], not mean/std normalised.
        labels (`torch.Tensor`, *optional*): class indices (N,) or target probabilities (N, C); the loss
            is the B-cos binary cross-entropy (off-labels 1/C).
        encoded_pixel_values (`torch.Tensor` of shape `(N, 6, H, W)`, *optional*): the input already
            encoded as [x, 1-x], instead of ``pixel_values``.
        """
        x = self.encode_inputs(pixel_values, encoded_pixel_values)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        bias_free_logits, hidden_states = self.backbone(x.to(self.dtype), output_hidden_states)
        logits = bias_free_logits + self.config.logit_bias
        loss = None
        if labels is not None:
            if not torch.compiler.is_compiling():
                check_labels(labels, logits.shape[0], self.config.num_labels)
            loss = bcos_bce_loss(logits, labels)
        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return BcosImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, bias_free_logits=bias_free_logits)

    def explain(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        target: TargetType = None,
        encoded_pixel_values: Optional[torch.Tensor] = None,
        create_graph: bool = False,
    ) -> BcosExplanationOutput:
        """Explain a batch of images exactly, with one forward and one backward pass.

        Args:
            pixel_values: (N, C, H, W) pixels in [0, 1], C = 3 (RGB) or the plain module's
                channels (or ``encoded_pixel_values`` (N, 2C, H, W)).
            target: the class to explain: None (the predicted class), an int or a label name for
                every image, or a sequence/tensor of N of them. Or a `Unit` inside the network
                (``Unit("backbone.model.resnet.encoder.stages.1", channel=5)``): a channel of a
                module's output, summed over positions or at one; ``explained_output`` is then its
                value and ``target`` the channel.
            create_graph: return ``contributions`` and ``dynamic_linear_weights`` with a graph to
                the model's parameters, for a loss on the explanation to train through. Its
                gradient is the total derivative of the plain explanation as a function of the
                parameters: the dynamic factors (B-cos scales, norm stds, gates, attention) are
                constant in the input as always, yet vary with the parameters. The values are
                the plain explanation's. It costs a second forward pass (the factors' own, see
                `dynamic_linear_weights`) and a graph through the backward pass; the parameters
                stay trainable meanwhile, and nothing is written to their ``.grad``.

        Returns:
            A `BcosExplanationOutput`. ``explained_output`` is the target's logit without the fixed
            ``config.logit_bias`` (read from ``bias_free_logits``, never computed as a difference);
            ``contributions`` (N, H, W) sum to it exactly when the model has no additive terms
            (``use_bias=False``, the B-cos default). Learned constants (class tokens, position
            embeddings) are attributed uniformly to the pixels of the image / of their patch (see
            `rules.LinearizedConstants`), so they do not break completeness. Contributions, weights and
            the explained output come in float32 for a half-precision model (see
            `dynamic_linear_weights`). The model's train/eval mode is restored, and no gradient
            is left on it or the input (with ``create_graph``, only the graph the returned
            tensors hold).
        """
        x = self.encode_inputs(pixel_values, encoded_pixel_values)
        # validate before any work
        if is_unit(target):
            unit_module = target.find_module(self)
        elif target is not None:
            resolve_targets(target, torch.empty(x.shape[0], self.config.num_labels), self.config.label2id)
        x = x.to(self.dtype)

        def explained_output(inputs):
            if is_unit(target):
                with captured_output(unit_module) as captured:
                    logits = self(encoded_pixel_values=inputs).logits.detach()
                if "output" not in captured:
                    raise ValueError(f"{target.module} did not run in the forward pass: explain a unit of a module that does.")
                value = target.value(captured["output"])
                if not value.requires_grad:
                    raise ValueError(f"The unit's value at {target.module} does not depend on the pixels: there is nothing to explain.")
                channels = torch.full((x.shape[0],), -1 if target.channel is None else target.channel, dtype=torch.long)
                return value, (logits, channels)
            outputs = self(encoded_pixel_values=inputs)
            logits = outputs.logits.detach()
            targets = resolve_targets(target, logits, self.config.label2id)
            return outputs.bias_free_logits.gather(1, targets[:, None]).squeeze(1), (logits, targets)

        weights, output, (logits, targets) = dynamic_linear_weights(self, x, explained_output, create_graph)
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):  # the graph asked for, even under no_grad
            contributions = (weights * x.to(weights.dtype)).sum(1)
        return BcosExplanationOutput(
            contributions=contributions,
            dynamic_linear_weights=weights,
            target=targets,
            explained_output=output,
            logits=logits,
            encoded_pixel_values=x.detach(),
        )


BcosConfig.register_for_auto_class()
BcosForImageClassification.register_for_auto_class("AutoModelForImageClassification")
