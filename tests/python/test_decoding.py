"""Decoding rules (sampling, which [MASK] positions to fill) on hand-made probabilities."""
import pytest
import torch

from mage_ext.core.decoding import low_confidence_unmask, sample, threshold_unmask, transfer_schedule
from tiny_models import MASK_ID, one_thread, tiny_model  # noqa: F401


def test_greedy_sample_returns_argmax_and_softmax_prob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tok, p = sample(logits)
    assert tok.tolist() == [1, 0]
    assert torch.allclose(p, torch.softmax(logits, -1).max(-1).values)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    tok, p = sample(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(tok.tolist()) == {0, 1}                     # 0.5 + 0.3 reaches 0.7
    assert torch.allclose(p[tok == 0], torch.tensor(0.5 / 0.8))


def test_threshold_unmask():
    probs = torch.tensor([[0.95, 0.2, 0.92, 0.1], [0.1, 0.3, 0.2, 0.05]])
    masked = torch.tensor([[True, True, False, True], [True, True, True, False]])
    got = threshold_unmask(probs, masked, 0.9)
    # row 0: 0.95 passes, 0.92 is not masked; row 1: only the best masked one (0.3)
    assert got.tolist() == [[True, False, False, False], [False, True, False, False]]


def test_transfer_schedule():
    assert transfer_schedule(4, 4) == [1, 1, 1, 1]
    assert transfer_schedule(32, 5) == [7, 7, 6, 6, 6]


def test_low_confidence_rules():
    probs = torch.tensor([[0.9, 0.8, 0.3, 0.95], [0.2, 0.1, 0.4, 0.3]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    static = low_confidence_unmask(probs, masked, 2, dynamic=False, threshold=0.5)
    assert static.tolist() == [[True, True, False, False], [False, False, True, True]]
    dyn = low_confidence_unmask(probs, masked, 1, dynamic=True, threshold=0.5)
    # row 0: two above 0.5 (>= n) -> both; row 1: none above -> the single best
    assert dyn.tolist() == [[True, True, False, False], [False, False, True, False]]


def test_recall_meter_hook_sees_later_denoise_steps():
    from mage_ext import PolicyConfig, generate

    class Meter:
        def __init__(self):
            self.calls = []

        def record(self, ctx, q, k_block, v_block, kv, selection):
            self.calls.append((ctx.layer, ctx.step, ctx.phase, selection is None))

    meter = Meter()
    generate(tiny_model("qwen2", layers=3), input_ids=[list(range(20))], block_size=8,
             policy=PolicyConfig(method="mage", k=4, dense_layers=1), max_new_tokens=8,
             mask_id=MASK_ID, stop_ids=[], recall_meter=meter)
    assert meter.calls and all(step >= 1 and phase == "denoise" for _, step, phase, _ in meter.calls)
    assert {(layer, dense) for layer, _, _, dense in meter.calls} == {(0, True), (1, False), (2, False)}
