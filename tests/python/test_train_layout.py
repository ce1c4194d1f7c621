"""mage_ext.train.TrainLayout: the block-diffusion training layout of tiny Qwen2 / Qwen3 models
through the MAGE ops, against plain-PyTorch references of the same masks.

* exact copies: stock transformers SDPA with finetune/bd_objective.attention_mask (a dense bool
  mask built independently of the layout code): hidden states, loss and every parameter's grad;
* select / sparse / oracle: an explicit-mask eager attention over the whole layout (the selection
  as a per-(sequence, KV head) mask over the clean copy), the scores in plain torch (softmax over
  prefix + block, averaged over the block's rows and the head group), top-k by torch.topk.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from mage_ext.train import TrainLayout
from mage_ext.train.objective import upcast_logits
from mage_ext.train.layout import (causal_lm, disable_train_attention,
                                   enable_activation_checkpointing)
from conftest import requires_cuda
from tiny_models import MASK_ID, VOCAB, one_thread, tiny_model  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "finetune"))
import bd_objective as BD  # noqa: E402

FAMILIES = ["qwen2", "qwen3"]


def model_f64(family, seed=0, **kw):
    return tiny_model(family, seed=seed, **kw).double()


def reference_hidden_sdpa(model, layout, noisy, clean):
    """Stock SDPA over [noisy copies | clean] with bd_objective's dense mask."""
    nb, n = layout.n_blocks, len(noisy)
    entries = [layout.start_block + j for j in range(nb)] * n
    mask = BD.attention_mask(entries, layout.block_size, layout.clean_len)
    _, _, pos = BD.layout(entries, layout.block_size, layout.clean_len)
    ids = torch.cat(list(noisy) + [clean], 1)
    return BD.hidden_states(model, ids, mask, pos)


def ce_loss(model, hidden, targets, weights):
    logits = upcast_logits(causal_lm(model).lm_head(hidden))
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * weights.flatten()).sum()


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def random_ids(gen, batch, n):
    return torch.randint(0, VOCAB - 1, (batch, n), generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start_block, n_blocks, clean_blocks", [(0, 3, 3), (2, 2, 3), (0, 1, 0)])
def test_exact_layout_equals_sdpa_mask(family, start_block, n_blocks, clean_blocks, gen):
    """Two noisy copies (a mask and its complement) + clean x_0: hidden states, a CE loss and
    all parameter gradients equal stock SDPA with the dense mask. Covers the partial layout
    (noisy blocks 2..3 over a 3-block clean prefix, bd_objective's long-context form) and a
    single block with no clean copy."""
    bs, batch = 4, 2
    model = model_f64(family)
    layout = TrainLayout(bs, n_blocks * bs, clean_blocks * bs, start_block=start_block)
    noisy = [random_ids(gen, batch, n_blocks * bs) for _ in range(2)]
    clean = random_ids(gen, batch, clean_blocks * bs)
    h = layout.hidden_states(model, noisy, clean, ["exact", "exact"])
    ref = reference_hidden_sdpa(model, layout, noisy, clean)
    assert h.shape == ref.shape
    assert (h - ref).abs().max() < 1e-10
    targets = random_ids(gen, batch, h.shape[1])
    w = torch.rand(batch, h.shape[1], generator=gen, dtype=torch.float64)
    loss, loss_ref = ce_loss(model, h, targets, w), ce_loss(model, ref, targets, w)
    assert abs(float(loss.detach() - loss_ref.detach())) < 1e-10
    for g, r in zip(grads(model, loss), grads(model, loss_ref)):
        assert (g - r).abs().max() < 1e-9
    # Forwards without a layout fall back to SDPA with transformers' causal mask; disabling
    # restores the original config.
    ids = random_ids(gen, 1, 8)
    with torch.no_grad():
        fallback = model(ids).logits
        disable_train_attention(model)
        assert model.config._attn_implementation == "sdpa"
        assert (fallback - model(ids).logits).abs().max() < 1e-12


# -- explicit-mask reference of every mode -------------------------------------------------------
def _selection_mask(layout, layer, batch, hkv):
    """[batch, Hkv, T, N] bool: the clean entries each noisy token reads in a sparse layer."""
    from mage_ext.eval.recall import membership
    idx, cnt = layout.selections[layer]
    nb, bs, n_ctx = layout.n_blocks, layout.block_size, layout.clean_len
    per_block = membership(idx.flatten(0, 1), cnt.flatten(0, 1), n_ctx).view(batch, nb, hkv, n_ctx)
    return per_block.repeat_interleave(bs, 1).transpose(1, 2)


class ReferenceLayout(TrainLayout):
    """TrainLayout with attend() replaced by eager attention under an explicit mask; "select"
    computes the scores and top-k in plain torch (kept in ref_selections), "oracle" the recall."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ref_selections, self.ref_recall = {}, {}

    def attend(self, layer, q, k, v, scale):
        n, T, N, bs = len(self.modes), self.noisy_len, self.clean_len, self.block_size
        batch, hq, S, _ = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        allow = torch.zeros(batch, hkv, S, S, dtype=torch.bool)
        cblk = torch.arange(N) // bs
        allow[..., n * T:, n * T:] = cblk[None, :] <= cblk[:, None]
        local = torch.arange(T) // bs
        nblk = self.start_block + local
        for i, mode in enumerate(self.modes):
            r = slice(i * T, (i + 1) * T)
            allow[..., r, r] = local[:, None] == local[None, :]
            ctx = (cblk[None, :] < nblk[:, None]).expand(batch, hkv, T, N)
            if mode == "sparse" and layer >= self.dense_layers and N:
                ctx = ctx & _selection_mask(self, layer, batch, hkv)
            allow[..., r, n * T:] = ctx
        logits = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
        logits = logits.masked_fill(~allow.repeat_interleave(g, 1), float("-inf"))
        probs = torch.softmax(logits, -1)
        for i, mode in enumerate(self.modes):
            if mode in ("select", "oracle") and layer >= self.dense_layers and N:
                self._scores(layer, mode, probs[:, :, i * T:(i + 1) * T, n * T:], g)
        return probs @ v.repeat_interleave(g, 1)

    def _scores(self, layer, mode, p, g):
        """p [batch, Hq, T, N]: the copy's exact softmax entries on the clean copy."""
        batch, hq, T, N = p.shape
        bs, nb = self.block_size, self.n_blocks
        scores = p.reshape(batch, hq // g, g, nb, bs, N).mean(dim=(2, 4))   # [batch, Hkv, nb, N]
        kk = min(self.k, N)
        lens = (self.start_block + torch.arange(nb)) * bs
        top = scores.topk(kk, -1).indices
        sets = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        sets &= torch.arange(N)[None, None, None, :] < lens[None, None, :, None]
        if mode == "select":
            self.ref_selections[layer] = sets
            pos = torch.where(sets, torch.arange(N), N).sort(-1).values[..., :kk]
            idx = torch.where(pos == N, -1, pos).int().transpose(1, 2).contiguous()
            self.selections[layer] = (idx, sets.sum(-1).int().transpose(1, 2).contiguous())
            return
        chosen = _selection_mask(self, layer, batch, scores.shape[1])[:, :, ::bs]  # [b, Hkv, nb, N]
        rows = (lens > kk)[None, None, :].expand(batch, scores.shape[1], nb)
        set_r = ((sets & chosen).sum(-1).double() / kk)[rows]
        mass = ((scores * chosen).sum(-1) / scores.sum(-1))[rows]
        s, m, n = self.ref_recall.get(layer, (0.0, 0.0, 0))
        self.ref_recall[layer] = (s + float(set_r.sum()), m + float(mass.sum()), n + int(rows.sum()))


def _run_mage_ft_passes(layout_cls, model, gen_seed, bs, nb, k, dense, batch=2):
    """Selection (all-[MASK] copy, select) + teacher (two copies, oracle) without grad, then the
    sparse student forward (two copies) with a CE loss; returns layout, hidden, loss."""
    g = torch.Generator().manual_seed(gen_seed)
    T = nb * bs
    layout = layout_cls(bs, T, T, k=k, dense_layers=dense)
    x0 = random_ids(g, batch, T)
    xt = [torch.where(torch.rand(batch, T, generator=g) < 0.5, MASK_ID, x0) for _ in range(2)]
    all_mask = torch.full_like(x0, MASK_ID)
    with torch.no_grad():
        teacher = layout.hidden_states(model, [all_mask] + xt, x0, ["select", "oracle", "oracle"])
    h = layout.hidden_states(model, xt, x0, ["sparse", "sparse"])
    targets = random_ids(g, batch, h.shape[1])
    w = torch.rand(batch, h.shape[1], generator=g, dtype=torch.float64)
    return layout, teacher, h, ce_loss(model, h, targets, w)


@pytest.mark.parametrize("family, kv_heads", [("qwen2", 2), ("qwen3", 2), ("qwen2", 1)])
def test_mage_ft_passes_equal_explicit_reference(family, kv_heads, gen):
    """select -> oracle -> sparse through the ops equals the explicit-mask reference: the same
    selections (sets), teacher hidden states, student hidden states, loss, gradients, recall.
    (One KV head: transformers' k and v then differ in the stride of that size-1 dim.)"""
    bs, nb, k, dense = 4, 5, 6, 1
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    model = model_f64(family, kv_heads=kv_heads)
    lay, teacher, h, loss = _run_mage_ft_passes(TrainLayout, model, seed, bs, nb, k, dense)
    ref, teacher_r, h_r, loss_r = _run_mage_ft_passes(ReferenceLayout, model, seed, bs, nb, k,
                                                      dense)
    n_layers = model.config.num_hidden_layers
    assert sorted(lay.selections) == list(range(dense, n_layers))
    for layer in range(dense, n_layers):
        idx, cnt = lay.selections[layer]
        got = _selection_mask(lay, layer, 2, kv_heads)[:, :, ::bs]
        assert torch.equal(got, ref.ref_selections[layer]), f"layer {layer}"
    assert (teacher - teacher_r).abs().max() < 1e-10
    assert (h - h_r).abs().max() < 1e-10
    assert abs(float(loss.detach() - loss_r.detach())) < 1e-10
    for a, b in zip(grads(model, loss), grads(model, loss_r)):
        assert (a - b).abs().max() < 1e-9
    summary = lay.recall_summary()
    for layer in range(dense, n_layers):
        s, m, n = ref.ref_recall[layer]
        assert n > 0
        assert summary["per_layer"][layer]["set_recall"] == pytest.approx(s / n, abs=1e-12)
        # the op's scores are float32 (also for float64 inputs)
        assert summary["per_layer"][layer]["mass_recall"] == pytest.approx(m / n, abs=1e-6)


def test_sparse_reads_only_the_selection(gen):
    """Keys of clean entries outside a block's selection do not change its output: perturbing
    the clean copy's unselected tokens leaves a sparse layer's noisy output equal; and with
    k >= the prefix a sparse copy equals the exact copy."""
    bs, nb = 4, 4
    model = model_f64("qwen2", layers=2)
    T = nb * bs
    x0 = random_ids(gen, 1, T)
    xt = torch.where(torch.rand(1, T, generator=gen) < 0.5, MASK_ID, x0)
    full = TrainLayout(bs, T, T, k=T, dense_layers=0)
    with torch.no_grad():
        full.hidden_states(model, [torch.full_like(x0, MASK_ID)], x0, ["select"])
        a = full.hidden_states(model, [xt], x0, ["sparse"])
        b = full.hidden_states(model, [xt], x0, ["exact"])
    assert (a - b).abs().max() < 1e-12


def test_bad_uses_raise_clear_errors():
    model = model_f64("qwen2", layers=2)
    lay = TrainLayout(4, 8, 8, k=2, dense_layers=0)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="layer 0 has no selection"):
        lay.hidden_states(model, [ids], ids, ["sparse"])
    with pytest.raises(ValueError, match="modes must be among"):
        lay.hidden_states(model, [ids], ids, ["dense"])
    with pytest.raises(ValueError, match="one mode per noisy copy"):
        lay.hidden_states(model, [ids, ids], ids, ["exact"])
    with pytest.raises(ValueError, match=r"noisy\[0\] must be \[batch, 8\]"):
        lay.hidden_states(model, [ids[:, :4]], ids, ["exact"])
    with pytest.raises(ValueError, match="need a budget k"):
        TrainLayout(4, 8, 8).hidden_states(model, [ids], ids, ["select"])
    with pytest.raises(ValueError, match="multiples of block_size"):
        TrainLayout(4, 6, 8)
    with pytest.raises(ValueError, match="need the clean prefix up to 12"):
        TrainLayout(4, 8, 8, start_block=2)
    with torch.no_grad():   # a selection for batch 1 does not fit a batch-2 forward
        lay.hidden_states(model, [ids], ids, ["select"])
    with pytest.raises(RuntimeError, match="selection is for"):
        lay.hidden_states(model, [ids.repeat(2, 1)], ids.repeat(2, 1), ["sparse"])


def test_gradient_checkpointing_and_peft_lora(gen):
    """The layout under transformers' activation checkpointing and a peft LoRA wrapper: the
    same loss and LoRA gradients as without checkpointing."""
    peft = pytest.importorskip("peft")
    bs, nb = 4, 3
    T = nb * bs
    model = model_f64("qwen3", layers=2)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    x0 = random_ids(gen, 2, T)
    xt = torch.where(torch.rand(2, T, generator=gen) < 0.5, MASK_ID, x0)
    targets = random_ids(gen, 2, 2 * T)
    w = torch.rand(2, 2 * T, generator=gen, dtype=torch.float64)
    results = []
    for ckpt in (False, True):
        lay = TrainLayout(bs, T, T, k=3, dense_layers=1)
        base = causal_lm(lora)
        if ckpt:
            enable_activation_checkpointing(base)
        base.train()
        with torch.no_grad():
            lay.hidden_states(lora, [torch.full_like(x0, MASK_ID)], x0, ["select"])
        calls, attend = [], lay.attend
        lay.attend = lambda *a: calls.append(a[0]) or attend(*a)
        h = lay.hidden_states(lora, [xt], x0, ["sparse"])
        loss = ce_loss(lora, h, targets, w)
        results.append((loss, grads(lora, loss)))
        assert sorted(calls) == ([0, 0, 1, 1] if ckpt else [0, 1])  # re-run in the backward
    (l0, g0), (l1, g1) = results
    assert abs(float(l0.detach() - l1.detach())) < 1e-12
    assert len(g0) > 0 and all((a - b).abs().max() < 1e-12 for a, b in zip(g0, g1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("xt_blocks", [[0, 1, 2, 3], [2, 3]])
def test_bd_objective_mage_attention_equals_sdpa(family, xt_blocks, gen):
    """finetune/bd_objective.loss with attention="mage" (the ops) equals the SDPA path (the
    dense-mask reference): loss and every gradient, the whole layout and its partial form."""
    bs, n_blocks, batch = 4, 4, 2
    model = model_f64(family)
    tokens = random_ids(gen, batch, bs * n_blocks)
    weight = torch.rand(batch, bs * n_blocks, generator=gen)
    force = torch.zeros(batch, bs * n_blocks, dtype=torch.bool)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out = {}
    for attention in ("sdpa", "mage"):
        g = torch.Generator().manual_seed(seed)
        loss, stats = BD.loss(model, tokens, weight, force, force, xt_blocks, bs, MASK_ID, g,
                              attention=attention)
        out[attention] = (loss.detach(), grads(model, loss), stats["tokens"])
    assert out["sdpa"][2] == out["mage"][2] > 0
    assert abs(float(out["sdpa"][0] - out["mage"][0])) < 1e-10
    for a, b in zip(out["sdpa"][1], out["mage"][1]):
        assert (a - b).abs().max() < 1e-9
    with pytest.raises(ValueError, match="consecutive xt_blocks"):
        BD.loss(model, tokens, weight, force, force, [0, 2], bs, MASK_ID, attention="mage")


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_with_cpu_float64(family, dtype, tol, gen, device):
    """The three MAGE-FT passes on ``device`` in ``dtype`` (head dim 64, block 16, GQA 2) against
    the same passes in float64 on the CPU: selections overlap, teacher / student hidden states,
    loss and gradients agree to ``tol`` (the student uses the CPU's selection so that a near-tie
    picked differently cannot move it)."""
    bs, nb, k, dense = 16, 6, 24, 1
    T = nb * bs
    # (a moderate init: with tiny_models' peaked default, bf16 itself drifts 20% in 3 layers)
    shape = dict(layers=3, heads=4, kv_heads=2, head_dim=64, initializer_range=0.05)
    ref_model = model_f64(family, **shape)
    model = tiny_model(family, **shape).to(device, dtype)
    x0 = random_ids(gen, 2, T)
    xt = [torch.where(torch.rand(2, T, generator=gen) < 0.5, MASK_ID, x0) for _ in range(2)]
    targets = random_ids(gen, 2, 3 * T)
    w = torch.rand(2, 3 * T, generator=gen, dtype=torch.float64)
    runs = []
    for m, dev in ((ref_model, "cpu"), (model, device)):
        lay = TrainLayout(bs, T, T, k=k, dense_layers=dense)
        ids = [t.to(dev) for t in xt]
        with torch.no_grad():
            teacher = lay.hidden_states(m, [torch.full_like(ids[0], MASK_ID)] + ids, x0.to(dev),
                                        ["select", "oracle", "oracle"])
        chosen = {layer: _selection_mask(lay, layer, 2, 2).cpu() for layer in lay.selections}
        if runs:
            lay.selections = {layer: tuple(t.to(dev) for t in sel)
                              for layer, sel in runs[0]["selections"].items()}
        h = lay.hidden_states(m, ids, x0.to(dev), ["sparse", "sparse"])
        loss = ce_loss(m, h, targets.to(dev), w.to(dev))
        runs.append(dict(selections=lay.selections, chosen=chosen, teacher=teacher, h=h,
                         loss=loss, grads=grads(m, loss), recall=lay.recall_summary()))
    b, a = runs
    for layer, want in b["chosen"].items():
        overlap = float((a["chosen"][layer] & want).sum() / want.sum())
        assert overlap > (0.97 if dtype == torch.float32 else 0.85), f"layer {layer}: {overlap}"
    assert _rel(a["teacher"], b["teacher"]) < tol
    assert _rel(a["h"], b["h"]) < tol
    assert abs(float(a["loss"].detach()) - float(b["loss"].detach())) < tol * abs(float(b["loss"].detach()))
    for ga, gb in zip(a["grads"], b["grads"]):
        assert _rel(ga, gb) < 5 * tol
    assert abs(a["recall"]["mass_recall"] - b["recall"]["mass_recall"]) < 0.05


def test_cpu_float32_matches_float64(gen):
    compare_with_cpu_float64("qwen3", torch.float32, 2e-3, gen, "cpu")


@requires_cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_cuda_mage_ft_passes_match_cpu_float64(family, dtype, tol, gen):
    compare_with_cpu_float64(family, dtype, tol, gen, "cuda")
