"""The block-diffusion loop (Fast-dLLM v2 and SDAR styles) over a model ``forward`` callable.

``forward(ids [batch, n], keep) -> logits`` runs the model with the ``GenerationCache``
(positions follow ``cache.cache_lens``; the adapters live in mage_ext/hf): keep None gives every
position's logits [batch, n, V], a LongTensor [batch] one position per sequence [batch, 1, V].
The loop (spec section 5): the prompt's full blocks are prefilled, many blocks per forward
(``prefill_chunk`` tokens, block-causal inside the chunk); the prompt remainder heads the first
generation block; each denoising step forwards the whole block with the cache read-only; when
the block has no [MASK] left one commit forward writes its KV.

Everything inside a block runs on the device: the decoding rule of a step (sampling, which
[MASK] positions to fill) updates the block's tokens in place, so a step is the same work every
time and replays as a CUDA graph (``StepGraph``). The host learns when the block is finished
from a 4-byte count of [MASK]s left, copied to pinned memory after each step and polled with an
event query (no torch synchronisation call); the block's tokens are read once at its end, after
the device's error record (``ops.check_errors``: input values the CUDA kernels could not use,
such as a cache length past the capacity) so a bad block raises before anyone sees it.

Batches: each sequence keeps its own cache length and positions, and advances through its own
sub-blocks (Fast-dLLM v2), so its tokens equal those of a batch-of-one run (greedy decoding).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import ops
from .decoding import (fast_dllm_unmask, fill_most_confident, low_confidence_unmask, sample,
                       transfer_schedule)
from .graphs import StepGraph, graph_kind


@dataclass
class DecodeConfig:
    style: str                  # "fast_dllm" or "sdar"
    block_size: int
    mask_id: int
    stop_ids: set
    max_new_tokens: int = 256
    sub_block: int = 8          # fast_dllm: sub-blocks filled left to right
    threshold: float = 0.9      # fast_dllm: confidence threshold; sdar dynamic: its threshold
    fixed_steps: Optional[int] = None  # fast_dllm: exactly this many steps per block instead
    steps: int = 4              # sdar: steps per block
    remasking: str = "low_confidence_static"
    temperature: float = 0.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None


@dataclass
class StepRecord:
    block: int      # 0-based generation block (-1: prefill)
    step: int       # step within the block (prefill: chunk index)
    phase: str      # "prefill", "denoise" or "commit"
    first: bool     # the block's first (all-[MASK]) denoising step
    wall_s: float = 0.0    # the forward's time: device time on CUDA, host wall time on the CPU
    issue_s: float = 0.0   # host time until the forward was issued (work queued, not done)
    device_s: float = 0.0  # device time of the forward (CUDA events; = wall_s on the CPU)
    events: Optional[tuple] = field(default=None, repr=False)


# Prompt tokens per prefill forward. 16K: on the H200 a 128K prefill (1.5B shape) takes 3.6 s in
# 16K chunks against 4.0 s in 4K chunks (cuDNN's kernels; fewer, larger attention calls and GEMMs),
# and peak memory stays flat in the prompt length (bounded by the chunk: by estimate ~1 GB of
# activations at the 1.5B shape, ~2 GB at 7B; not measured). The C++ runtime's default
# (csrc/runtime/generate.h) is the same.
DEFAULT_PREFILL_CHUNK = 16384


class BlockLoop:
    """State of one generation; methods are the phases of the loop."""

    def __init__(self, forward: Callable, cache, seqs: list, cfg: DecodeConfig, *,
                 policy=None, on_block: Optional[Callable] = None, progress: bool = False,
                 use_graphs: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.forward, self.cache, self.seqs, self.cfg = forward, cache, seqs, cfg
        self.policy, self.on_block, self.progress = policy, on_block, progress
        self.device = cache.cache_lens.device
        self.cuda = self.device.type == "cuda"
        batch, B = len(seqs), cfg.block_size
        self.B = B
        self.chunk = max(B, prefill_chunk // B * B)  # prefill tokens per forward
        self.full = [len(s) // B for s in seqs]
        self.rem = [len(s) % B for s in seqs]
        self.out = [[] for _ in seqs]
        self.stopped = [False] * batch
        self.records: list = []
        # Fixed buffers: a step reads and writes only these, so its graph replays stay valid.
        self.x = torch.full((batch, B), cfg.mask_id, dtype=torch.long, device=self.device)
        for b, s in enumerate(seqs):
            if self.rem[b]:
                self.x[b, :self.rem[b]] = torch.tensor(s[len(s) - self.rem[b]:], device=self.device)
        self.gen_start = list(self.rem)  # first generated position of the current block
        self.left = torch.zeros((), dtype=torch.long, device=self.device)
        self.left_host = torch.zeros((), dtype=torch.long, pin_memory=self.cuda)
        self.fill_n = torch.zeros((), dtype=torch.long, device=self.device)
        self.next_tok = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.last_pos = torch.full((batch,), B - 1, dtype=torch.long, device=self.device)
        self.graphs = {} if use_graphs else None
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None

    # -- the work of one forward (all on the device) ------------------------------------------
    def _logits(self, ids: Tensor, keep: Optional[Tensor]) -> Tensor:
        logits = self.forward(ids, keep)
        logits[..., self.cfg.mask_id] = float("-inf")  # [MASK] is never an output token
        return logits

    def _denoise(self) -> None:
        cfg = self.cfg
        tok, p = sample(self._logits(self.x, None), cfg.temperature, cfg.top_p, cfg.generator)
        if cfg.style == "fast_dllm":  # token shift: position i is predicted from hidden i-1
            tok = torch.cat([tok[:, :1], tok[:, :-1]], dim=1)  # (position 0 is never masked)
            p = torch.cat([p[:, :1], p[:, :-1]], dim=1)
        masked = self.x == cfg.mask_id
        if cfg.style == "sdar":
            pick = low_confidence_unmask(p, masked, self.fill_n.expand(masked.shape[0]),
                                         cfg.remasking == "low_confidence_dynamic", cfg.threshold)
        elif cfg.fixed_steps is not None:  # fill_n holds the steps left, this one included
            n = torch.div(masked.sum(-1) + self.fill_n - 1, self.fill_n, rounding_mode="floor")
            pick = fill_most_confident(p, masked, n)
        else:
            pick = fast_dllm_unmask(p, masked, cfg.sub_block, cfg.threshold)
        self.x.copy_(torch.where(pick, tok, self.x))
        self.left.copy_((masked & ~pick).sum())

    def _commit(self) -> None:
        logits = self._logits(self.x, self.last_pos)
        if self.cfg.style == "fast_dllm":  # the commit forward yields the next block's first token
            tok, _ = sample(logits[:, -1], self.cfg.temperature, self.cfg.top_p,
                            self.cfg.generator)
            self.next_tok.copy_(tok)
        self.cache.advance_device(self.B)

    def _run(self, kind: str, fn: Callable[[], None], record: StepRecord) -> None:
        """Runs one forward of ``kind`` eagerly or through its graph, timed."""
        if self.cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        t0 = time.perf_counter()
        if self.graphs is None or kind == "prefill":
            fn()
        else:
            key = graph_kind(self.policy, kind)
            if key not in self.graphs:
                self.graphs[key] = StepGraph(fn, self.device, self.pool)
            graph = self.graphs[key]
            replay = graph.captured
            graph()
            if replay:
                self.cache.replayed(kind)
        record.issue_s = time.perf_counter() - t0
        if self.cuda:
            events[1].record()
            record.events = events
        else:
            record.wall_s = record.device_s = time.perf_counter() - t0
        self.records.append(record)

    def _masks_left(self) -> int:
        """The [MASK]s left after the last step: a pinned 4-byte copy and an event query."""
        if not self.cuda:
            return int(self.left)
        self.left_host.copy_(self.left, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            pass
        return int(self.left_host)

    # -- phases ---------------------------------------------------------------------------------
    def prefill(self) -> None:
        """The prompts' full blocks, ``self.chunk`` tokens per forward. A sequence whose full
        blocks end inside a chunk keeps only those tokens (the rest of its row is scratch,
        written past its length and overwritten later); Fast-dLLM v2 takes the token after a
        block-aligned prompt from its last position's logits."""
        B, C, batch = self.B, self.chunk, len(self.seqs)
        total = max(self.full) * B
        for i, c0 in enumerate(range(0, total, C)):
            n = min(C, total - c0)
            ids = self.x.new_full((batch, n), self.cfg.mask_id)
            kept = [max(0, min(n, f * B - c0)) for f in self.full]
            for b, s in enumerate(self.seqs):
                if kept[b]:
                    ids[b, :kept[b]] = torch.tensor(s[c0:c0 + kept[b]], device=self.device)
            ends = [b for b in range(batch) if self.rem[b] == 0 and 0 < self.full[b] * B - c0 <= n]
            keep = torch.tensor([max(kept[b], 1) - 1 for b in range(batch)], device=self.device)
            starts = [min(f * B, c0) for f in self.full]  # cache lengths before the chunk
            self.cache.begin_prefill(torch.tensor(kept, dtype=torch.int32, device=self.device), B,
                                     starts)
            holder = {}

            def chunk():
                holder["logits"] = self._logits(ids, keep)
                self.cache.end_forward(n)
            self._run("prefill", chunk, StepRecord(-1, i, "prefill", False))
            if self.progress:
                print(f"\rprefill {c0 + n}/{total} tokens", end="", file=sys.stderr)
            if self.cfg.style == "fast_dllm" and ends:  # the token after a block-aligned prompt
                # (a draw only here: a single prompt draws the same random numbers whatever
                # the chunking, and the C++ runtime draws alike)
                tok, _ = sample(holder["logits"][:, -1], self.cfg.temperature, self.cfg.top_p,
                                self.cfg.generator)
                rows = torch.tensor(ends, device=self.device)
                self.x[rows, 0] = tok[rows]
        if self.progress and total:
            print(file=sys.stderr)

    def blocks(self) -> None:
        block = 0
        while True:
            self.cache.begin_block()
            self._denoise_block(block)
            if self.cuda:  # bad values the kernels met; the [MASK] poll has synchronised already
                ops.check_errors(self.device)
            if self.on_block is not None:
                self.on_block(block, self.x.clone())
            if self._collect():
                break
            self.cache.begin_step(commit=True)
            self._run("commit", self._commit,
                      StepRecord(block, self.cache.step, "commit", False))
            self.cache.advance_host(self.B)
            self.x.fill_(self.cfg.mask_id)
            if self.cfg.style == "fast_dllm":
                self.x[:, 0] = self.next_tok
            self.gen_start = [0] * len(self.seqs)
            block += 1
            if self.progress:
                print(f"\rblock {block}: {min(len(o) for o in self.out)} tokens", end="",
                      file=sys.stderr)
        if self.progress:
            print(file=sys.stderr)
        self._finish_records()

    def _denoise_block(self, block: int) -> None:
        cfg = self.cfg
        if cfg.style == "sdar":
            schedule = transfer_schedule(self.B, cfg.steps)
        elif cfg.fixed_steps is not None:
            schedule = list(range(cfg.fixed_steps, 0, -1))  # steps left, this one included
        else:
            schedule = None  # the threshold rule: until no [MASK] is left
        limit = len(schedule) if schedule is not None else self.B + 1
        # A fixed step count runs exactly that many forwards; the other rules can end early.
        poll = cfg.style == "sdar" or cfg.fixed_steps is None
        for i in range(limit):
            if schedule is not None:
                self.fill_n.fill_(schedule[i])
            self.cache.begin_step()
            step = self.cache.step
            kind = self.cache.forward_kind()

            def denoise():
                self._denoise()
                self.cache.advance_device(self.B)
            self._run(kind, denoise, StepRecord(block, step, "denoise", step == 0))
            self.cache.advance_host(self.B)
            if poll and self._masks_left() == 0:
                return
        if self._masks_left() != 0:  # cannot happen: every rule fills the block in `limit` steps
            raise RuntimeError(f"block {block}: [MASK] tokens left after {limit} steps")

    def _collect(self) -> bool:
        """Appends the block's generated tokens (one device read per block); True when every
        sequence is done."""
        rows = self.x.tolist()
        for b, row in enumerate(rows):
            if self.stopped[b] or len(self.out[b]) >= self.cfg.max_new_tokens:
                continue
            for t in row[self.gen_start[b]:]:
                if t in self.cfg.stop_ids:
                    self.stopped[b] = True
                    break
                self.out[b].append(t)
                if len(self.out[b]) >= self.cfg.max_new_tokens:
                    break
        return all(s or len(o) >= self.cfg.max_new_tokens for s, o in zip(self.stopped, self.out))

    def _finish_records(self) -> None:
        """Device times of the forwards, read once at the end of the generation."""
        pending = [r for r in self.records if r.events is not None]
        if pending:
            pending[-1].events[1].synchronize()
        for r in pending:
            r.device_s = r.events[0].elapsed_time(r.events[1]) / 1e3
            r.wall_s = r.device_s
            r.events = None


def n_blocks_needed(max_new_tokens: int, rem: list, block_size: int) -> int:
    """Generation blocks a run may need (plus the block that holds the prompt remainder)."""
    return math.ceil((max_new_tokens + max(rem)) / block_size) + 1
