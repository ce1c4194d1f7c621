"""Tiny random Qwen2 / Qwen3 causal LMs for the transformers-level tests (no downloads).

Weights are drawn with a large init range so logits are peaked: greedy decoding then has clear
winners and two correct attention paths give the same tokens.
"""
from __future__ import annotations

import pytest
import torch

VOCAB = 64
MASK_ID = VOCAB - 1


def tiny_config(family: str = "qwen2", layers: int = 4, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 8, max_pos: int = 512, **extra):
    from transformers import Qwen2Config, Qwen3Config

    cls = Qwen2Config if family == "qwen2" else Qwen3Config
    kw = dict(vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=48,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=max_pos, initializer_range=0.3, rope_theta=10000.0,
              tie_word_embeddings=False, mask_token_id=MASK_ID, eos_token_id=None)
    if family == "qwen3":
        kw["head_dim"] = head_dim
    kw.update(extra)
    cfg = cls(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_model(family: str = "qwen2", seed: int = 0, **kw):
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if family == "qwen2" else Qwen3ForCausalLM
    return cls(tiny_config(family, **kw)).eval()


def block_causal_logits(model, tokens, block: int) -> torch.Tensor:
    """Stock-attention (sdpa) logits of one sequence, no cache, block-causal mask: position i
    sees j when j // block <= i // block (the x_0 semantics of block diffusion). [n, V]."""
    pos = torch.arange(len(tokens))
    allowed = (pos[None, :] // block) <= (pos[:, None] // block)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), position_ids=pos[None],
                    attention_mask={"full_attention": allowed[None, None],
                                    "sliding_attention": allowed[None, None]})
    logits = out.logits[0].float()
    logits[:, MASK_ID] = float("-inf")
    return logits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Autouse in the modules that import it: the CPU kernels' thread pool costs ~25 ms a call on
    a loaded 2-core machine, and these tiny shapes gain nothing from threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
