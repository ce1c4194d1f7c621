"""Block-diffusion objective of finetune/: the mask against a brute-force rule, the subset-of-blocks
layout against the full one, and a short CPU run (one step per phase) that writes a loadable checkpoint."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "finetune"))

import bd_objective as BD  # noqa: E402
import train_tiny  # noqa: E402

from mage_ext.eval import vocab as V  # noqa: E402


def brute_mask(entries, bs, n_x0, window=None):
    """Spec section 5 rule, one pair at a time."""
    slots = [("t", e, b * bs + o) for e, b in enumerate(entries) for o in range(bs)]
    slots += [("0", -1, p) for p in range(n_x0)]
    n = len(slots)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, (ki, ei, pi) in enumerate(slots):
        for j, (kj, ej, pj) in enumerate(slots):
            bi, bj = pi // bs, pj // bs
            if ki == "t" and kj == "t":
                m[i, j] = ei == ej                       # within its own noisy block, both ways
            elif ki == "t":
                m[i, j] = bj < bi and (window is None or bj >= bi - window)
            elif kj == "0":
                m[i, j] = bj <= bi                       # clean copy: block-causal
    return m


@pytest.mark.parametrize("entries,n_x0,window", [
    ([0, 1, 2, 3, 0, 1, 2, 3], 12, None),   # all blocks, two copies, B = 4
    ([2, 3, 2, 3], 12, None),               # last blocks only
    ([3], 12, 1),                           # the eval control
    ([1, 3], 16, 2),
])
def test_mask_matches_rule(entries, n_x0, window):
    assert torch.equal(BD.attention_mask(entries, 4, n_x0, window), brute_mask(entries, 4, n_x0, window))


def test_layout_positions_and_shift():
    entry, blk, pos = BD.layout([1, 3], 4)
    assert pos.tolist() == [4, 5, 6, 7, 12, 13, 14, 15] + list(range(12))
    assert entry.tolist()[:8] == [0] * 4 + [1] * 4 and blk.tolist()[:4] == [1] * 4
    src = BD.shift_sources([0, 2], 4)
    # slot 0 (block 0 start) has no predecessor; block 2's start reads x_0 position 7 (layout 8 + 7)
    assert src.tolist() == [-1, 0, 1, 2, 8 + 7, 4, 5, 6]
    with pytest.raises(ValueError, match="xt_blocks"):
        BD.layout([], 4)
    with pytest.raises(ValueError, match="multiple of block_size"):
        BD.layout([1], 4, n_x0=6)


def test_noise_complement_and_overrides():
    g = torch.Generator().manual_seed(0)
    tokens = torch.arange(100, 132).reshape(1, 32)
    force = torch.zeros(1, 32, dtype=torch.bool)
    keep = torch.zeros(1, 32, dtype=torch.bool)
    force[0, 20], keep[0, 21] = True, True
    xt, masked, idx = BD.noise(tokens, force, keep, [2, 3], 8, mask_id=2, gen=g)
    a, b = masked[0, :16], masked[0, 16:]
    free = torch.ones(16, dtype=torch.bool)
    free[4], free[5] = False, False                   # token 20 and 21 are slots 4 and 5 (block 2)
    assert torch.equal(a[free], ~b[free])              # complementary copies
    assert a[4] and b[4] and not a[5] and not b[5]
    assert torch.equal(xt[masked], torch.full((int(masked.sum()),), 2))
    assert torch.equal(xt[~masked], tokens[0, idx][~masked[0]])


def _tiny_recipe(tmp_path, layers=2):
    r = json.load(open(os.path.join(ROOT, "finetune", "tiny_recipe.json")))
    r["model"].update(num_hidden_layers=layers, hidden_size=128, intermediate_size=256,
                      num_attention_heads=2, num_key_value_heads=1)
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps(r))
    return str(p), r


def test_subset_layout_equals_full(tmp_path):
    """A noisy block's hidden states do not depend on which other blocks have x_t copies."""
    _, r = _tiny_recipe(tmp_path)
    torch.manual_seed(0)
    model = train_tiny.build_model(r).eval()
    model.config._attn_implementation = "sdpa"
    bs, nb = 8, 4
    tok = torch.randint(10, 500, (1, bs * nb))
    xt = tok.clone()
    xt[0, ::3] = 2

    def run(entries):
        n_x0 = max(entries) * bs
        idx = torch.cat([b * bs + torch.arange(bs) for b in entries])
        ids = torch.cat([xt[:, idx], tok[:, :n_x0]], 1)
        _, _, pos = BD.layout(entries, bs, n_x0)
        return BD.hidden_states(model, ids, BD.attention_mask(entries, bs, n_x0), pos)

    with torch.no_grad():
        full, part = run([0, 1, 2, 3]), run([2])
    torch.testing.assert_close(part[0, :bs], full[0, 2 * bs:3 * bs], atol=1e-5, rtol=1e-5)


def test_real_recipe_fits_the_size_limit():
    r = train_tiny.load_recipe(os.path.join(ROOT, "finetune", "tiny_recipe.json"), smoke=False)
    n = sum(p.numel() for p in train_tiny.build_model(r).parameters())
    assert n * 2 <= 12e6, "bf16 weights must stay <= 12 MB"


def test_smoke_run_writes_loadable_checkpoint(tmp_path):
    from transformers import Qwen2ForCausalLM

    recipe, r = _tiny_recipe(tmp_path)
    n_phases = len(r["phases"])                          # --smoke: one step per phase
    out = tmp_path / "ck"
    res = train_tiny.train(train_tiny.parse_args(
        ["--out", str(out), "--recipe", recipe, "--device", "cpu", "--smoke"]))
    assert res["steps"] == n_phases
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "train_log.json",
              "eval.json"):
        assert (out / f).is_file(), f
    m = Qwen2ForCausalLM.from_pretrained(str(out))
    assert m.config.mask_token_id == V.token_to_id()[V.MASK]
    assert next(m.parameters()).dtype == torch.bfloat16
    assert len(json.load(open(out / "train_log.json"))) == n_phases
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|mask|>") == m.config.mask_token_id
    # resume continues from the saved state (all phases done: no new steps)
    res2 = train_tiny.train(train_tiny.parse_args(
        ["--out", str(tmp_path / "ck2"), "--recipe", recipe, "--device", "cpu", "--smoke",
         "--resume", str(out), "--no-eval"]))
    assert res2["steps"] == n_phases


def test_bad_args(tmp_path):
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--out", "x", "--minutes", "0"])
    p = tmp_path / "r.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match="lacks the key"):
        train_tiny.load_recipe(str(p), smoke=False)


def test_position_head_init_attends_to_offset(tmp_path):
    import tiny_init

    _, r = _tiny_recipe(tmp_path)
    torch.manual_seed(0)
    model = train_tiny.build_model(r).eval()
    model.config._attn_implementation = "eager"
    tiny_init.apply(model, {"position_heads": {"heads": [{"layer": 0, "q_head": 0, "offset": -1},
                                                         {"layer": 0, "q_head": 1, "offset": 1}]}})
    ids = torch.randint(400, 1400, (1, 48))
    full = torch.zeros(1, 1, 48, 48)                     # additive 0: everyone sees everyone
    with torch.no_grad():
        att = model(ids, attention_mask=full, output_attentions=True).attentions[0][0]
    i = torch.arange(1, 47)
    assert att[0, i, i - 1].min() > 0.9 and att[1, i, i + 1].min() > 0.9
    with pytest.raises(ValueError, match="unknown keys"):
        tiny_init.apply(model, {"lag": {}})
