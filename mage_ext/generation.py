"""Block-diffusion generation (Fast-dLLM v2 and SDAR styles) with MAGE or any other policy.

    from mage_ext import generate, load_model, PolicyConfig
    lm = load_model("/ckpt/Fast_dLLM_v2_1.5B", dtype=torch.bfloat16, device="cuda")
    res = generate(lm, None, ["What is 2+2?"], policy=PolicyConfig(method="mage", k=512),
                   max_new_tokens=256)
    print(res.texts[0], res.kv_fraction, res.median_step_time(first=False))

Command line: ``python -m mage_ext.generate --model DIR --prompt "..." --policy mage --k 512``.

This module wires the pieces together: the prompt ids, a ``MageCache`` for the model, a forward
adapter (mage_ext/hf) and the block loop (mage_ext/core/loop.py, which documents the decoding).
On a CUDA model the forwards of a block replay as CUDA graphs by default (``cuda_graphs=None``);
features that need eager forwards (a recall meter, the baselines, adaptive budgets) fall back
with a one-line warning.

Under torch.distributed with more than one rank (``torchrun --nproc-per-node N``) the model is
tensor-parallel by default: its KV heads, KV cache and MLP are split over the ranks
(mage_ext/hf/tensor_parallel.py) and every rank returns the same result.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .core import graphs
from .core.loop import (DEFAULT_PREFILL_CHUNK, BlockLoop, DecodeConfig, StepRecord,
                        n_blocks_needed)
from .core.policy import PolicyConfig
from .hf.cache import MageCache
from .hf.enable import disable_mage, enable_mage, is_enabled
from .hf import fast_forward, tensor_parallel
from .hf.forward import HFForward
from .prompt_checks import warn_about_prompts

STYLES = ("fast_dllm", "sdar")
REMASKING = ("low_confidence_static", "low_confidence_dynamic")


@dataclass
class Prefix:
    """The prefilled prompt of one generation: pass it as ``generate(..., prefix=p)`` to decode
    the same prompts again (another policy, budget or sampling seed) without prefilling.

    The prefill is dense and the same for every policy, so reusing it changes no result; the
    evaluation harness prefills each batch once for all its methods.
    """
    seqs: list            # the prompts' ids (checked against the prompts of the reuse)
    block_size: int
    style: str
    keys: list            # per layer [batch, Hkv, n, d], n = longest prefilled length
    values: list
    cache_lens: Tensor    # int32 [batch]
    first_block: Tensor   # the first generation block's tokens before denoising [batch, B]
    records: list         # StepRecords of the prefill forwards


@dataclass
class GenerationResult:
    token_ids: list                    # generated ids per prompt, ending before the first stop id
    texts: Optional[list]              # decoded token_ids when a tokenizer was given
    stopped: list                      # True where a stop id ended the sequence
    steps: list = field(default_factory=list)   # StepRecord per forward
    kv_fraction: float = 1.0           # share of the cache read by denoise/commit forwards
    prefix: Optional["Prefix"] = None  # the prefilled prompt, when keep_prefix=True

    def median_step_time(self, first: bool) -> Optional[float]:
        """Median wall time of the first (first=True) or later denoising steps of the blocks."""
        t = [r.wall_s for r in self.steps if r.phase == "denoise" and r.first == first]
        return median(t) if t else None


def generate(model_or_loaded, tokenizer=None, prompts=None, *, input_ids=None,
             policy: Optional[PolicyConfig] = None, style: Optional[str] = None,
             block_size: Optional[int] = None, sub_block: int = 8, threshold: float = 0.9,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: Optional[Sequence[int]] = None, mask_id: Optional[int] = None,
             steps: int = 4, remasking: str = "low_confidence_static",
             fixed_steps: Optional[int] = None,
             on_block: Optional[Callable] = None, recall_meter=None, progress: bool = False,
             generator: Optional[torch.Generator] = None, prefix: Optional[Prefix] = None,
             keep_prefix: bool = False, cuda_graphs: Optional[bool] = None,
             fused: Optional[bool] = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             tp=None) -> GenerationResult:
    """Generates continuations of ``prompts`` (str or list of str, needs a tokenizer) or
    ``input_ids`` (list of id lists, or a [batch, n] tensor). See the module docstring.

    ``model_or_loaded`` is a transformers Qwen2/Qwen3 causal LM or a ``LoadedModel``; from the
    latter the tokenizer, mask id, stop ids, block size and style default. ``on_block(i, ids)``
    gets each finished block's ids [batch, B]; ``recall_meter.record(...)`` is called by the
    attention after every later denoising step (see mage_ext/eval/recall.py).
    ``fixed_steps=N`` (Fast-dLLM v2 style) runs exactly N denoising forwards per block, each
    filling an even share of the [MASK]s left, most confident first, instead of the threshold
    rule (benchmarks use it: the forward count no longer depends on confidences).
    ``keep_prefix=True`` returns the prefilled prompt in ``result.prefix``; ``prefix=`` reuses
    one (same prompts, block size and style) instead of prefilling again.
    ``cuda_graphs``: None (default) replays the forwards of a block as CUDA graphs where the
    model is on a GPU and nothing needs eager forwards (else eager, with a warning on a GPU);
    True insists (an error names the obstacle); False runs eagerly. Same tokens either way.
    ``prefill_chunk``: prompt tokens per prefill forward (rounded down to whole blocks; the
    blocks of a chunk attend block-causally, so the value changes no result, only speed/memory).
    ``fused``: None (default) runs Qwen2 / Qwen3 models through the lean fused forward
    (mage_ext/hf/fast_forward.py) on a GPU and the stock transformers forward on the CPU; True /
    False force one (True errors for a model the fused forward does not cover).
    ``tp``: tensor parallelism over torch.distributed (mage_ext/hf/tensor_parallel.py). None
    (default): the model's sharding if it has one, else when torch.distributed is initialised
    with more than one rank the model is sharded over all of them on first use (in place; call
    ``generate`` on every rank with the same arguments); False: none (e.g. data-parallel ranks
    with prompts of their own); True: over the world; a ProcessGroup or 1-D DeviceMesh: over
    it. Every rank returns the same result; a ``Prefix`` holds its rank's KV heads.
    """
    model, tokenizer, mask_id, stop_ids, block_size, style = _resolve(
        model_or_loaded, tokenizer, mask_id, stop_ids, block_size, style)
    policy = policy or getattr(model, "_mage_policy", None) or PolicyConfig()
    seqs = _prompt_ids(prompts, input_ids, tokenizer)
    _check_args(model, seqs, style, block_size, sub_block, threshold, max_new_tokens, steps,
                remasking, policy, fixed_steps, prefill_chunk)
    _check_sampling(temperature, top_p)
    _check_token_ids(model, seqs, mask_id, stop_ids)
    texts = None if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)
    warn_about_prompts(model_or_loaded, tokenizer, texts, seqs, style, block_size)
    if prefix is not None:
        _check_prefix(prefix, seqs, block_size, style)
    device = next(model.parameters()).device
    tp_group = tensor_parallel.resolve(model, tp)
    if tp_group is not None and recall_meter is not None:
        raise ValueError("generate: a recall meter is not supported under tensor parallelism "
                         "(each rank holds only its KV heads); run it in one process")
    use_fused = _use_fused(model, fused, device)
    use_graphs = _use_graphs(cuda_graphs, policy, device, recall_meter, temperature, generator,
                             stock_tp=tp_group is not None and not use_fused)
    cfg = DecodeConfig(style=style, block_size=block_size, mask_id=mask_id,
                       stop_ids=set(stop_ids), max_new_tokens=max_new_tokens,
                       sub_block=sub_block, threshold=threshold, fixed_steps=fixed_steps,
                       steps=steps, remasking=remasking, temperature=temperature, top_p=top_p,
                       generator=generator)
    was_enabled = is_enabled(model)
    if not was_enabled:
        enable_mage(model, policy)
    try:
        with torch.no_grad():
            B = block_size
            full, rem = [len(s) // B for s in seqs], [len(s) % B for s in seqs]
            capacity = max(full) * B + n_blocks_needed(max_new_tokens, rem, B) * B
            cache = MageCache.for_model(model, len(seqs), capacity, policy)
            cache.recall_meter = recall_meter
            cache.steps_hint = steps if style == "sdar" else None
            forward = (fast_forward.FastForward if use_fused else HFForward)(model, cache)
            progress = progress and (tp_group is None or tp_group.rank == 0)
            loop = BlockLoop(forward, cache, seqs, cfg, policy=policy,
                             on_block=on_block, progress=progress, use_graphs=use_graphs,
                             prefill_chunk=prefill_chunk)
            if prefix is None:
                loop.prefill()
            else:
                _restore(loop, prefix)
            kept = _snapshot(loop) if keep_prefix else None
            loop.blocks()
    finally:
        if not was_enabled:
            disable_mage(model)
    if tp_group is not None:  # the decoding ran replicated: make sure it stayed so
        tp_group.check_same((loop.out, loop.stopped), "the generated tokens", device)
    texts = None
    if tokenizer is not None:
        texts = [_decode(tokenizer, ids) for ids in loop.out]
    return GenerationResult(loop.out, texts, loop.stopped, loop.records, cache.kv_fraction(),
                            kept)


def _use_graphs(cuda_graphs, policy, device, recall_meter, temperature, generator,
                stock_tp: bool = False) -> bool:
    why = graphs.obstacle(policy, device, recall_meter, temperature, generator, stock_tp)
    if cuda_graphs and why is not None:
        raise ValueError(f"generate: cuda_graphs=True {why}")
    if cuda_graphs is None and why is not None and device.type == "cuda":
        warnings.warn(f"generate: running eager forwards (no CUDA graphs): the graphed path {why}",
                      stacklevel=3)
    return why is None and cuda_graphs is not False


def _use_fused(model, fused, device) -> bool:
    why = fast_forward.unsupported(model)
    if fused and why is not None:
        raise ValueError(f"generate: fused=True but the fused forward does not cover this model: "
                         f"{why}")
    return bool(fused or (fused is None and why is None and device.type == "cuda"))


def _forward(model, cache, fused, device):
    """The forward adapter ``generate`` picks for ``fused`` (benchmarks call it too)."""
    if _use_fused(model, fused, device):
        return fast_forward.FastForward(model, cache)
    return HFForward(model, cache)


def _snapshot(loop: BlockLoop) -> Prefix:
    keys, values, lens = loop.cache.copy_filled()
    return Prefix([list(q) for q in loop.seqs], loop.B, loop.cfg.style, keys, values, lens,
                  loop.x.clone(), list(loop.records))


def _restore(loop: BlockLoop, p: Prefix) -> None:
    loop.cache.load_filled(p.keys, p.values, p.cache_lens)
    loop.x.copy_(p.first_block.to(loop.device))
    loop.records.extend(p.records)


# -- inputs -------------------------------------------------------------------------------------

def _resolve(obj, tokenizer, mask_id, stop_ids, block_size, style):
    model = obj
    if hasattr(obj, "model") and hasattr(obj, "family") and hasattr(obj, "mask_id"):
        model = obj.model
        tokenizer = tokenizer if tokenizer is not None else obj.tokenizer
        mask_id = mask_id if mask_id is not None else obj.mask_id
        stop_ids = stop_ids if stop_ids is not None else obj.stop_ids
        block_size = block_size if block_size is not None else obj.block_size
        style = style or obj.family
    if not hasattr(model, "config") or not hasattr(model, "forward"):
        raise TypeError(f"generate: expected a transformers causal LM or a LoadedModel, got "
                        f"{type(obj).__name__}")
    if mask_id is None:
        mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("generate: mask_id is unknown; pass mask_id=..., a LoadedModel, or a "
                         "model whose config has mask_token_id")
    if stop_ids is None:
        eos = getattr(model.config, "eos_token_id", None)
        stop_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return (model, tokenizer, int(mask_id), [int(s) for s in stop_ids],
            32 if block_size is None else block_size, style or "fast_dllm")


def _prompt_ids(prompts, input_ids, tokenizer) -> list:
    if (prompts is None) == (input_ids is None):
        raise ValueError("generate: pass exactly one of prompts (text) or input_ids")
    if prompts is not None:
        if tokenizer is None:
            raise ValueError("generate: text prompts need a tokenizer (or pass input_ids)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"generate: prompt {i} is a {type(p).__name__}, expected a str "
                                "(pass token ids as input_ids)")
        seqs = [_encode(tokenizer, p) for p in prompts]
    elif isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"generate: input_ids tensor must be [batch, n], got shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"generate: input_ids must hold integer token ids, got dtype "
                            f"{input_ids.dtype}")
        seqs = input_ids.tolist()
    else:
        seqs = [_int_ids(s, i) for i, s in enumerate(input_ids)]
    if not seqs:
        raise ValueError("generate: no prompts given")
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"generate: prompt {i} is empty (at least one token is needed)")
    return seqs


def _int_ids(seq, i: int) -> list:
    """Prompt i's ids as ints; floats (1.7) or strings are errors, not silently truncated."""
    try:
        return [operator.index(t) for t in seq]
    except TypeError:
        raise TypeError(f"generate: input_ids[{i}] must be a sequence of integer token ids, got "
                        f"{type(seq).__name__} {str(seq)[:60]}") from None


def _vocab_size(model) -> Optional[int]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    return int(n) if n is not None else None


def _check_token_ids(model, seqs, mask_id, stop_ids) -> None:
    """Every id the loop feeds or compares lies in the vocabulary: an id past the embedding
    would fail inside the model (on a GPU as a device-side assert that ends the process)."""
    vocab = _vocab_size(model)
    if vocab is None:
        return
    if not 0 <= mask_id < vocab:
        raise ValueError(f"generate: mask_id {mask_id} is outside the vocabulary [0, {vocab})")
    for s in stop_ids:
        if not 0 <= s < vocab:
            raise ValueError(f"generate: stop id {s} is outside the vocabulary [0, {vocab}) "
                             "(it could never end a sequence)")
    for i, seq in enumerate(seqs):
        t = torch.tensor(seq, dtype=torch.long)
        bad = (t < 0) | (t >= vocab)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(f"generate: prompt {i} holds token id {seq[j]} at position {j}, "
                             f"outside the vocabulary [0, {vocab})")


def _check_sampling(temperature, top_p) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0: greedy), got "
                         f"{temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p}")


def _check_prefix(p, seqs, block_size, style):
    if not isinstance(p, Prefix):
        raise TypeError(f"generate: prefix must be a Prefix (result.prefix of keep_prefix=True), "
                        f"got {type(p).__name__}")
    if p.seqs != seqs or p.block_size != block_size or p.style != style:
        raise ValueError("generate: prefix was prefilled for other prompts, block size or style "
                         f"(block {p.block_size} / {block_size}, style {p.style} / {style})")


def _check_args(model, seqs, style, block_size, sub_block, threshold, max_new_tokens, steps,
                remasking, policy, fixed_steps=None,
                prefill_chunk=DEFAULT_PREFILL_CHUNK):
    if style not in STYLES:
        raise ValueError(f"generate: style must be one of {STYLES}, got '{style}'")
    if not isinstance(policy, PolicyConfig):
        raise TypeError(f"generate: policy must be a PolicyConfig, got {type(policy).__name__}")
    policy.budget(0, model.config.num_hidden_layers)  # per-layer budgets: one per layer
    for name, value in (("block_size", block_size), ("max_new_tokens", max_new_tokens),
                        ("sub_block", sub_block), ("steps", steps)):
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"generate: {name} must be an int, got {value!r}")
    if block_size <= 0:
        raise ValueError(f"generate: block_size must be > 0, got {block_size}")
    if style == "fast_dllm" and (sub_block <= 0 or block_size % sub_block):
        raise ValueError(f"generate: sub_block ({sub_block}) must be > 0 and divide block_size "
                         f"({block_size})")
    if style == "fast_dllm" and block_size < 2:
        raise ValueError("generate: fast_dllm style needs block_size >= 2 (position 0 is known)")
    if style == "sdar" and not 1 <= steps <= block_size:
        raise ValueError(f"generate: steps must lie in [1, block_size={block_size}], got {steps}")
    if fixed_steps is not None and (style != "fast_dllm" or not 1 <= fixed_steps <= block_size):
        raise ValueError(f"generate: fixed_steps applies to the fast_dllm style and must lie in "
                         f"[1, block_size={block_size}], got {fixed_steps} (style '{style}')")
    if remasking not in REMASKING:
        raise ValueError(f"generate: remasking must be one of {REMASKING}, got '{remasking}'")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"generate: threshold must lie in [0, 1], got {threshold}")
    if not isinstance(prefill_chunk, int) or prefill_chunk <= 0:
        raise ValueError(f"generate: prefill_chunk must be a positive int, got {prefill_chunk!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be > 0, got {max_new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(s) for s in seqs)
    if limit is not None and longest > limit:
        i = max(range(len(seqs)), key=lambda j: len(seqs[j]))
        raise ValueError(f"generate: prompt {i} has {longest} tokens, more than the model's "
                         f"max_position_embeddings ({limit})")
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"generate: longest prompt ({longest}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds max_position_embeddings ({limit})")


def _encode(tokenizer, text: str) -> list:
    enc = tokenizer.encode(text)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


def _decode(tokenizer, ids) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(ids)
