"""The block-diffusion training layout of transformers' Qwen2 / Qwen3 models through the MAGE ops.

One forward runs, per sample, the sequence

    [ noisy copy 1 | ... | noisy copy n | clean copy x_0 ]

Every noisy copy holds blocks start_block .. start_block + T/B - 1 (T tokens, block size B) at their
own RoPE positions; the clean copy holds x_0[0:N] at positions 0 .. N-1 (N >= start + T - B).
Attention (no T x T mask anywhere: the ops derive the pattern from block indices):
  clean block j -> clean blocks <= j          block_attention(ctx = own = clean K/V, start 0)
  noisy block j -> clean blocks < j + itself   block_attention(ctx = clean, own = noisy,
                                               start = start_block * B)
Copies never see each other: the noisy copies are independent draws (a mask, its complement,
the all-[MASK] block of MAGE-FT's selection) over one shared clean copy. Each noisy copy has a
mode (per forward):
  "exact"   the rule above;
  "select"  the same output, from attention_with_scores with the copy's blocks as the batch over
            the shared clean K/V (batch stride 0: nothing copied), a chunk of blocks at a time; in
            layers >= dense_layers the scores (block- and group-averaged softmax mass over the
            clean prefix, normalised over prefix + block: spec 2.1, as at inference) give the
            top-k per (block, KV head) -- the selection, kept on the layout;
  "oracle"  exact, as "select"; the scores measure the kept selection's set and mass recall
            against this copy's own per-block top-k (MAGE-FT's teacher);
  "sparse"  in layers >= dense_layers each block reads only its selected clean entries plus
            itself (block_sparse_attention): MAGE-FT's sparse-aware forward.

Why an ``AttentionInterface`` function rather than a lean forward (mage_ext/hf/fast_forward.py):
training needs autograd through every layer, LoRA adapters (peft replaces the projections, which
the lean forward refuses) and activation checkpointing; the stock module tree gives all three, and
attention is the only part of the layer that changes. At training token counts (thousands of rows
per GEMM) the stock tree's small per-layer kernels cost little next to the GEMMs and attention.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops

NAME = "mage_train"        # the AttentionInterface name
KWARG = "mage_train"       # the forward kwarg that carries the layout to the attention function
MODES = ("exact", "select", "oracle", "sparse")
_NO_MASK = {"full_attention": None, "sliding_attention": None}  # skips transformers' mask build
_CUDA_MAX_UNITS = 65535    # block_sparse_attention on CUDA: n_blocks * Hkv per call


def causal_lm(model):
    """The transformers causal LM inside ``model`` (a peft wrapper's base model, or itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def enable_activation_checkpointing(lm) -> None:
    """Non-reentrant activation checkpointing of a transformers causal LM, under the method's
    new name (transformers >= 5.2x) or the old one (``gradient_checkpointing_enable``)."""
    enable = getattr(lm, "activation_checkpointing_enable", None) or \
        lm.gradient_checkpointing_enable
    enable({"use_reentrant": False})


class TrainLayout:
    """Geometry, selections and recall of the training layout; one per batch shape.

    block_size B; noisy_len T (a multiple of B) tokens per noisy copy, holding blocks
    start_block ...; clean_len N tokens of x_0 (a multiple of B, >= start_block * B + T - B);
    k: the selection budget per (block, KV head) ("select" / "sparse" / "oracle"), clamped to N;
    dense_layers: the first layers stay exact in every mode; n_sink / n_recent as topk_select;
    score_elements: the most fp32 scores one attention_with_scores call may hold (a chunk of
    blocks x KV heads x N), which bounds the selection pass's extra memory.
    """

    def __init__(self, block_size: int, noisy_len: int, clean_len: int, start_block: int = 0,
                 k: Optional[int] = None, dense_layers: int = 0, n_sink: int = 0,
                 n_recent: int = 0, score_elements: int = 1 << 26):
        for name, v, low in (("block_size", block_size, 1), ("noisy_len", noisy_len, 1),
                             ("clean_len", clean_len, 0), ("start_block", start_block, 0),
                             ("dense_layers", dense_layers, 0), ("n_sink", n_sink, 0),
                             ("n_recent", n_recent, 0), ("score_elements", score_elements, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"TrainLayout: {name} must be an int >= {low}, got {v!r}")
        if noisy_len % block_size or clean_len % block_size:
            raise ValueError(f"TrainLayout: noisy_len={noisy_len} and clean_len={clean_len} must "
                             f"be multiples of block_size={block_size}")
        if start_block * block_size + noisy_len - block_size > clean_len:
            raise ValueError(f"TrainLayout: the noisy blocks {start_block} .. "
                             f"{start_block + noisy_len // block_size - 1} need the clean prefix "
                             f"up to {start_block * block_size + noisy_len - block_size}, but "
                             f"clean_len={clean_len}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"TrainLayout: k must be an int >= 1 or None, got {k!r}")
        self.block_size, self.noisy_len, self.clean_len = block_size, noisy_len, clean_len
        self.start_block, self.k, self.dense_layers = start_block, k, dense_layers
        self.n_sink, self.n_recent, self.score_elements = n_sink, n_recent, score_elements
        self.modes: tuple = ()
        self.selections: dict = {}   # layer -> (indices [batch, nb, Hkv, k], counts [batch, nb, Hkv])
        self.recall: dict = {}       # layer -> [set sum, mass sum, rows] (tensors / int)

    @property
    def n_blocks(self) -> int:
        return self.noisy_len // self.block_size

    def positions(self, n_noisy: int, device=None) -> Tensor:
        """RoPE positions of the whole layout for ``n_noisy`` noisy copies."""
        noisy = self.start_block * self.block_size + torch.arange(self.noisy_len, device=device)
        return torch.cat([noisy] * n_noisy + [torch.arange(self.clean_len, device=device)])

    # -- running the model -------------------------------------------------------------------
    def hidden_states(self, model, noisy: Sequence[Tensor], clean: Tensor,
                      modes: Sequence[str]) -> Tensor:
        """Final hidden states [batch, n*T + N, hidden] of ``model`` (a transformers Qwen2 / Qwen3
        causal LM, or a peft wrapper of one) on [noisy[0] | ... | clean]; noisy[i] [batch, T]
        and clean [batch, N] are token ids, modes[i] the mode of noisy[i]. Switches the model to
        the "mage_train" attention (enable_train_attention) and leaves it so."""
        modes = tuple(modes)
        if len(modes) != len(noisy) or not noisy:
            raise ValueError(f"TrainLayout: need one mode per noisy copy (at least one), got "
                             f"{len(modes)} modes for {len(noisy)} copies")
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"TrainLayout: modes must be among {MODES}, got {bad}")
        if any(m != "exact" for m in modes) and self.k is None:
            raise ValueError(f"TrainLayout: modes {modes} need a budget k")
        for i, t in enumerate(noisy):
            if t.dim() != 2 or t.shape[1] != self.noisy_len:
                raise ValueError(f"TrainLayout: noisy[{i}] must be [batch, {self.noisy_len}], got "
                                 f"{tuple(t.shape)}")
        if clean.dim() != 2 or clean.shape[1] != self.clean_len:
            raise ValueError(f"TrainLayout: clean must be [batch, {self.clean_len}], got "
                             f"{tuple(clean.shape)}")
        lm = causal_lm(model)
        ids = torch.cat(list(noisy) + [clean], dim=1)
        pos = self.positions(len(noisy), ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        self.modes = modes
        enable_train_attention(lm)
        out = lm.model(input_ids=ids, position_ids=pos, attention_mask=dict(_NO_MASK),
                       use_cache=False, **{KWARG: self})
        return out.last_hidden_state

    def recall_summary(self) -> dict:
        """{'set_recall', 'mass_recall', 'per_layer'} over every (sample, block, KV head) whose
        clean prefix holds more than k entries (elsewhere the selection is the whole prefix),
        since the last reset_recall(); None where nothing was measured."""
        per_layer, tot = {}, [0.0, 0.0, 0]
        for layer, (s, m, n) in sorted(self.recall.items()):
            s, m = float(s), float(m)
            per_layer[layer] = {"set_recall": s / n if n else None,
                                "mass_recall": m / n if n else None}
            tot = [tot[0] + s, tot[1] + m, tot[2] + n]
        n = tot[2]
        return {"set_recall": tot[0] / n if n else None, "mass_recall": tot[1] / n if n else None,
                "per_layer": per_layer}

    def reset_recall(self) -> None:
        self.recall = {}

    # -- the attention function's work -------------------------------------------------------
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Attention of one layer over the whole layout: q [batch, Hq, S, d], k / v
        [batch, Hkv, S, d] (RoPE applied) -> [batch, Hq, S, d]."""
        n, T, N = len(self.modes), self.noisy_len, self.clean_len
        if q.shape[2] != n * T + N:
            raise RuntimeError(f"mage_train attention: the layout has {n} noisy copies of {T} "
                               f"tokens and {N} clean tokens, the layer got {q.shape[2]} tokens")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # cache-layout rows for the ops
        if k.stride() != v.stride():  # the ops want one layout (a single KV head's stride may differ)
            k, v = torch.stack((k, v)).unbind(0)
        sizes = [T] * n + [N]
        qs, ks, vs = q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2)
        batch = q.shape[0]
        outs = []
        kc, vc = ks[-1], vs[-1]
        for i, mode in enumerate(self.modes):
            outs.append(self._noisy(layer, mode, qs[i], ks[i], vs[i], kc, vc, scale))
        if N:
            outs.append(ops.block_attention(qs[-1], kc, vc, kc, vc, self.block_size, [0] * batch,
                                            scale)[0])
        return torch.cat(outs, 2)

    def _noisy(self, layer, mode, q, k_own, v_own, kc, vc, scale) -> Tensor:
        batch = q.shape[0]
        if self.clean_len == 0:  # block 0 alone reads no context: its own k/v stand in for it
            kc, vc = k_own, v_own
        if mode == "exact" or layer < self.dense_layers or self.clean_len == 0:
            start = [self.start_block * self.block_size] * batch
            return ops.block_attention(q, kc, vc, k_own, v_own, self.block_size, start, scale)[0]
        if mode == "sparse":
            return self._sparse(layer, q, kc, vc, k_own, v_own, scale)
        return self._scored(layer, mode, q, kc, vc, k_own, v_own, scale)

    def _selection(self, layer: int, q: Tensor, hkv: int) -> tuple:
        sel = self.selections.get(layer)
        if sel is None:
            raise RuntimeError(f"mage_train attention: layer {layer} has no selection; run a "
                               "forward with a 'select' copy (the all-[MASK] blocks) first")
        want = (q.shape[0], self.n_blocks, hkv)
        if tuple(sel[0].shape[:3]) != want:
            raise RuntimeError(f"mage_train attention: layer {layer}'s selection is for "
                               f"[batch, n_blocks, Hkv] = {tuple(sel[0].shape[:3])}, this forward "
                               f"has {want}")
        return sel

    def _sparse(self, layer, q, kc, vc, k_own, v_own, scale) -> Tensor:
        hkv, bs, nb = kc.shape[1], self.block_size, self.n_blocks
        idx, cnt = self._selection(layer, q, hkv)
        # The CUDA kernels take n_blocks * Hkv <= 65535 units a call; a block's selection is in
        # absolute context positions, so splitting the query blocks changes nothing.
        step = nb if not q.is_cuda else max(1, _CUDA_MAX_UNITS // hkv)
        outs = []
        for j0 in range(0, nb, step):
            j1 = min(nb, j0 + step)
            rows = slice(j0 * bs, j1 * bs)
            outs.append(ops.block_sparse_attention(
                q[:, :, rows], kc, vc, idx[:, j0:j1].contiguous(), cnt[:, j0:j1].contiguous(),
                k_own[:, :, rows], v_own[:, :, rows], bs, scale)[0])
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def _scored(self, layer, mode, q, kc, vc, k_own, v_own, scale) -> Tensor:
        """Exact attention of the noisy copy through attention_with_scores, blocks as the batch;
        the scores select ("select") or measure the kept selection ("oracle")."""
        batch, hq, _, dim = q.shape
        hkv, n_ctx = kc.shape[1], kc.shape[2]
        bs, nb = self.block_size, self.n_blocks
        kk = min(self.k, n_ctx)
        chunk = max(1, self.score_elements // (hkv * n_ctx))
        if mode == "select":
            idx = torch.full((batch, nb, hkv, kk), -1, dtype=torch.int32, device=q.device)
            cnt = torch.zeros((batch, nb, hkv), dtype=torch.int32, device=q.device)
        else:
            sel_idx, sel_cnt = self._selection(layer, q, hkv)
            acc = self.recall.setdefault(layer, [0.0, 0.0, 0])
        first = torch.arange(nb, device=q.device, dtype=torch.int32) + self.start_block
        seqs = []
        for b in range(batch):
            q_u = q[b].unflatten(1, (nb, bs)).transpose(0, 1)       # [nb, Hq, B, d] (views)
            k_u = k_own[b].unflatten(1, (nb, bs)).transpose(0, 1)
            v_u = v_own[b].unflatten(1, (nb, bs)).transpose(0, 1)
            pieces = []
            for j0 in range(0, nb, chunk):
                j1 = min(nb, j0 + chunk)
                n = j1 - j0
                lens = first[j0:j1] * bs                              # each block's clean prefix
                ctx_k = kc[b:b + 1].expand(n, hkv, n_ctx, dim)        # batch stride 0
                ctx_v = vc[b:b + 1].expand(n, hkv, n_ctx, dim)
                o, _, s = ops.attention_with_scores(q_u[j0:j1].contiguous(), ctx_k, ctx_v, lens,
                                                    k_u[j0:j1].contiguous(),
                                                    v_u[j0:j1].contiguous(), scale)
                pieces.append(o)
                if mode == "select":
                    sink = min(self.n_sink, kk)
                    idx[b, j0:j1], cnt[b, j0:j1] = ops.topk_select(
                        s, lens, kk, sink, min(self.n_recent, kk - sink))
                else:  # the teacher's own top-k is the oracle
                    _accumulate_recall(acc, s, lens, kk, ops.topk_select(s, lens, kk),
                                       sel_idx[b, j0:j1], sel_cnt[b, j0:j1])
            seqs.append(torch.cat(pieces, 0).transpose(0, 1).flatten(1, 2))   # [Hq, T, d]
        if mode == "select":
            self.selections[layer] = (idx, cnt)
        return torch.stack(seqs, 0)


def _membership(indices: Tensor, counts: Tensor, capacity: int) -> Tensor:
    from ..eval.recall import membership
    return membership(indices, counts, capacity)


def _accumulate_recall(acc: list, scores: Tensor, lens: Tensor, k: int, oracle: tuple,
                       sel_idx: Tensor, sel_cnt: Tensor) -> None:
    """Adds one chunk's set recall |T & O| / k and mass recall (exact mass inside T / the
    prefix's mass) over the (block, KV head) rows whose prefix holds more than k entries."""
    rows = lens > k
    if not bool(rows.any()):
        return
    capacity = scores.shape[-1]
    s = scores[rows].double()
    chosen = _membership(sel_idx[rows], sel_cnt[rows], capacity)
    best = _membership(oracle[0][rows], oracle[1][rows], capacity)
    acc[0] = acc[0] + ((chosen & best).sum(-1).double() / k).sum()
    acc[1] = acc[1] + ((s * chosen).sum(-1) / s.sum(-1).clamp_min(1e-300)).sum()
    acc[2] += int(rows.sum()) * scores.shape[1]


# -- transformers glue -------------------------------------------------------------------------
def train_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                    **kwargs):
    """The "mage_train" attention function. With a TrainLayout in the ``mage_train`` forward
    kwarg the layout does the work; any other forward (evaluation, generation without MAGE) runs
    transformers' SDPA with the mask transformers built. Returns ([batch, S, Hq, d], None)."""
    layout = kwargs.get(KWARG)
    if layout is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               scaling=scaling, dropout=dropout, **kwargs)
    if not isinstance(layout, TrainLayout):
        raise TypeError(f"mage_train attention: the {KWARG!r} kwarg must be a TrainLayout, got "
                        f"{type(layout).__name__}")
    if getattr(module, "sliding_window", None) is not None:
        raise NotImplementedError("mage_train attention: sliding-window layers are not supported "
                                  f"(layer {module.layer_idx})")
    if dropout:
        raise NotImplementedError("mage_train attention: attention dropout is not supported; set "
                                  "config.attention_dropout = 0")
    kind = query.device.type
    if torch.is_autocast_enabled(kind):  # as SDPA under autocast: one low-precision dtype
        dtype = torch.get_autocast_dtype(kind)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = layout.attend(module.layer_idx, query, key, value, scale)
    return out.transpose(1, 2), None


def register() -> None:
    """Registers "mage_train" with transformers' attention and mask interfaces (idempotent);
    its mask function is SDPA's, for the forwards that fall back to SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, train_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_train_attention(model):
    """Routes ``model``'s attention (a transformers causal LM or a peft wrapper) through
    "mage_train"; idempotent. Like enable_mage, the model gets a private copy of its config, so
    other models sharing the config object are untouched; disable_train_attention undoes it.

    Sticky rather than a context manager: activation checkpointing re-runs each layer's forward
    in the backward, after any context around the forward would have exited, and the re-run must
    take the same attention path.
    """
    import copy

    from ..hf.enable import _swap_config

    lm = causal_lm(model)
    if getattr(lm, "_mage_train_config", None) is None:
        original = lm.config
        private = copy.deepcopy(original)
        register()
        _swap_config(lm, original, private)
        private._attn_implementation = NAME
        lm._mage_train_config = original
    return model


def disable_train_attention(model):
    """Gives the model its original config object (and attention implementation) back."""
    from ..hf.enable import _swap_config

    lm = causal_lm(model)
    original = getattr(lm, "_mage_train_config", None)
    if original is not None:
        _swap_config(lm, lm.config, original)
        lm._mage_train_config = None
    return model
