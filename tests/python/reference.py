"""Plain-PyTorch references of the MAGE ops and the inputs the tests draw.

`reference_attention` loops over sequences and KV heads and calls nothing from mage_ext. Run in
float64 it is the ground truth; run in the inputs' own dtype it measures how much error plain
PyTorch makes in that dtype, which sets the tolerance (the FlashAttention rule):
    err(kernel) <= 2 * err(PyTorch in the same dtype) + rounding noise of the dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AttentionInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_lens: torch.Tensor
    k_block: torch.Tensor
    v_block: torch.Tensor

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.cache_lens, self.k_block, self.v_block)


def make_inputs(batch, hq, hkv, block, dim, lens, dtype=torch.float32, device="cpu",
                capacity=None, generator=None) -> AttentionInputs:
    capacity = capacity or max(max(lens), 1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype).to(device)

    return AttentionInputs(
        q=randn(batch, hq, block, dim),
        k_cache=randn(batch, hkv, capacity, dim),
        v_cache=randn(batch, hkv, capacity, dim),
        cache_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        k_block=randn(batch, hkv, block, dim),
        v_block=randn(batch, hkv, block, dim),
    )


def poison(*tensors):
    """Fills outputs with NaN (integers with -12345) before a kernel runs: an element the kernel
    does not write then fails the comparison instead of passing on leftover memory."""
    for t in tensors:
        t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


def random_selection(lens, hkv, k, generator=None, device="cpu", short=False):
    """Random ascending selections of min(k, len) positions per (sequence, KV head); with
    `short`, a random number of them in [0, min(k, len)] instead."""
    batch = len(lens)
    indices = torch.full((batch, hkv, k), -1, dtype=torch.int32)
    counts = torch.zeros((batch, hkv), dtype=torch.int32)
    for b, n in enumerate(lens):
        for h in range(hkv):
            c = min(k, n)
            if short and c > 0:
                c = int(torch.randint(0, c + 1, (1,), generator=generator))
            pick = torch.randperm(n, generator=generator)[:c].sort().values
            indices[b, h, :c] = pick.to(torch.int32)
            counts[b, h] = c
    return indices.to(device), counts.to(device)


def reference_forward(q, k_cache, v_cache, cache_lens, k_block, v_block, indices=None,
                      counts=None, scale=None):
    """(out, lse, scores) of plain PyTorch ops in the inputs' own dtype, differentiable.

    Without indices every position [0, cache_lens[b]) is attended; with them,
    indices[b, h, :counts[b, h]]. Gradients flow to q, the caches (the attended rows) and the
    block through ordinary autograd: the ground truth of the backward ops in float64.
    """
    batch, hq, block, dim = q.shape
    hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = dim ** -0.5 if scale is None else scale
    lens = cache_lens.cpu().tolist()
    outs, lses, scores = [], [], []
    for b in range(batch):
        for h in range(hkv):
            if indices is None:
                pos = torch.arange(lens[b])
            else:
                pos = indices[b, h, : int(counts[b, h])].cpu().long()
            pos = pos.to(k_cache.device)
            keys = torch.cat([k_cache[b, h, pos], k_block[b, h]])
            values = torch.cat([v_cache[b, h, pos], v_block[b, h]])
            rows = q[b, h * group:(h + 1) * group].reshape(group * block, dim)
            logits = (rows @ keys.T) * scale
            probs = torch.softmax(logits, dim=-1)
            outs.append((probs @ values).reshape(group, block, dim))
            lses.append(torch.logsumexp(logits.double(), -1).reshape(group, block))
            s = torch.zeros(capacity, dtype=torch.float64, device=q.device)
            s[pos] = probs[:, : len(pos)].detach().double().mean(0)
            scores.append(s)
    return (torch.stack(outs).reshape(batch, hq, block, dim),
            torch.stack(lses).reshape(batch, hq, block),
            torch.stack(scores).reshape(batch, hkv, capacity))


def reference_attention(inp: AttentionInputs, indices: Optional[torch.Tensor] = None,
                        counts: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        dtype: torch.dtype = torch.float64):
    """(out, lse, scores) computed with plain PyTorch in `dtype` on the CPU.

    out/lse/scores are float64 tensors (values as computed in `dtype`). Without indices every
    position [0, cache_lens[b]) is attended; with them, indices[b, h, :counts[b, h]].
    """
    args = [t.detach().cpu().to(dtype) for t in inp.args()]
    args[3] = inp.cache_lens.cpu()
    with torch.no_grad():
        out, lse, scores = reference_forward(*args, indices=indices, counts=counts, scale=scale)
    return out.double(), lse.double(), scores


def reference_block_sparse(q, k_ctx, v_ctx, indices, counts, k_own, v_own, block_size,
                           scale=None):
    """(out, lse) of block_sparse_attention with plain PyTorch ops (differentiable): block j of
    the queries is reference_forward over the context's selection indices[:, j] + block j's own
    keys."""
    blocks = q.shape[2] // block_size
    lens = torch.zeros(q.shape[0], dtype=torch.int32)
    outs, lses = [], []
    for j in range(blocks):
        part = slice(j * block_size, (j + 1) * block_size)
        out, lse, _ = reference_forward(q[:, :, part], k_ctx, v_ctx, lens, k_own[:, :, part],
                                        v_own[:, :, part], indices[:, j], counts[:, j], scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


FP32_UNITS = 8.0  # fp32: the reference is nearly exact, so the 2x rule alone is tighter than
                 # the kernels' exp2 / summation-order rounding (seen on the H200: 1.19e-6 scores
                 # error against a 1.14e-6 bound with one unit)


def rounding_noise(dtype: torch.dtype, ref: torch.Tensor, units: float = 1.0) -> float:
    """``units`` units of rounding of the dtype at the reference's magnitude (plus a floor);
    at least FP32_UNITS for fp32."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    if dtype == torch.float32:
        units = max(units, FP32_UNITS)
    return units * eps * max(ref.abs().max().item(), 1.0) + 1e-6


def assert_close_fa(got, ref64, ref_same_dtype, dtype, what="", units: float = 1.0):
    """FlashAttention tolerance rule (see module docstring); ``units``: rounding units allowed
    beyond it (fp32 kernels that sum in another order than the nearly exact fp32 reference)."""
    err = max_error(got, ref64)
    bound = 2 * max_error(ref_same_dtype, ref64) + rounding_noise(dtype, ref64, units)
    assert err <= bound, f"{what}: max error {err:.3e} exceeds bound {bound:.3e}"


def reference_topk(scores: torch.Tensor, lens, k: int, n_sink: int = 0, n_recent: int = 0):
    """(indices, counts) of topk_select by its rule, in plain Python: where lens[b] <= k every
    valid position; else the first n_sink and last n_recent positions plus the best of the rest,
    NaN ranking as -inf, -0 equal to +0, ties to the earliest position; ascending, -1 padded."""
    batch, hkv, _ = scores.shape
    indices = torch.full((batch, hkv, k), -1, dtype=torch.int32)
    counts = torch.zeros((batch, hkv), dtype=torch.int32)
    for b in range(batch):
        n = int(lens[b])
        for h in range(hkv):
            if n <= k:
                pick = list(range(n))
            else:
                row = scores[b, h, :n].tolist()
                key = [float("-inf") if s != s else s for s in row]
                middle = sorted(range(n_sink, n - n_recent), key=lambda j: (-key[j], j))
                pick = sorted(list(range(n_sink)) + middle[:k - n_sink - n_recent]
                              + list(range(n - n_recent, n)))
            indices[b, h, :len(pick)] = torch.tensor(pick, dtype=torch.int32)
            counts[b, h] = len(pick)
    return indices, counts


def reference_append(k_cache, v_cache, cache_lens, k_block, v_block):
    """append_kv on copies: the block at [cache_lens[b], cache_lens[b] + B) of each sequence."""
    kc, vc = k_cache.clone(), v_cache.clone()
    block = k_block.shape[2]
    for b, n in enumerate(cache_lens.tolist()):
        kc[b, :, n:n + block] = k_block[b]
        vc[b, :, n:n + block] = v_block[b]
    return kc, vc
