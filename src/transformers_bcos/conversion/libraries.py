"""timm and torchvision sources: which library model a module is, and the arguments that rebuild it.

A B-cosified timm or torchvision model is saved with a `PlainModuleConfig` that names its library,
architecture and constructor arguments, so that loading rebuilds it (`build_library_model`) without
the caller's module. A transformers ``TimmWrapperForImageClassification`` (an instance, a saved
folder or a ``timm/...`` Hub id) is converted as the timm model it wraps. Neither library is
imported unless the source is one of its models.
"""

import os
import sys
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from ..modeling_bcos import library_with_architecture

TIMM_WRAPPER_TYPE = "timm_wrapper"
INSTALL_HINT = "pip install 'transformers-bcos[timm]' (timm and torchvision)"


def require_timm(what: str) -> None:
    """One line saying what to install, before any work, when timm is missing."""
    try:
        import timm  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} is a timm model: B-cosifying it needs timm. Install it with {INSTALL_HINT}.") from None


def is_timm_wrapper(src, **from_pretrained_kwargs) -> bool:
    """Whether ``src`` (a model, a folder or a Hub id) is a transformers `TimmWrapperForImageClassification`."""
    if isinstance(src, PreTrainedModel):
        return src.config.model_type == TIMM_WRAPPER_TYPE
    if isinstance(src, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(src, **from_pretrained_kwargs).to_dict()
        return config.get("model_type") == TIMM_WRAPPER_TYPE
    return False


def load_timm_wrapper(src, **from_pretrained_kwargs) -> tuple:
    """(timm model, its data config, labels dict, (library, architecture, kwargs)) of a
    `TimmWrapperForImageClassification` instance, folder or Hub id; the architecture is checked
    before any weights are loaded."""
    require_timm(str(src) if not isinstance(src, nn.Module) else type(src).__name__)
    from transformers import TimmWrapperForImageClassification

    if isinstance(src, PreTrainedModel):
        wrapper = src
    else:
        library_with_architecture("timm", AutoConfig.from_pretrained(src, **from_pretrained_kwargs).architecture)
        wrapper = TimmWrapperForImageClassification.from_pretrained(src, **from_pretrained_kwargs)
    if not isinstance(wrapper, TimmWrapperForImageClassification):
        raise ValueError(f"Unsupported model class {type(wrapper).__name__}: B-cosification converts TimmWrapperForImageClassification.")
    config = wrapper.config
    data_config = getattr(config, "pretrained_cfg", None) or wrapper.timm_model.pretrained_cfg
    names = config.id2label
    labels = {"id2label": dict(names), "label2id": {name: i for i, name in names.items()}} if names else {"num_labels": config.num_labels}
    record = ("timm", config.architecture, {**(config.model_args or {}), "num_classes": config.num_labels})
    return wrapper.timm_model, data_config, labels, record


def timm_data_config(module: nn.Module) -> Optional[dict]:
    """A timm model's ``pretrained_cfg`` (its mean, std and input size), or None for other modules."""
    if not type(module).__module__.startswith("timm.") or "timm" not in sys.modules:
        return None
    config = getattr(module, "pretrained_cfg", None)
    return dict(config) if config else None


def data_config_settings(data_config: dict) -> tuple:
    """(mean, std, (H, W)) of a timm data config."""
    channels, height, width = data_config["input_size"]
    return list(data_config["mean"]), list(data_config["std"]), (int(height), int(width))


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    shapes = lambda m: {k: tuple(t.shape) for k, t in m.state_dict().items()}  # noqa: E731
    return shapes(a) == shapes(b)


def _torchvision_candidates(module: nn.Module) -> list:
    """torchvision's builder names for models of ``module``'s class."""
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    return [name for name in names if torchvision.models.get_model_builder(name).__module__ == type(module).__module__]


def library_record(module: nn.Module, num_classes: int, channels: int) -> Optional[tuple]:
    """(library, architecture, constructor kwargs) that rebuild ``module``'s architecture, checked
    by building it (on the meta device) and comparing every tensor's name and shape; None for a
    module of neither library, or one built with arguments these do not capture."""
    kind = type(module).__module__
    if kind.startswith("timm.") and "timm" in sys.modules:
        import timm

        architecture = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
        if not architecture or not timm.is_model(architecture):
            return None
        kwargs = {"num_classes": num_classes, **({"in_chans": channels} if channels != 3 else {})}
        candidates = [(architecture, kwargs)]
        build = lambda name, kw: timm.create_model(name, pretrained=False, **kw)  # noqa: E731
        library = "timm"
    elif kind.startswith("torchvision.models") and "torchvision" in sys.modules:
        import torchvision.models

        kwargs = {"num_classes": num_classes}
        if hasattr(module, "aux_logits"):  # Inception-v3, GoogLeNet
            kwargs["aux_logits"] = bool(module.aux_logits)
            kwargs["init_weights"] = False  # the weights are loaded; skip the slow initialisation
        candidates = [(name, kwargs) for name in _torchvision_candidates(module)]
        build = lambda name, kw: torchvision.models.get_model(name, weights=None, **kw)  # noqa: E731
        library = "torchvision"
    else:
        return None
    for name, kw in candidates:
        with torch.device("meta"):
            try:
                rebuilt = build(name, kw)
            except (TypeError, ValueError, RuntimeError):
                continue
        if _same_tensors(rebuilt, module):
            return library, name, kw
    return None
