"""Block-diffusion generation (Fast-dLLM v2 and SDAR styles) with MAGE or any other policy.

    from mage_ext import generate, load_model, PolicyConfig
    lm = load_model("/ckpt/Fast_dLLM_v2_1.5B", dtype=torch.bfloat16, device="cuda")
    res = generate(lm, None, ["What is 2+2?"], policy=PolicyConfig(method="mage", k=512),
                   max_new_tokens=256)
    print(res.texts[0], res.kv_fraction, res.median_step_time(first=False))

Command line: ``python -m mage_ext.generate --model DIR --prompt "..." --policy mage --k 512``.

The loop (spec section 5): the prompt's full blocks are prefilled (dense, block-causal); the
prompt remainder heads the first generation block. Each denoising step forwards the whole block
with the cache read-only; when the block has no [MASK] left one commit forward writes its KV.
Fast-dLLM v2: token shift (position i is predicted from hidden i-1; position 0 of a block is
always known: the prompt's or the token the previous commit forward predicted), sub-blocks filled
left to right by the threshold rule. SDAR: no shift, ``steps`` steps per block with the
low-confidence static/dynamic rules.

Batches: sequences advance block by block in lockstep with their own cache lengths and
positions. A sequence that finishes early keeps running (its extra forwards change nothing it
returns), so each sequence's tokens equal those of a batch-of-one run (greedy decoding).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import graphs
from .decoding import low_confidence_unmask, sample, threshold_unmask, transfer_schedule
from .hf.cache import MageCache
from .hf.enable import disable_mage, enable_mage, is_enabled
from .policy import PolicyConfig

STYLES = ("fast_dllm", "sdar")
REMASKING = ("low_confidence_static", "low_confidence_dynamic")


@dataclass
class StepRecord:
    block: int      # 0-based generation block (-1: prefill)
    step: int       # step within the block (prefill: chunk index)
    phase: str      # "prefill", "denoise" or "commit"
    first: bool     # the block's first (all-[MASK]) denoising step
    wall_s: float   # host wall time of the forward (device synchronised)
    issue_s: float = 0.0   # host time until the forward call returned (work issued, not done)
    device_s: float = 0.0  # device time of the forward (CUDA events; = wall_s on the CPU)


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
             on_block: Optional[Callable] = None, recall_meter=None, progress: bool = False,
             generator: Optional[torch.Generator] = None, prefix: Optional[Prefix] = None,
             keep_prefix: bool = False, cuda_graphs: bool = False) -> GenerationResult:
    """Generates continuations of ``prompts`` (str or list of str, needs a tokenizer) or
    ``input_ids`` (list of id lists, or a [batch, n] tensor). See the module docstring.

    ``model_or_loaded`` is a transformers Qwen2/Qwen3 causal LM or a ``LoadedModel``; from the
    latter the tokenizer, mask id, stop ids, block size and style default. ``on_block(i, ids)``
    gets each finished block's ids [batch, B]; ``recall_meter.record(...)`` is called by the
    attention after every later denoising step (see mage_ext/hf/attention.py).
    ``keep_prefix=True`` returns the prefilled prompt in ``result.prefix``; ``prefix=`` reuses
    one (same prompts, block size and style) instead of prefilling again.
    ``cuda_graphs=True`` replays the repeated denoising forwards as a CUDA graph (CUDA model,
    exact or fixed-budget mage policy; see mage_ext/graphs.py): same tokens, far less host time.
    """
    model, tokenizer, mask_id, stop_ids, block_size, style = _resolve(
        model_or_loaded, tokenizer, mask_id, stop_ids, block_size, style)
    policy = policy or getattr(model, "_mage_policy", None) or PolicyConfig()
    seqs = _prompt_ids(prompts, input_ids, tokenizer)
    _check_args(model, seqs, style, block_size, sub_block, threshold, max_new_tokens, steps,
                remasking, policy)
    if prefix is not None:
        _check_prefix(prefix, seqs, block_size, style)
    if cuda_graphs:
        graphs.check(policy, next(model.parameters()).device, recall_meter)
    was_enabled = is_enabled(model)
    if not was_enabled:
        enable_mage(model, policy)
    try:
        with torch.no_grad():
            run = _Run(model, seqs, policy, style, block_size, sub_block, threshold,
                       max_new_tokens, temperature, top_p, set(stop_ids), mask_id, steps,
                       remasking, on_block, recall_meter, progress, generator, cuda_graphs)
            if prefix is None:
                run.prefill()
            else:
                run.restore(prefix)
            kept = run.snapshot() if keep_prefix else None
            run.blocks()
    finally:
        if not was_enabled:
            disable_mage(model)
    texts = None
    if tokenizer is not None:
        texts = [_decode(tokenizer, ids) for ids in run.out]
    return GenerationResult(run.out, texts, run.stopped, run.records, run.cache.kv_fraction(),
                            kept)


class _Run:
    """State of one generation; methods are the phases of the loop."""

    def __init__(self, model, seqs, policy, style, block_size, sub_block, threshold,
                 max_new_tokens, temperature, top_p, stop_ids, mask_id, steps, remasking,
                 on_block, recall_meter, progress, generator, cuda_graphs=False):
        self.model, self.seqs, self.style, self.B = model, seqs, style, block_size
        self.policy = policy
        self.graph = graphs.StepGraph(lambda ids: self._logits(ids, False)) if cuda_graphs else None
        self.sub_block, self.threshold, self.max_new = sub_block, threshold, max_new_tokens
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.stop_ids, self.mask_id, self.steps, self.remasking = stop_ids, mask_id, steps, remasking
        self.on_block, self.progress = on_block, progress
        self.device = next(model.parameters()).device
        batch, B = len(seqs), block_size
        self.full = [len(s) // B for s in seqs]
        self.rem = [len(s) % B for s in seqs]
        n_blocks = -(-(max_new_tokens + max(self.rem)) // B) + 1
        capacity = max(self.full) * B + n_blocks * B
        self.cache = MageCache.for_model(model, batch, capacity, policy)
        self.cache.recall_meter = recall_meter
        self.cache.steps_hint = steps if style == "sdar" else None
        self.kw = self.cache.forward_kwargs(model)
        self.out = [[] for _ in seqs]
        self.stopped = [False] * batch
        self.records: list = []
        # the first block: prompt remainder then [MASK]s (Fast-dLLM: + token from prefill)
        self.x = torch.full((batch, B), mask_id, dtype=torch.long, device=self.device)
        for b, s in enumerate(seqs):
            if self.rem[b]:
                self.x[b, :self.rem[b]] = torch.tensor(s[len(s) - self.rem[b]:], device=self.device)
        self.gen_start = list(self.rem)  # first generated position of the current block

    # -- forwards ---------------------------------------------------------------------------
    def _logits(self, ids, last_only: bool):
        pos = self.cache.cache_lens.long().unsqueeze(1) + torch.arange(self.B, device=self.device)
        logits = self.model(input_ids=ids, position_ids=pos, logits_to_keep=1 if last_only else 0,
                            **self.kw).logits
        logits[..., self.mask_id] = float("-inf")  # [MASK] is never an output token
        return logits

    def _forward(self, ids, record: StepRecord, last_only: bool, graph=None):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            events[0].record()
        t0 = time.perf_counter()
        logits = graph(ids) if graph is not None else self._logits(ids, last_only)
        self.cache.end_forward()
        record.issue_s = time.perf_counter() - t0
        if cuda:
            events[1].record()
            torch.cuda.synchronize(self.device)
        record.wall_s = time.perf_counter() - t0
        record.device_s = events[0].elapsed_time(events[1]) / 1e3 if cuda else record.wall_s
        self.records.append(record)
        return logits

    def prefill(self):
        B, n = self.B, max(self.full)
        for i in range(n):
            advance = torch.tensor([f > i for f in self.full], device=self.device)
            ids = self.x.new_full((len(self.seqs), B), self.mask_id)  # scratch rows: never kept
            for b, s in enumerate(self.seqs):
                if self.full[b] > i:
                    ids[b] = torch.tensor(s[i * B:(i + 1) * B], device=self.device)
            self.cache.begin_prefill(advance)
            logits = self._forward(ids, StepRecord(-1, i, "prefill", False, 0.0), last_only=True)
            if self.progress:
                print(f"\rprefill {(i + 1) * B}/{n * B} tokens", end="", file=sys.stderr)
            if self.style == "fast_dllm":  # the token after a block-aligned prompt
                tok, _ = sample(logits[:, -1], self.temperature, self.top_p, self.generator)
                for b in range(len(self.seqs)):
                    if self.rem[b] == 0 and self.full[b] == i + 1:
                        self.x[b, 0] = tok[b]
        if self.progress and n:
            print(file=sys.stderr)

    def snapshot(self) -> Prefix:
        keys, values, lens = self.cache.copy_filled()
        return Prefix([list(q) for q in self.seqs], self.B, self.style, keys, values, lens,
                      self.x.clone(), list(self.records))

    def restore(self, p: Prefix):
        self.cache.load_filled(p.keys, p.values, p.cache_lens)
        self.x = p.first_block.clone().to(self.device)
        self.records.extend(p.records)

    def blocks(self):
        block = 0
        while True:
            self.cache.begin_block()
            if self.style == "fast_dllm":
                self._denoise_fast_dllm(block)
            else:
                self._denoise_sdar(block)
            if self.on_block is not None:
                self.on_block(block, self.x.clone())
            if self._collect():
                return
            self.cache.begin_step(commit=True)
            logits = self._forward(self.x, StepRecord(block, self.cache.step, "commit", False, 0.0),
                                   last_only=True)
            nxt = torch.full_like(self.x, self.mask_id)
            if self.style == "fast_dllm":  # the commit forward yields the next block's first token
                nxt[:, 0], _ = sample(logits[:, -1], self.temperature, self.top_p, self.generator)
            self.x, self.gen_start = nxt, [0] * len(self.seqs)
            block += 1
            if self.progress:
                print(f"\rblock {block}: {min(len(o) for o in self.out)} tokens", end="",
                      file=sys.stderr)

    def _step_logits(self, block):
        self.cache.begin_step()
        step = self.cache.step
        graph = self.graph if self.graph is not None and graphs.graphed_step(self.policy, step) \
            else None
        return self._forward(self.x, StepRecord(block, step, "denoise", step == 0, 0.0), False,
                             graph)

    def _denoise_fast_dllm(self, block):
        for start in range(0, self.B, self.sub_block):
            end = start + self.sub_block
            while bool((self.x[:, start:end] == self.mask_id).any()):
                logits = self._step_logits(block)
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)[:, start:end]
                tok, p = sample(logits, self.temperature, self.top_p, self.generator)
                masked = self.x[:, start:end] == self.mask_id
                pick = threshold_unmask(p, masked, self.threshold)
                self.x[:, start:end] = torch.where(pick, tok, self.x[:, start:end])

    def _denoise_sdar(self, block):
        dynamic = self.remasking == "low_confidence_dynamic"
        for n in transfer_schedule(self.B, self.steps):
            masked = self.x == self.mask_id
            if not bool(masked.any()):
                break
            tok, p = sample(self._step_logits(block), self.temperature, self.top_p, self.generator)
            pick = low_confidence_unmask(p, masked, n, dynamic, self.threshold)
            self.x = torch.where(pick, tok, self.x)
        if bool((self.x == self.mask_id).any()):  # cannot happen: the schedule sums to B
            raise RuntimeError("SDAR schedule left [MASK] tokens in the block")

    def _collect(self) -> bool:
        """Appends the block's generated tokens; True when every sequence is done."""
        rows = self.x.tolist()
        for b, row in enumerate(rows):
            if self.stopped[b] or len(self.out[b]) >= self.max_new:
                continue
            for t in row[self.gen_start[b]:]:
                if t in self.stop_ids:
                    self.stopped[b] = True
                    break
                self.out[b].append(t)
                if len(self.out[b]) >= self.max_new:
                    break
        return all(s or len(o) >= self.max_new for s, o in zip(self.stopped, self.out))


# -- inputs -------------------------------------------------------------------------------------

def _resolve(obj, tokenizer, mask_id, stop_ids, block_size, style):
    model = obj
    if hasattr(obj, "model") and hasattr(obj, "family") and hasattr(obj, "mask_id"):
        model = obj.model
        tokenizer = tokenizer if tokenizer is not None else obj.tokenizer
        mask_id = mask_id if mask_id is not None else obj.mask_id
        stop_ids = stop_ids if stop_ids is not None else obj.stop_ids
        block_size = block_size or obj.block_size
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
    return (model, tokenizer, int(mask_id), [int(s) for s in stop_ids], block_size or 32,
            style or "fast_dllm")


def _prompt_ids(prompts, input_ids, tokenizer) -> list:
    if (prompts is None) == (input_ids is None):
        raise ValueError("generate: pass exactly one of prompts (text) or input_ids")
    if prompts is not None:
        if tokenizer is None:
            raise ValueError("generate: text prompts need a tokenizer (or pass input_ids)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seqs = [_encode(tokenizer, p) for p in prompts]
    elif isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"generate: input_ids tensor must be [batch, n], got shape "
                             f"{tuple(input_ids.shape)}")
        seqs = input_ids.tolist()
    else:
        seqs = [list(map(int, s)) for s in input_ids]
    if not seqs:
        raise ValueError("generate: no prompts given")
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"generate: prompt {i} is empty (at least one token is needed)")
    return seqs


def _check_prefix(p, seqs, block_size, style):
    if not isinstance(p, Prefix):
        raise TypeError(f"generate: prefix must be a Prefix (result.prefix of keep_prefix=True), "
                        f"got {type(p).__name__}")
    if p.seqs != seqs or p.block_size != block_size or p.style != style:
        raise ValueError("generate: prefix was prefilled for other prompts, block size or style "
                         f"(block {p.block_size} / {block_size}, style {p.style} / {style})")


def _check_args(model, seqs, style, block_size, sub_block, threshold, max_new_tokens, steps,
                remasking, policy):
    if style not in STYLES:
        raise ValueError(f"generate: style must be one of {STYLES}, got '{style}'")
    if not isinstance(policy, PolicyConfig):
        raise TypeError(f"generate: policy must be a PolicyConfig, got {type(policy).__name__}")
    if block_size <= 0:
        raise ValueError(f"generate: block_size must be > 0, got {block_size}")
    if style == "fast_dllm" and (sub_block <= 0 or block_size % sub_block):
        raise ValueError(f"generate: sub_block ({sub_block}) must be > 0 and divide block_size "
                         f"({block_size})")
    if style == "fast_dllm" and block_size < 2:
        raise ValueError("generate: fast_dllm style needs block_size >= 2 (position 0 is known)")
    if style == "sdar" and not 1 <= steps <= block_size:
        raise ValueError(f"generate: steps must lie in [1, block_size={block_size}], got {steps}")
    if remasking not in REMASKING:
        raise ValueError(f"generate: remasking must be one of {REMASKING}, got '{remasking}'")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"generate: threshold must lie in [0, 1], got {threshold}")
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be > 0, got {max_new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(s) for s in seqs)
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


# -- command line ------------------------------------------------------------------------------

def main(argv=None) -> None:
    from .hf.checkpoint import load_model

    ap = argparse.ArgumentParser(prog="python -m mage_ext.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    ap.add_argument("--policy", default="mage", help="exact|mage|quest|tidal|sparsed")
    ap.add_argument("--k", type=int, default=512, help="KV budget per layer and KV head")
    ap.add_argument("--adaptive", action="store_true", help="adaptive per-layer budgets")
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--commit-attention", default="sparse", choices=["sparse", "exact"])
    ap.add_argument("--style", choices=STYLES, default=None, help="default: from the checkpoint")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--sub-block", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=4, help="SDAR steps per block")
    ap.add_argument("--remasking", choices=REMASKING, default="low_confidence_static")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay the repeated denoising forwards as a CUDA graph")
    a = ap.parse_args(argv)
    lm = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    policy = PolicyConfig(method=a.policy, k=a.k, adaptive=a.adaptive,
                          dense_layers=a.dense_layers, commit_attention=a.commit_attention)
    res = generate(lm, None, a.prompt, policy=policy, style=a.style, block_size=a.block_size,
                   sub_block=a.sub_block, threshold=a.threshold, steps=a.steps,
                   remasking=a.remasking, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_p=a.top_p, progress=True,
                   cuda_graphs=a.cuda_graphs)
    for text in res.texts or [str(ids) for ids in res.token_ids]:
        print(text)
        print("-" * 40)
    first, later = res.median_step_time(True), res.median_step_time(False)
    fmt = lambda t: "n/a" if t is None else f"{t * 1e3:.2f} ms"  # noqa: E731
    print(f"steps: first {fmt(first)}, later {fmt(later)} (median); KV read {res.kv_fraction:.3f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
