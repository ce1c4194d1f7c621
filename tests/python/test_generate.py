"""Generation loop through the mage ops vs. a plain reference loop on stock transformers.

The references below run the stock model (sdpa) on the whole sequence with an explicit
block-causal mask and no cache, and apply the decoding rules written out again for one
sequence with greedy decoding. Model seeds are fixed: token-for-token comparisons need clear
argmax winners, which a fixed tiny model is known to give.
"""
import pytest
import torch

from mage_ext import PolicyConfig, disable_mage, enable_mage, generate
from tiny_models import MASK_ID, VOCAB, block_causal_logits, one_thread, tiny_model  # noqa: F401


def ref_fast_dllm(model, prompt, B, sub, thr, max_new):
    start = len(prompt) // B * B
    seq = list(prompt)
    if len(prompt) % B == 0:
        seq.append(int(block_causal_logits(model, seq, B)[-1].argmax()))
    x = seq[start:] + [MASK_ID] * (B - len(seq[start:]))
    while True:
        for s0 in range(0, B, sub):
            while MASK_ID in x[s0:s0 + sub]:
                lg = block_causal_logits(model, seq[:start] + x, B)[start:]
                lg = torch.cat([lg[:1], lg[:-1]])          # token shift
                p = lg.softmax(-1)
                conf, tok = p.max(-1)
                cand = [i for i in range(s0, s0 + sub) if x[i] == MASK_ID]
                best = max(cand, key=lambda i: float(conf[i]))
                for i in cand:
                    if i == best or float(conf[i]) > thr:
                        x[i] = int(tok[i])
        seq = seq[:start] + x
        if len(seq) - len(prompt) >= max_new:
            return seq[len(prompt):len(prompt) + max_new]
        nxt = int(block_causal_logits(model, seq, B)[-1].argmax())
        start += B
        x = [nxt] + [MASK_ID] * (B - 1)


def ref_sdar(model, prompt, B, steps, max_new, dynamic=False, thr=0.9):
    start = len(prompt) // B * B
    seq = list(prompt)
    x = seq[start:] + [MASK_ID] * (B - len(seq[start:]))
    sched = [B // steps + (1 if i < B % steps else 0) for i in range(steps)]
    while True:
        for n in sched:
            cand = [i for i in range(B) if x[i] == MASK_ID]
            if not cand:
                break
            p = block_causal_logits(model, seq[:start] + x, B)[start:].softmax(-1)
            conf, tok = p.max(-1)
            ranked = sorted(cand, key=lambda i: -float(conf[i]))
            high = [i for i in cand if float(conf[i]) > thr]
            chosen = high if dynamic and len(high) >= n else ranked[:n]
            for i in chosen:
                x[i] = int(tok[i])
        seq = seq[:start] + x
        if len(seq) - len(prompt) >= max_new:
            return seq[len(prompt):len(prompt) + max_new]
        start += B
        x = [MASK_ID] * B


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("length", [5, 16, 21])
def test_fast_dllm_exact_matches_reference(family, length):
    model = tiny_model(family)
    prompt = _prompts([length])[0]
    want = ref_fast_dllm(model, prompt, B=8, sub=4, thr=0.3, max_new=19)
    res = generate(model, input_ids=[prompt], policy=PolicyConfig(method="exact"),
                   style="fast_dllm", block_size=8, sub_block=4, threshold=0.3,
                   max_new_tokens=19, mask_id=MASK_ID, stop_ids=[])
    assert res.token_ids[0] == want
    assert res.kv_fraction == 1.0


@pytest.mark.parametrize("remasking", ["low_confidence_static", "low_confidence_dynamic"])
@pytest.mark.parametrize("length", [3, 8, 13])
def test_sdar_exact_matches_reference(remasking, length):
    model = tiny_model("qwen3", seed=8)
    prompt = _prompts([length], seed=3)[0]
    dyn = remasking.endswith("dynamic")
    want = ref_sdar(model, prompt, B=4, steps=3, max_new=10, dynamic=dyn, thr=0.25)
    res = generate(model, input_ids=[prompt], policy=PolicyConfig(method="exact"), style="sdar",
                   block_size=4, steps=3, remasking=remasking, threshold=0.25,
                   max_new_tokens=10, mask_id=MASK_ID, stop_ids=[])
    assert res.token_ids[0] == want


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("commit", ["sparse", "exact"])
def test_mage_with_budget_above_cache_equals_exact(adaptive, commit):
    model = tiny_model("qwen2", layers=3)
    prompts = _prompts([29, 11])
    kw = dict(style="fast_dllm", block_size=8, sub_block=4, threshold=0.3, max_new_tokens=20,
              mask_id=MASK_ID, stop_ids=[])
    exact = generate(model, input_ids=prompts, policy=PolicyConfig(method="exact"), **kw)
    mage = generate(model, input_ids=prompts, policy=PolicyConfig(
        method="mage", k=64, dense_layers=1, adaptive=adaptive, k_min=64,
        commit_attention=commit), **kw)
    assert mage.token_ids == exact.token_ids
    assert mage.kv_fraction == pytest.approx(1.0)


def test_mage_small_budget_reads_less_and_runs_both_styles():
    model = tiny_model("qwen3", layers=3)
    prompts = _prompts([40, 17])
    pol = PolicyConfig(method="mage", k=8, dense_layers=1)
    for style in ("fast_dllm", "sdar"):
        res = generate(model, input_ids=prompts, policy=pol, style=style, block_size=8,
                       sub_block=4, steps=4, max_new_tokens=12, mask_id=MASK_ID, stop_ids=[])
        assert [len(t) for t in res.token_ids] == [12, 12]
        assert res.kv_fraction < 0.9
        assert res.median_step_time(first=True) is not None


@pytest.mark.parametrize("policy", [PolicyConfig(method="exact"),
                                    PolicyConfig(method="mage", k=8, dense_layers=1),
                                    PolicyConfig(method="mage", k=8, dense_layers=1,
                                                 adaptive=True, k_min=4)])
@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_batch_equals_single(policy, style):
    model = tiny_model("qwen2", layers=3, seed=4)
    prompts = _prompts([3, 26, 16, 9], seed=5)
    kw = dict(policy=policy, style=style, block_size=8, sub_block=4, threshold=0.3, steps=4,
              remasking="low_confidence_dynamic", max_new_tokens=14, mask_id=MASK_ID,
              stop_ids=[])
    batch = generate(model, input_ids=prompts, **kw)
    for i, p in enumerate(prompts):
        assert generate(model, input_ids=[p], **kw).token_ids[0] == batch.token_ids[i]


@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_reused_prefix_equals_fresh_prefill(style):
    model = tiny_model("qwen2", layers=3, seed=2)
    prompts = _prompts([32, 19, 27], seed=3)  # one block-aligned prompt (fast_dllm's prefill token)
    kw = dict(style=style, block_size=8, sub_block=4, threshold=0.3, steps=4, max_new_tokens=12,
              mask_id=MASK_ID, stop_ids=[])
    first = generate(model, input_ids=prompts, policy=PolicyConfig(method="exact"),
                     keep_prefix=True, **kw)
    assert first.prefix is not None
    for pol in (PolicyConfig(method="exact"), PolicyConfig(method="mage", k=8, dense_layers=1),
                PolicyConfig(method="quest", k=8, dense_layers=1, quest_page_size=4)):
        fresh = generate(model, input_ids=prompts, policy=pol, **kw)
        reused = generate(model, input_ids=prompts, policy=pol, prefix=first.prefix, **kw)
        assert reused.token_ids == fresh.token_ids
        assert reused.kv_fraction == pytest.approx(fresh.kv_fraction)
    with pytest.raises(ValueError, match="prefix was prefilled for other prompts"):
        generate(model, input_ids=prompts[:2], policy=PolicyConfig(), prefix=first.prefix, **kw)
    with pytest.raises(TypeError, match="prefix must be a Prefix"):
        generate(model, input_ids=prompts, policy=PolicyConfig(), prefix=object(), **kw)


def test_stop_id_ends_a_sequence():
    model = tiny_model("qwen2")
    prompt = _prompts([12])[0]
    kw = dict(policy=PolicyConfig(method="exact"), block_size=8, sub_block=4,
              max_new_tokens=24, mask_id=MASK_ID)
    free = generate(model, input_ids=[prompt], stop_ids=[], **kw).token_ids[0]
    stop = free[5]
    res = generate(model, input_ids=[prompt], stop_ids=[stop], **kw)
    assert res.token_ids[0] == free[:free.index(stop)]
    assert res.stopped == [True]


def test_on_block_and_step_records():
    model = tiny_model("qwen2", layers=2)
    seen = []
    res = generate(model, input_ids=_prompts([20]), policy=PolicyConfig(method="exact"),
                   block_size=8, sub_block=8, max_new_tokens=10, mask_id=MASK_ID, stop_ids=[],
                   on_block=lambda i, ids: seen.append((i, ids.shape)))
    assert seen == [(0, (1, 8)), (1, (1, 8))]
    phases = [r.phase for r in res.steps]
    # the two full prompt blocks are prefilled in one chunk (block-causal inside it)
    assert phases[:2] == ["prefill", "denoise"] and "commit" in phases
    assert sum(r.first for r in res.steps) == 2


def test_enable_only_changes_that_model():
    a, b = tiny_model("qwen2", layers=2), tiny_model("qwen2", layers=2)
    shared = tiny_model("qwen2", layers=2)
    from transformers import Qwen2ForCausalLM
    twin = Qwen2ForCausalLM(shared.config).eval()      # same config object as `shared`
    ids = torch.tensor([_prompts([9])[0]])
    before = b(ids).logits
    enable_mage(a)
    enable_mage(shared)
    assert a.config._attn_implementation == "mage"
    assert a.model.layers[0].self_attn.config._attn_implementation == "mage"
    assert b.config._attn_implementation == "sdpa"
    assert twin.config._attn_implementation == "sdpa"
    assert torch.equal(b(ids).logits, before)
    twin(ids)                                           # still stock attention
    with pytest.raises(RuntimeError, match="no MageCache"):
        a(ids)
    disable_mage(a)
    assert a.config._attn_implementation == "sdpa"
    a(ids)


def test_generate_leaves_model_as_it_was():
    model = tiny_model("qwen2", layers=2)
    generate(model, input_ids=_prompts([10]), policy=PolicyConfig(method="exact"), block_size=8,
             max_new_tokens=4, mask_id=MASK_ID, stop_ids=[])
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "_mage_policy")


def test_a_call_without_a_policy_does_not_inherit_the_last_ones():
    """The default policy of a later call is PolicyConfig(), whatever an earlier call used (it
    once kept the last call's policy: k=2 here, silently)."""
    kw = dict(input_ids=_prompts([40]), block_size=8, max_new_tokens=24, mask_id=MASK_ID,
              stop_ids=[])
    fresh = generate(tiny_model("qwen2", layers=2), **kw)
    model = tiny_model("qwen2", layers=2)
    small = generate(model, policy=PolicyConfig(method="mage", k=2, dense_layers=0), **kw)
    later = generate(model, **kw)
    assert later.kv_fraction == fresh.kv_fraction != small.kv_fraction
    assert later.token_ids == fresh.token_ids
    enable_mage(model, PolicyConfig(method="mage", k=2, dense_layers=0))  # a default while enabled
    assert generate(model, **kw).kv_fraction == small.kv_fraction
    disable_mage(model)
    assert generate(model, **kw).kv_fraction == fresh.kv_fraction


class _WordTokenizer:
    """encode/decode over whitespace-separated integers (a stand-in for tokenizers.Tokenizer)."""

    def encode(self, text):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


# Bad inputs at generate(): (kwargs, error type, message). Each fails before anything runs; the
# README's table of user-surface errors lists these ids.
BAD_GENERATE_ARGS = {
    "empty prompt": (dict(input_ids=[[]]), ValueError, "prompt 0 is empty"),
    "empty text prompt": (dict(prompts=["1 2", ""], tokenizer=_WordTokenizer()), ValueError,
                          "prompt 1 is empty"),
    "no prompts": (dict(input_ids=[]), ValueError, "no prompts"),
    "text and ids": (dict(input_ids=[[1, 2]], prompts=["hi"]), ValueError, "exactly one"),
    "text without tokenizer": (dict(prompts=["hi"]), ValueError, "tokenizer"),
    "non-text prompt": (dict(prompts=["1", 2], tokenizer=_WordTokenizer()), TypeError,
                        "prompt 1 is a int"),
    "float ids": (dict(input_ids=[[1, 2.5]]), TypeError, "integer token ids"),
    "float id tensor": (dict(input_ids=torch.ones(1, 3)), TypeError, "integer token ids"),
    "3-D id tensor": (dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), ValueError,
                      r"\[batch, n\]"),
    "id past the vocabulary": (dict(input_ids=[[1, 2], [3, VOCAB]]), ValueError,
                               f"prompt 1 holds token id {VOCAB} at position 1"),
    "negative id": (dict(input_ids=[[-1, 2]]), ValueError, "token id -1 at position 0"),
    "prompt past the positions": (dict(input_ids=[[1] * 513]), ValueError,
                                  "prompt 0 has 513 tokens, more than"),
    "prompt + new tokens past the positions": (dict(input_ids=[[1, 2]], max_new_tokens=600),
                                               ValueError, "max_position_embeddings"),
    "max_new_tokens 0": (dict(input_ids=[[1, 2]], max_new_tokens=0), ValueError,
                         "max_new_tokens"),
    "max_new_tokens not an int": (dict(input_ids=[[1, 2]], max_new_tokens=8.0), TypeError,
                                  "max_new_tokens must be an int"),
    "block_size 0": (dict(input_ids=[[1, 2]], block_size=0), ValueError, "block_size must be > 0"),
    "block_size not an int": (dict(input_ids=[[1, 2]], block_size=7.5), TypeError,
                              "block_size must be an int"),
    "fast_dllm block of 1": (dict(input_ids=[[1, 2]], block_size=1, sub_block=1), ValueError,
                             "block_size >= 2"),
    "sub_block not dividing": (dict(input_ids=[[1, 2]], sub_block=3), ValueError, "sub_block"),
    "sdar steps past the block": (dict(input_ids=[[1, 2]], style="sdar", steps=9), ValueError,
                                  "steps"),
    "fixed_steps past the block": (dict(input_ids=[[1, 2]], fixed_steps=9), ValueError,
                                   "fixed_steps"),
    "unknown style": (dict(input_ids=[[1, 2]], style="other"), ValueError, "style"),
    "unknown remasking": (dict(input_ids=[[1, 2]], remasking="random"), ValueError, "remasking"),
    "threshold above 1": (dict(input_ids=[[1, 2]], threshold=1.5), ValueError, "threshold"),
    "negative temperature": (dict(input_ids=[[1, 2]], temperature=-0.5), ValueError,
                             "temperature"),
    "NaN temperature": (dict(input_ids=[[1, 2]], temperature=float("nan")), ValueError,
                        "temperature"),
    "top_p 0": (dict(input_ids=[[1, 2]], top_p=0.0), ValueError, "top_p"),
    "top_p above 1": (dict(input_ids=[[1, 2]], top_p=1.5), ValueError, "top_p"),
    "stop id past the vocabulary": (dict(input_ids=[[1, 2]], stop_ids=[3, VOCAB + 7]),
                                    ValueError, f"stop id {VOCAB + 7} is outside"),
    "negative stop id": (dict(input_ids=[[1, 2]], stop_ids=[-2]), ValueError,
                         "stop id -2 is outside"),
    "mask id past the vocabulary": (dict(input_ids=[[1, 2]], mask_id=VOCAB), ValueError,
                                    f"mask_id {VOCAB} is outside"),
    "per-layer k of another depth": (dict(input_ids=[[1, 2]],
                                          policy=PolicyConfig(method="mage", k=(4, 4, 4))),
                                     ValueError, "3 per-layer budgets for a model with 1 layers"),
    "policy not a PolicyConfig": (dict(input_ids=[[1, 2]], policy="mage"), TypeError,
                                  "PolicyConfig"),
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATE_ARGS))
def test_bad_arguments(case):
    kwargs, error, match = BAD_GENERATE_ARGS[case]
    model = tiny_model("qwen2", layers=1)
    base = dict(policy=PolicyConfig(method="exact"), block_size=8, mask_id=MASK_ID)
    with pytest.raises(error, match=match):
        generate(model, **{**base, **kwargs})


def test_mask_id_unknown():
    model = tiny_model("qwen2", layers=1, mask_token_id=None)
    with pytest.raises(ValueError, match="mask_id is unknown"):
        generate(model, input_ids=[[1, 2]], block_size=8)


def test_prefix_of_another_model_is_refused():
    kw = dict(policy=PolicyConfig(method="exact"), block_size=8, max_new_tokens=8,
              mask_id=MASK_ID, stop_ids=[])
    prompts = _prompts([20])
    res = generate(tiny_model("qwen2", layers=2), input_ids=prompts, keep_prefix=True, **kw)
    with pytest.raises(ValueError, match="2 / 2 layers of keys / values for a model of 3"):
        generate(tiny_model("qwen2", layers=3), input_ids=prompts, prefix=res.prefix, **kw)
    with pytest.raises(ValueError, match=r"keys\[0\] has shape"):
        generate(tiny_model("qwen2", layers=2, kv_heads=4), input_ids=prompts, prefix=res.prefix,
                 **kw)


def test_bad_policy_values():
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyConfig(method="magic")
    for k in (0, -3, (4, 0), 2.5):
        with pytest.raises(ValueError, match="positive integers"):
            PolicyConfig(k=k)
    with pytest.raises(TypeError, match="PolicyConfig"):
        generate(tiny_model("qwen2", layers=1), input_ids=[[1]], policy="mage", mask_id=MASK_ID)
