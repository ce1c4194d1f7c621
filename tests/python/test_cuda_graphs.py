"""CUDA-graph replay of the denoising forwards (generate(cuda_graphs=True)): the same tokens and
KV fraction as eager forwards; clear errors where graphs cannot run (those checks run on CPU)."""
import pytest
import torch

from conftest import requires_cuda
from mage_ext import PolicyConfig, generate
from mage_ext.eval.recall import RecallMeter
from tiny_models import MASK_ID, VOCAB, tiny_model


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]


@requires_cuda
@pytest.mark.parametrize("policy", [PolicyConfig(method="exact"),
                                    PolicyConfig(method="mage", k=16, dense_layers=1)])
@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_graph_replay_gives_the_eager_tokens(policy, style):
    model = tiny_model("qwen2", layers=3, head_dim=64, seed=4).to("cuda", torch.bfloat16)
    kw = dict(policy=policy, style=style, block_size=32, sub_block=8, threshold=0.5, steps=8,
              max_new_tokens=96, mask_id=MASK_ID, stop_ids=[])
    prompts = _prompts([300, 77], seed=5)
    eager = generate(model, input_ids=prompts, **kw)
    graphed = generate(model, input_ids=prompts, cuda_graphs=True, **kw)
    assert graphed.token_ids == eager.token_ids
    assert graphed.kv_fraction == pytest.approx(eager.kv_fraction)
    assert sum(r.phase == "denoise" for r in graphed.steps) >= 6  # enough steps to replay


@requires_cuda
@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_blocks_of_one_step_then_more(style):
    """Confident random weights (initializer_range 1.0) finish some blocks in their first step:
    a later block's first forward then REPLAYS (no Python) while its later steps' graph is still
    being warmed up / captured (Python): the MAGE selection must come from the replayed graph's
    buffers (MageSelector.replayed). It raised "no selection for step 1" before (H200, 34695aa)."""
    model = tiny_model("qwen2", layers=3, head_dim=64, seed=7, initializer_range=1.0).to("cuda")
    kw = dict(policy=PolicyConfig(method="mage", k=16, dense_layers=1), style=style,
              block_size=16, threshold=0.5, steps=4, max_new_tokens=64, mask_id=MASK_ID,
              stop_ids=[], remasking="low_confidence_dynamic" if style == "sdar"
              else "low_confidence_static")
    for prompt in _prompts([19, 64], seed=11):
        eager = generate(model, input_ids=[prompt], **kw)
        graphed = generate(model, input_ids=[prompt], cuda_graphs=True, **kw)
        assert graphed.token_ids == eager.token_ids


def test_graph_errors_name_the_obstacle():
    model = tiny_model("qwen2", layers=2)
    kw = dict(input_ids=_prompts([20]), block_size=8, max_new_tokens=8, mask_id=MASK_ID,
              stop_ids=[], cuda_graphs=True)
    with pytest.raises(ValueError, match="method 'quest'"):
        generate(model, policy=PolicyConfig(method="quest", k=8), **kw)
    with pytest.raises(ValueError, match="adaptive=True"):
        generate(model, policy=PolicyConfig(method="mage", k=8, adaptive=True), **kw)
    with pytest.raises(ValueError, match="recall meter"):
        generate(model, policy=PolicyConfig(method="mage", k=8), recall_meter=RecallMeter(), **kw)
    with pytest.raises(ValueError, match="CUDA device"):
        generate(model, policy=PolicyConfig(method="exact"), **kw)
