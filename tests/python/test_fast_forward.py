"""The lean fused forward (mage_ext/hf/fast_forward.py) and the device-side block loop: the same
logits and tokens as the stock transformers forward, weights shared not copied, clear fallback;
on a GPU the graphed fast path gives the eager tokens and makes no host synchronisation inside
a block."""
import pytest
import torch

from conftest import requires_cuda
from mage_ext import PolicyConfig, generate
from mage_ext.core.loop import BlockLoop
from mage_ext.hf import fast_forward
from mage_ext.hf.cache import MageCache
from tiny_models import MASK_ID, VOCAB, block_causal_logits, one_thread, tiny_model  # noqa: F401

POLICIES = [PolicyConfig(method="exact"), PolicyConfig(method="mage", k=8, dense_layers=1)]


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_fused_forward_logits_equal_the_stock_forward(family):
    model = tiny_model(family, layers=3, seed=2)
    seqs = _prompts([16, 16], seed=3)
    cache = MageCache.for_model(model, 2, 64, PolicyConfig(method="exact"))
    cache.begin_prefill()  # one chunk of 16 = one bidirectional block over an empty cache
    with torch.no_grad():
        fused = fast_forward.FastForward(model, cache)(torch.tensor(seqs))
    for b, tokens in enumerate(seqs):
        stock = block_causal_logits(model, tokens, block=16)
        got = fused[b].float()
        got[:, MASK_ID] = float("-inf")
        torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("policy", POLICIES, ids=["exact", "mage"])
@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_fused_generation_equals_stock_generation(family, policy, style):
    model = tiny_model(family, layers=3, seed=3)
    kw = dict(policy=policy, style=style, block_size=8, max_new_tokens=20, mask_id=MASK_ID,
              stop_ids=[], threshold=0.5, input_ids=_prompts([70, 41]))
    stock = generate(model, fused=False, **kw)
    fused = generate(model, fused=True, **kw)
    assert fused.token_ids == stock.token_ids
    assert fused.kv_fraction == pytest.approx(stock.kv_fraction)


def test_fusing_shares_the_weights_and_keeps_the_stock_forward():
    model = tiny_model("qwen2", layers=2, seed=4)
    ids = torch.tensor(_prompts([12]))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    params = sum(p.numel() for p in model.parameters())
    cache = MageCache.for_model(model, 1, 32)
    ff = fast_forward.FastForward(model, cache)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == ff.layers[0].qkv_w.data_ptr() + \
        attn.q_proj.weight.numel() * attn.q_proj.weight.element_size()
    assert sum(p.numel() for p in model.parameters()) == params  # nothing held twice
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    again = fast_forward.FastForward(model, cache)  # a second generation reuses the fusion
    assert again.layers[0].qkv_w.data_ptr() == ff.layers[0].qkv_w.data_ptr()


def test_unsupported_models_fall_back_or_fail_clearly():
    model = tiny_model("qwen2", layers=2, seed=5)
    model.model.layers[1].mlp.up_proj = torch.nn.Sequential(model.model.layers[1].mlp.up_proj)
    assert "nn.Linear" in fast_forward.unsupported(model)
    kw = dict(input_ids=_prompts([20]), block_size=8, max_new_tokens=8, mask_id=MASK_ID,
              stop_ids=[], policy=PolicyConfig(method="exact"))
    with pytest.raises(ValueError, match="fused forward does not cover"):
        generate(model, fused=True, **kw)
    assert len(generate(model, **kw).token_ids[0]) == 8   # the default takes the stock forward


def test_fixed_steps_runs_exactly_that_many_forwards():
    model = tiny_model("qwen2", layers=2, seed=6)
    res = generate(model, input_ids=_prompts([32, 20]), block_size=8, max_new_tokens=24,
                   mask_id=MASK_ID, stop_ids=[], fixed_steps=3,
                   policy=PolicyConfig(method="mage", k=4, dense_layers=1))
    per_block = {}
    for r in res.steps:
        if r.phase == "denoise":
            per_block[r.block] = per_block.get(r.block, 0) + 1
    assert per_block and all(n == 3 for n in per_block.values())
    with pytest.raises(ValueError, match="fixed_steps"):
        generate(model, input_ids=_prompts([32]), block_size=8, mask_id=MASK_ID,
                 fixed_steps=9)


# -- GPU ----------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("policy", POLICIES, ids=["exact", "mage"])
@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_graphed_fused_path_gives_the_eager_stock_tokens(policy, style, monkeypatch):
    # cuBLAS for every GEMM (the default): the fused path's other ops reproduce the stock
    # modules bit for bit (the opt-in few-row GEMM kernel sums in another order: next test)
    monkeypatch.setenv("MAGE_SKINNY_GEMM", "off")
    model = tiny_model("qwen3", layers=3, head_dim=64, seed=7).to("cuda", torch.bfloat16)
    kw = dict(policy=policy, style=style, block_size=32, sub_block=8, threshold=0.5, steps=8,
              max_new_tokens=160, mask_id=MASK_ID, stop_ids=[], input_ids=_prompts([300, 77, 150]))
    eager = generate(model, fused=False, cuda_graphs=False, **kw)
    fast = generate(model, **kw)  # the defaults on a GPU: fused forward, CUDA graphs
    assert fast.token_ids == eager.token_ids
    assert fast.kv_fraction == pytest.approx(eager.kv_fraction)


@requires_cuda
@pytest.mark.parametrize("policy", POLICIES, ids=["exact", "mage"])
def test_single_prompt_fast_path_with_the_few_row_gemm(policy, monkeypatch):
    """Batch 1 with MAGE_SKINNY_GEMM=on: every GEMM of a block step has 32 rows and takes
    mage.linear's split-K kernel; the graphed run gives the eager fused run's tokens, and the
    logits of a step stay within bf16 rounding of the cuBLAS forward's."""
    monkeypatch.setenv("MAGE_SKINNY_GEMM", "on")
    model = tiny_model("qwen2", layers=3, head_dim=64, seed=8).to("cuda", torch.bfloat16)
    kw = dict(policy=policy, style="fast_dllm", block_size=32, sub_block=8, threshold=0.5,
              steps=8, max_new_tokens=96, mask_id=MASK_ID, stop_ids=[],
              input_ids=_prompts([250], seed=4))
    eager = generate(model, cuda_graphs=False, **kw)
    fast = generate(model, **kw)
    assert fast.token_ids == eager.token_ids
    ids = torch.tensor(_prompts([32], seed=6), device="cuda")
    logits = {}
    for mode in ("on", "off"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MAGE_SKINNY_GEMM", mode)
            cache = MageCache.for_model(model, 1, 64, PolicyConfig(method="exact"))
            cache.begin_prefill()
            with torch.no_grad():
                logits[mode] = fast_forward.FastForward(model, cache)(ids).float()
    torch.testing.assert_close(logits["on"], logits["off"], rtol=0.05, atol=0.05)


@requires_cuda
@pytest.mark.parametrize("policy", POLICIES, ids=["exact", "mage"])
def test_no_host_synchronisation_inside_a_block(policy, monkeypatch):
    """Once the graphs are captured (blocks 0-1), a block's forwards and decoding run with
    torch's sync debug mode set to 'error'; only the block's end reads the device."""
    model = tiny_model("qwen2", layers=3, head_dim=64, seed=8).to("cuda", torch.bfloat16)
    denoise, commit = BlockLoop._denoise_block, BlockLoop._commit
    checked = []

    def strict(fn):
        def wrapped(self, *args):
            block = getattr(self, "_block_no", 0)
            if block >= 2:
                torch.cuda.set_sync_debug_mode("error")
                checked.append(block)
            try:
                return fn(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapped

    def counting_denoise(self, block):
        self._block_no = block
        return strict(denoise)(self, block)

    monkeypatch.setattr(BlockLoop, "_denoise_block", counting_denoise)
    monkeypatch.setattr(BlockLoop, "_commit", strict(commit))
    res = generate(model, input_ids=_prompts([100, 64]), policy=policy, block_size=32,
                   max_new_tokens=192, mask_id=MASK_ID, stop_ids=[], threshold=0.5)
    assert len(res.token_ids[0]) == 192 and len(set(checked)) >= 3


@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_chunked_prefill_equals_block_by_block(style):
    """A multi-block prefill chunk (block_attention) gives the tokens of one block per forward,
    for a batch whose prompts end at different blocks (scratch rows) and mid-block."""
    model = tiny_model("qwen2", layers=3, seed=9)
    kw = dict(policy=PolicyConfig(method="mage", k=8, dense_layers=1), style=style,
              block_size=8, max_new_tokens=16, mask_id=MASK_ID, stop_ids=[], threshold=0.5,
              input_ids=_prompts([75, 40, 64]))
    one = generate(model, prefill_chunk=8, **kw)
    chunked = generate(model, prefill_chunk=24, **kw)
    assert chunked.token_ids == one.token_ids
    assert sum(r.phase == "prefill" for r in chunked.steps) == 3  # 9 blocks in chunks of 3
    assert sum(r.phase == "prefill" for r in one.steps) == 9
