"""MAGE: [MASK]-guided sparse attention for long-context block-diffusion LLMs.

Importing this package loads the compiled library, which registers torch.ops.mage.*.
"""
import torch  # noqa: F401  (the library links against torch's shared libraries)

from . import _C  # noqa: F401  (loads the library: registers torch.ops.mage.*)
from . import ops
from .ops import (
    append_kv,
    attention_with_scores,
    block_attention,
    check_selection,
    dense_attention,
    sparse_attention,
    topk_select,
)

from .policy import PolicyConfig
# The function generate shadows its module (python -m mage_ext.generate still works); importing
# it here, once, keeps mage_ext.generate the function however the module was first imported.
from .generate import GenerationResult, generate
from .hf.cache import MageCache
from .hf.checkpoint import LoadedModel, load_model
from .hf.enable import disable_mage, enable_mage

__version__ = "0.1.0"

__all__ = [
    "ops",
    "attention_with_scores",
    "dense_attention",
    "sparse_attention",
    "topk_select",
    "append_kv",
    "block_attention",
    "check_selection",
    "cuda_kernels_built",
    "PolicyConfig",
    "generate",
    "GenerationResult",
    "MageCache",
    "LoadedModel",
    "load_model",
    "enable_mage",
    "disable_mage",
]


def cuda_kernels_built() -> bool:
    """True when this build of the library holds the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mage::dense_attention_out", "CUDA")
