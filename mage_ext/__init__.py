"""MAGE: [MASK]-guided sparse attention for long-context block-diffusion LLMs.

Importing this package loads the compiled library, which registers torch.ops.mage.*.
"""
import torch  # noqa: F401  (the library links against torch's shared libraries)

from . import _C  # noqa: F401  (loads the library: registers torch.ops.mage.*)
from . import ops
from .ops import (
    append_kv,
    attention_with_scores,
    check_selection,
    dense_attention,
    sparse_attention,
    topk_select,
)

__version__ = "0.1.0"

__all__ = [
    "ops",
    "attention_with_scores",
    "dense_attention",
    "sparse_attention",
    "topk_select",
    "append_kv",
    "check_selection",
    "cuda_kernels_built",
]


def cuda_kernels_built() -> bool:
    """True when this build of the library holds the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mage::dense_attention_out", "CUDA")
