"""Which parts of a vision-language model a run trains, and what a VLM run cannot do.

A VLM is three parts: the vision tower (a ViT), the connector or projector that turns its features into the
language model's embeddings, and the language model. Fine-tuning changes the language model by default, as
LLaMA-Factory and TRL do: the tower was pretrained on far more images than a fine-tuning set holds.
``--tune-projector`` adds the connector, ``--tune-vision`` the tower; a LoRA-family method puts its factors on
their linear layers, full fine-tuning trains their weights.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

# The children of the inner model (``model.model``) that hold each part, under the names transformers uses.
LANGUAGE = ("language_model", "text_model")
VISION = ("visual", "vision_tower", "vision_model")
PROJECTOR = ("multi_modal_projector", "connector", "visual.merger")  # Qwen2-VL's patch merger sits in its tower


def part_prefixes(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Full module-name prefixes (``model.language_model``) of the parts ``model`` has among ``names``."""
    inner = model.get_submodule("model")
    found = []
    for name in names:
        try:
            inner.get_submodule(name)
        except AttributeError:
            continue
        found.append(f"model.{name}")
    return found


def trained_pattern(model: nn.Module, tune_vision: bool, tune_projector: bool) -> str:
    """A regular expression that fully matches the names of the linear layers a run trains: the language
    model's, and the tower's and the projector's when asked (the output head stays out, as with ``all-linear``)."""
    language = part_prefixes(model, LANGUAGE)
    projector = part_prefixes(model, PROJECTOR)
    vision = part_prefixes(model, VISION)
    if not language:
        raise ValueError(f"{type(model).__name__}: no language model found among {', '.join(LANGUAGE)}")
    keep = [re.escape(p) for p in language]
    if tune_projector:
        keep += [re.escape(p) for p in projector]
    if tune_vision:
        # The tower, less a projector inside it (Qwen2-VL's merger) unless that is asked for too.
        inside = [p for p in projector if any(p.startswith(v + ".") for v in vision)]
        skip = "" if tune_projector or not inside else "(?!" + "|".join(re.escape(p) + r"\." for p in inside) + ")"
        keep += [skip + re.escape(v) for v in vision]
    return r"(?:" + "|".join(keep) + r")\..*"


def has_target_modules(config) -> bool:
    """Whether a method config chooses linear layers to wrap (the LoRA family's ``target_modules``)."""
    return any(f.name == "target_modules" for f in dataclasses.fields(config))


def scoped_method_config(model: nn.Module, config, tune_vision: bool, tune_projector: bool):
    """``config`` with ``target_modules: all-linear`` narrowed to the parts the run trains. An explicit list or
    pattern is the user's choice and stays as given."""
    if not has_target_modules(config) or config.target_modules != "all-linear":
        return config
    return dataclasses.replace(config, target_modules=trained_pattern(model, tune_vision, tune_projector))


def freeze_untrained_parts(model: nn.Module, tune_vision: bool, tune_projector: bool) -> None:
    """After full fine-tuning's attach (every weight trainable): the tower and projector back to frozen unless
    asked for."""
    frozen = []
    if not tune_vision:
        frozen += part_prefixes(model, VISION)
    if not tune_projector:
        frozen += part_prefixes(model, PROJECTOR)
    keep = part_prefixes(model, PROJECTOR) if tune_projector else []
    for name, param in model.named_parameters():
        if any(name.startswith(p + ".") for p in frozen) and not any(name.startswith(p + ".") for p in keep):
            param.requires_grad_(False)


def method_refusal(method, config) -> str | None:
    """Why ``method`` cannot train a VLM here, or None: methods that wrap linear layers (the LoRA family, adapters)
    and full fine-tuning can; virtual-token methods would put their tokens before the image tokens, which the
    processors place by position, so they are refused."""
    if method.trains_base_weights or has_target_modules(config):
        return None
    return (f"{method.name} is not supported on vision-language models (its virtual tokens would shift the image "
            "tokens the processor placed); use lora (DoRA: --lora-use-dora true), qlora, adalora or full")


def packing_refusal(model: nn.Module) -> str:
    """Why a VLM's batches are padded rows, never packed ones."""
    if model.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        return ("Qwen2-VL's multimodal rotary position ids are computed per example from its image grid; they cannot "
                "restart inside a packed row")
    return "a vision-language model's images are batched by the processor, one example per row"


def prepare_run(model: nn.Module, tokenizer, method, method_config, *, tune_vision: bool, tune_projector: bool,
                max_image_pixels: int | None):
    """The trainer's one call before attaching a method: for a VLM, the image limit set on its processor, the
    method checked and its targets narrowed; for a text model, the vision options refused. Returns the method
    config to attach."""
    from ..errors import ConfigError
    from .loading import is_vision_model

    if not is_vision_model(model):
        if tune_vision or tune_projector:
            raise ConfigError("--tune-vision / --tune-projector need a vision-language model; this one is text-only")
        return method_config
    reason = method_refusal(method, method_config)
    if reason:
        raise ConfigError(reason)
    tokenizer.max_image_pixels = max_image_pixels
    return scoped_method_config(model, method_config, tune_vision, tune_projector)
