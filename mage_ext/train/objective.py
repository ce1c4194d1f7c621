"""Block-diffusion noising (spec section 5) and MAGE-FT's objective (spec section 3).

Per sequence of L = n_blocks * B tokens, one noisy draw per block: t ~ U(0, 1) and each token is
masked with probability (1 - 1e-3) t + 1e-3; the complementary copy masks exactly the others
(both copies share one clean x_0). CE on the masked positions of the noisy copies; with the token
shift (Fast-dLLM v2) position p is predicted from the hidden state of p - 1 -- the same copy's
previous slot, or at a block start the clean copy's p - 1 (what the commit forward provides at
inference); without it (SDAR) from p itself.

MAGE-FT, per batch (mage_ft_loss):
  1. no grad: [all-[MASK] blocks (select) | noisy copies (oracle: exact, the teacher) | x_0] --
     the all-[MASK] copy's exact scores pick the top-k clean entries per (layer, block, KV head);
     the teacher's own per-block top-k measures the selection's set / mass recall;
  2. with grad: [noisy copies (sparse) | x_0] -- the noisy blocks read only their selections in
     layers >= dense_layers (the student);
  3. loss = CE(student) + lambda * KL(p_student || p_teacher) on the masked positions (weighted
     means over the same positions), gradients through the student only.
With a frozen teacher (``frozen_teacher``: LoRA's adapters switched off) the KL's teacher is the
model before fine-tuning, in a pass of its own; the selection and the recall stay the trained
model's (what MAGE runs at inference). A teacher that trains with the student can lower the KL by
leaning less on the context in both (finetune/README.md, MAGE-FT: runs c and h).
CE and KL run over chunks of positions, each chunk under activation checkpointing: its
[chunk x vocab] fp32 logits exist only while the chunk is computed (and again in the backward),
never the whole [positions x vocab].
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layout import TrainLayout, causal_lm

MASK_EPS = 1e-3
# The KL weight. The KL per masked token grows as k / prefix shrinks: ~1e-3 nats on the shipped
# model with 2 dense layers and k / prefix ~ 1/4, ~0.2 with no dense layer and k = 64 of 2K, where
# weight 10 (lr 1e-3) wrecked the model's CE in 27 steps and weight 1 (lr 2e-4) did not
# (finetune/README.md, MAGE-FT: runs a-e). Long contexts sit at the large-KL end.
DEFAULT_LAMBDA = 1.0


def noise(tokens: torch.Tensor, force_mask: torch.Tensor, keep: torch.Tensor, xt_blocks: list[int],
          block_size: int, mask_id: int, gen: torch.Generator | None = None):
    """x_t token ids for the entries (N, n_xt) and which of them are masked.

    `xt_blocks` is the list of distinct blocks; each gets two entries (mask m, then its complement),
    so the returned entry list is xt_blocks + xt_blocks. Per (sequence, block) t ~ U(0,1) and
    P(mask) = (1 - 1e-3) t + 1e-3; force_mask / keep override both copies."""
    n = tokens.shape[0]
    idx = torch.cat([b * block_size + torch.arange(block_size) for b in xt_blocks])
    tok, force, kp = tokens[:, idx], force_mask[:, idx], keep[:, idx]
    t = torch.rand(n, len(xt_blocks), 1, generator=gen).expand(-1, -1, block_size).reshape(n, -1)
    m = torch.rand(tok.shape, generator=gen) < (1 - MASK_EPS) * t + MASK_EPS
    masked = torch.cat([m, ~m], dim=1)
    masked = (masked | force.repeat(1, 2)) & ~kp.repeat(1, 2)
    xt = torch.where(masked, torch.full_like(tok.repeat(1, 2), mask_id), tok.repeat(1, 2))
    return xt, masked, idx.repeat(2)


def shift_sources(xt_blocks: list[int], block_size: int) -> torch.Tensor:
    """For each x_t slot, the layout index whose hidden state predicts it (-1: nothing, block 0 start)."""
    n_xt = len(xt_blocks) * block_size
    src = torch.empty(n_xt, dtype=torch.long)
    for e, b in enumerate(xt_blocks):
        base = e * block_size
        src[base + 1: base + block_size] = torch.arange(base, base + block_size - 1)
        src[base] = n_xt + b * block_size - 1 if b > 0 else -1
    return src


def upcast_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least fp32 for the softmax: a bf16 / fp16 model's in fp32, an fp64 model's
    (the tests' references) left in fp64 rather than rounded to fp32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_terms(head, h_student, h_teacher, targets, weights):
    logp = upcast_logits(head(h_student)).log_softmax(-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ce_sum = (ce * weights).sum()
    if h_teacher is None:
        return ce_sum, ce_sum.new_zeros(())
    with torch.no_grad():
        logq = upcast_logits(head(h_teacher)).log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)                 # KL(p_student || p_teacher)
    return ce_sum, (kl * weights).sum()


def chunked_ce_kl(head, h_student, h_teacher, targets, weights, chunk: int):
    """(sum of weights * CE, sum of weights * KL) over positions, ``chunk`` positions at a time;
    h_student [M, hidden] (grad), h_teacher [M, hidden] or None (no KL), targets [M], weights [M]."""
    ce = kl = h_student.new_zeros((), dtype=torch.float32)
    for c0 in range(0, h_student.shape[0], chunk):
        c = slice(c0, c0 + chunk)
        ht = None if h_teacher is None else h_teacher[c]
        if torch.is_grad_enabled() and h_student.requires_grad:
            a, b = checkpoint(_chunk_terms, head, h_student[c], ht, targets[c], weights[c],
                              use_reentrant=False)
        else:
            a, b = _chunk_terms(head, h_student[c], ht, targets[c], weights[c])
        ce, kl = ce + a, kl + b
    return ce, kl


@dataclass
class MageFTObjective:
    """The per-batch settings of mage_ft_loss (validated by the finetune config)."""
    block_size: int
    mask_id: int
    k: int
    dense_layers: int = 2
    lam: float = DEFAULT_LAMBDA      # weight of KL(p_sparse || p_exact)
    token_shift: bool = True         # Fast-dLLM v2: True; SDAR: False
    complementary: bool = True       # a second noisy copy with the complementary mask
    n_sink: int = 0
    n_recent: int = 0
    loss_chunk: int = 1024           # positions per CE / KL chunk
    score_elements: int = 1 << 26    # bound on one selection chunk's fp32 scores


class _Batch:
    """One batch noised for the layout: the noisy copies (device), x_0, the loss positions."""

    def __init__(self, model, tokens, weight, force_mask, keep, obj, gen, rows=slice(None)):
        self.lm = causal_lm(model)
        self.device = self.lm.get_input_embeddings().weight.device
        bs, (_, self.length) = obj.block_size, tokens.shape
        blocks = list(range(self.length // bs))
        # The whole batch is noised and weighed, then ``rows`` kept: a data-parallel rank draws
        # the noise one process would draw for its rows, and normalises by the whole batch.
        xt, masked, idx = noise(tokens, force_mask, keep, blocks, bs, obj.mask_id, gen)
        n = 2 if obj.complementary else 1
        xt, masked, idx = xt[:, :n * self.length], masked[:, :n * self.length], idx[:n * self.length]
        src = shift_sources(blocks * n, bs) if obj.token_shift else torch.arange(n * self.length)
        w = weight[:, idx] * masked * (src >= 0)
        self.total = w.sum().to(self.device)
        tokens, xt, w = tokens[rows], xt[rows], w[rows]
        self.copies = [c.to(self.device) for c in xt.split(self.length, 1)]
        self.x0 = tokens.to(self.device)
        rows, cols = (w > 0).nonzero(as_tuple=True)
        self.n_positions = int(rows.numel())
        self.rows, self.at = rows.to(self.device), src[cols].to(self.device)
        self.targets = tokens[:, idx][rows, cols].to(self.device)
        self.weights = w[rows, cols].to(self.device, torch.float32)

    def layout(self, obj) -> TrainLayout:
        return TrainLayout(obj.block_size, self.length, self.length, k=obj.k,
                           dense_layers=obj.dense_layers, n_sink=obj.n_sink,
                           n_recent=obj.n_recent, score_elements=obj.score_elements)

    def rows_of(self, hidden, offset=0):
        """The hidden states that predict the loss positions (the noisy copies start at
        ``offset`` in the layout)."""
        return hidden[self.rows, self.at + offset]

    def terms(self, h_student, teacher_rows, chunk):
        """(CE, KL) weighted sums at this batch's loss positions over the whole batch's weight
        (the weighted means when the batch is whole); KL 0 without teacher rows."""
        ce, kl = chunked_ce_kl(self.lm.lm_head, self.rows_of(h_student), teacher_rows,
                               self.targets, self.weights, chunk)
        return ce / self.total, kl / self.total

    def zero_loss(self, hidden):
        """A zero loss whose backward reaches every trained parameter (lm_head too): the ranks of
        a data-parallel step must all reduce gradients of the same parameters."""
        return (hidden.sum() + self.lm.lm_head(hidden[:, :1]).sum()) * 0.0


def _sync(device) -> None:
    if device.type == "cuda":   # (the pass times are read on the host)
        torch.cuda.synchronize(device)


def bd_loss(model, tokens, weight, force_mask, keep, obj: MageFTObjective,
            gen: Optional[torch.Generator] = None):
    """The plain block-diffusion CE through the ops (exact attention, one forward): what a
    MAGE-FT step is compared with. Returns (loss, stats)."""
    b = _Batch(model, tokens, weight, force_mask, keep, obj, gen)
    h = b.layout(obj).hidden_states(model, b.copies, b.x0, ["exact"] * len(b.copies))
    if b.n_positions == 0:
        return b.zero_loss(h), {"tokens": 0, "ce": 0.0}
    ce, _ = b.terms(h, None, obj.loss_chunk)
    return ce, {"tokens": b.n_positions, "ce": float(ce.detach())}


def mage_ft_loss(model, tokens, weight, force_mask, keep, obj: MageFTObjective,
                 gen: Optional[torch.Generator] = None, recall: bool = True,
                 rows: slice = slice(None),
                 frozen_teacher: Optional[Callable[[], ContextManager]] = None):
    """One MAGE-FT loss on a batch: tokens [batch, L] (L a multiple of the block size) and
    per-token weight / force_mask / keep (CPU); returns (loss, stats). ``recall`` measures the
    selection against the teacher (its scores cost one attention_with_scores per block chunk).
    stats["t_select"]: seconds of the no-grad selection + teacher forward.
    ``rows`` (data parallelism): only these sequences run; loss, ce and kl are their share of the
    whole batch's (summed over disjoint rows they give the whole batch's), with the same noise.
    ``frozen_teacher``: a context manager factory under which ``model`` is the KL's teacher
    (peft's ``model.disable_adapter``); None: the teacher is ``model`` itself."""
    b = _Batch(model, tokens, weight, force_mask, keep, obj, gen, rows)
    layout = b.layout(obj)
    shared = obj.lam > 0 and frozen_teacher is None   # the KL's teacher rides the selection pass
    teacher = shared or recall
    t0 = time.perf_counter()
    training = model.training
    model.eval()           # (LoRA dropout off for the selection and the teacher)
    with torch.no_grad():  # 1. selection (+ teacher, sharing one forward and one clean copy)
        modes = ["select"] + ([("oracle" if recall else "exact")] * len(b.copies) if teacher else [])
        h_t = layout.hidden_states(model, [torch.full_like(b.x0, obj.mask_id)]
                                   + (b.copies if teacher else []), b.x0, modes)
        # only the teacher rows the KL reads are kept ([all-[MASK] | copies | x_0]: offset L)
        teacher_rows = b.rows_of(h_t, b.length) if shared and b.n_positions else None
        del h_t
        if obj.lam > 0 and frozen_teacher is not None and b.n_positions:
            with frozen_teacher():
                h_f = layout.hidden_states(model, b.copies, b.x0, ["exact"] * len(b.copies))
            teacher_rows = b.rows_of(h_f)
            del h_f
    model.train(training)
    _sync(b.device)
    t1 = time.perf_counter()
    h_s = layout.hidden_states(model, b.copies, b.x0, ["sparse"] * len(b.copies))  # 2. student
    stats = {"tokens": b.n_positions, "t_select": t1 - t0}
    if recall:
        stats.update({k: v for k, v in layout.recall_summary().items() if k != "per_layer"})
    if b.n_positions == 0:
        return b.zero_loss(h_s), dict(stats, ce=0.0, kl=0.0)
    ce, kl = b.terms(h_s, teacher_rows, obj.loss_chunk)
    loss = ce + obj.lam * kl if obj.lam > 0 else ce
    stats.update(ce=float(ce.detach()), kl=float(kl.detach()))
    return loss, stats
