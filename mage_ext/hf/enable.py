"""Switch one model object to the "mage" attention and back.

    model = Qwen2ForCausalLM(cfg)
    enable_mage(model, PolicyConfig(method="mage", k=512))   # only this model changes
    ...
    disable_mage(model)                                       # stock attention again

``enable_mage`` gives the model (and every submodule that shares its config object) a private copy
of the config with ``_attn_implementation = "mage"``, so other models built from the same config
object are untouched; ``disable_mage`` puts the original config object back.
"""
from __future__ import annotations

import copy
from typing import Optional

from ..core.policy import PolicyConfig
from .attention import mage_attention, no_mask

NAME = "mage"


def register() -> None:
    """Registers "mage" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, mage_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface
        AttentionMaskInterface.register(NAME, no_mask)
    except ImportError:  # pragma: no cover - versions without the mask interface
        pass


def enable_mage(model, config: Optional[PolicyConfig] = None):
    """Routes ``model``'s attention through MAGE; ``config`` becomes its default policy."""
    if config is not None and not isinstance(config, PolicyConfig):
        raise TypeError(f"enable_mage: config must be a PolicyConfig or None, got {type(config).__name__}")
    if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
        raise TypeError(f"enable_mage: expected a transformers model with a config, got "
                        f"{type(model).__name__}")
    register()
    if not is_enabled(model):
        original = model.config
        private = copy.deepcopy(original)
        _swap_config(model, original, private)
        private._attn_implementation = NAME
        model._mage_original_config = original
    model._mage_policy = config or getattr(model, "_mage_policy", None) or PolicyConfig()
    return model


def disable_mage(model):
    """Undoes ``enable_mage``: the model gets its original config object back and no default
    policy (a later ``generate`` without one takes PolicyConfig(), not the last call's)."""
    if is_enabled(model):
        _swap_config(model, model.config, model._mage_original_config)
        del model._mage_original_config
        model.__dict__.pop("_mage_policy", None)
    return model


def is_enabled(model) -> bool:
    return getattr(model, "_mage_original_config", None) is not None


def _swap_config(model, old, new) -> None:
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
