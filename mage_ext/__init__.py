"""MAGE: [MASK]-guided sparse attention for long-context block-diffusion LLMs.

Importing this package loads the compiled library, which registers torch.ops.mage.*. The ops and
``PolicyConfig`` load eagerly; the generation API (``generate``, ``load_model``, ``MageCache``,
``enable_mage`` ...) loads transformers on first use, so ``import mage_ext`` for the ops alone
does not import transformers.
"""
import importlib

import torch  # noqa: F401  (the library links against torch's shared libraries)

from . import _C  # noqa: F401  (loads the library: registers torch.ops.mage.*)
from . import ops
from .ops import (
    append_kv,
    attention_with_scores,
    block_attention,
    block_sparse_attention,
    check_errors,
    check_selection,
    dense_attention,
    sparse_attention,
    topk_select,
)
from .core.policy import PolicyConfig

__version__ = "0.1.0"

# name -> module that defines it, imported on first access
_LAZY = {
    "generate": "generation",
    "GenerationResult": "generation",
    "Prefix": "generation",
    "MageCache": "hf.cache",
    "LoadedModel": "hf.checkpoint",
    "load_model": "hf.checkpoint",
    "enable_mage": "hf.enable",
    "disable_mage": "hf.enable",
}

__all__ = [
    "ops",
    "attention_with_scores",
    "dense_attention",
    "sparse_attention",
    "block_sparse_attention",
    "topk_select",
    "append_kv",
    "block_attention",
    "check_selection",
    "check_errors",
    "cuda_kernels_built",
    "PolicyConfig",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mage_ext' has no attribute '{name}'")


def cuda_kernels_built() -> bool:
    """True when this build of the library holds the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mage::dense_attention_out", "CUDA")
