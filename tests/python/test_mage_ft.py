"""MAGE-FT (mage_ext.train.mage_ft / objective / data / config): the objective's pieces against
plain computations, resumption step for step (an injected stop and a real SIGTERM to the CLI),
outputs that load with mage_ext.load_model, and clear errors with nothing half-written.

A tiny checkpoint in the project's vocabulary (2 layers, hidden 32, block 8) keeps every run to
a fraction of a second per step on the CPU."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mage_ext
from mage_ext.train.config import ConfigError, load_config
from mage_ext.train.mage_ft import INTERRUPTED_EXIT, finetune
from mage_ext.train.objective import (MageFTObjective, _Batch, bd_loss, chunked_ce_kl,
                                      mage_ft_loss)
from conftest import requires_cuda
from tiny_models import one_thread  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BS = 8


def make_checkpoint(path, family="qwen2", mask=True, seed=0, heads=4, kv_heads=2, head_dim=8,
                    block=BS):
    """A loadable checkpoint directory: a tiny random model in the project's vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from mage_ext.eval import vocab as V

    ids = V.token_to_id()
    cls_cfg, cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (Qwen3Config,
                                                                            Qwen3ForCausalLM)
    extra = {"mask_token_id": ids[V.MASK]} if mask else {}
    cfg = cls_cfg(vocab_size=len(V.vocabulary()), hidden_size=heads * head_dim,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512,
                  bos_token_id=ids[V.EOS], eos_token_id=ids[V.EOS], pad_token_id=ids[V.PAD],
                  bd_size=block, tie_word_embeddings=False,
                  initializer_range=0.2, **extra)
    torch.manual_seed(seed)
    cls(cfg).save_pretrained(path, safe_serialization=True)
    V.save_tokenizer(str(path))
    if not mask:   # a tokenizer without the mask token either
        tok = json.loads((path / "tokenizer.json").read_text())
        tok["model"]["vocab"] = {w: i for w, i in tok["model"]["vocab"].items() if w != V.MASK}
        tok["added_tokens"] = [t for t in tok.get("added_tokens", []) if t["content"] != V.MASK]
        (path / "tokenizer.json").write_text(json.dumps(tok))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def config(ckpt, out, **kw):
    cfg = {"model": ckpt, "output_dir": str(out), "seq_len": 64, "k": 12, "dense_layers": 1,
           "device": "cpu",
           "steps": 4, "lr": 1e-3, "warmup_steps": 1, "threads": 1, "progress": False,
           "save_every": 3, "data": {"synthetic": {"filler": 1, "niah_single": 1}}}
    cfg.update(kw)
    return cfg


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


LOSS_KEYS = ("step", "lr", "loss", "ce", "kl", "set_recall", "mass_recall", "grad_norm", "tokens")


def losses(log):
    return [{k: r[k] for k in LOSS_KEYS} for r in log]


@pytest.fixture(scope="module")
def uninterrupted(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    result = finetune(config(ckpt, out))
    return out, result


# -- the objective ------------------------------------------------------------------------------
def test_chunked_ce_kl_equals_whole(gen):
    head = torch.nn.Linear(16, 40).double()
    hs = torch.randn(11, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(11, 16, generator=gen, dtype=torch.float64)
    tgt = torch.randint(0, 40, (11,), generator=gen)
    w = torch.rand(11, generator=gen, dtype=torch.float64)
    got = chunked_ce_kl(head, hs, ht, tgt, w, chunk=3)
    logp, logq = head(hs).log_softmax(-1), head(ht).detach().log_softmax(-1)
    want = ((-logp.gather(-1, tgt[:, None])[:, 0] * w).sum(),
            ((logp.exp() * (logp - logq)).sum(-1) * w).sum())
    for a, b in zip(got, want):
        assert abs(float(a.detach()) - float(b.detach())) < 1e-5   # the terms are fp32
    g1 = torch.autograd.grad(got[0] + 0.7 * got[1], [hs, head.weight])
    g2 = torch.autograd.grad(want[0] + 0.7 * want[1], [hs, head.weight])
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-5
    assert float(got[1].detach()) >= 0


def _tiny_lm(ckpt):
    lm = mage_ext.load_model(ckpt, dtype=torch.float64)
    lm.model.train()
    return lm


def _batch(gen, batch=2, length=64):
    tokens = torch.randint(10, 1900, (batch, length), generator=gen)
    zeros = torch.zeros(batch, length, dtype=torch.bool)
    return tokens, torch.ones(batch, length), zeros, zeros


@pytest.mark.parametrize("shift", [True, False])
def test_full_budget_student_equals_teacher(ckpt, shift, gen):
    """With k covering every prefix the sparse student is the exact model: KL = 0 and the loss
    is the plain block-diffusion CE (objective.bd_loss, and the SDPA path of
    finetune/bd_objective, on the same noise)."""
    sys.path.insert(0, os.path.join(ROOT, "finetune"))
    import bd_objective as BD

    lm = _tiny_lm(ckpt)
    tokens, w, force, keep = _batch(gen)
    obj = MageFTObjective(block_size=BS, mask_id=lm.mask_id, k=64, dense_layers=0,
                          token_shift=shift)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    loss, st = mage_ft_loss(lm.model, tokens, w, force, keep, obj, torch.Generator().manual_seed(seed))
    assert abs(st["kl"]) < 1e-9 and st["tokens"] > 0
    assert st["set_recall"] is None          # no prefix holds more than k entries
    plain, plain_st = bd_loss(lm.model, tokens, w, force, keep, obj,
                              torch.Generator().manual_seed(seed))
    assert plain_st["tokens"] == st["tokens"]
    assert abs(float(loss.detach()) - float(plain.detach())) < 1e-6
    if shift:
        ref, ref_st = BD.loss(lm.model, tokens, w, force, keep, list(range(64 // BS)), BS,
                              lm.mask_id, torch.Generator().manual_seed(seed))
        assert ref_st["tokens"] == st["tokens"]
        assert abs(float(loss.detach()) - float(ref.detach())) < 1e-6


def test_sparse_student_has_kl_and_gradients(ckpt, gen):
    lm = _tiny_lm(ckpt)
    tokens, w, force, keep = _batch(gen)
    obj = MageFTObjective(block_size=BS, mask_id=lm.mask_id, k=4, dense_layers=1, lam=0.5)
    loss, st = mage_ft_loss(lm.model, tokens, w, force, keep, obj, torch.Generator())
    assert st["kl"] > 0 and 0 < st["mass_recall"] <= 1 and 0 <= st["set_recall"] <= 1
    assert abs(float(loss.detach()) - (st["ce"] + 0.5 * st["kl"])) < 1e-5   # fp32 terms
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in lm.model.named_parameters() if "layers.1.self_attn.k_proj" in n)


def test_frozen_teacher_is_the_base_model(ckpt, gen):
    """frozen_teacher (LoRA's adapters off): the KL's teacher is the untouched base model in
    exact attention, the student and the selection stay the adapted model's."""
    import copy
    peft = pytest.importorskip("peft")
    lm = _tiny_lm(ckpt)
    base = copy.deepcopy(lm.model)
    model = peft.get_peft_model(lm.model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    tokens, w, force, keep = _batch(gen)
    obj = MageFTObjective(block_size=BS, mask_id=lm.mask_id, k=4, dense_layers=1, lam=0.5)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    loss, st = mage_ft_loss(model, tokens, w, force, keep, obj, torch.Generator().manual_seed(seed),
                            frozen_teacher=model.disable_adapter)
    b = _Batch(model, tokens, w, force, keep, obj, torch.Generator().manual_seed(seed))
    layout = b.layout(obj)
    with torch.no_grad():
        layout.hidden_states(model, [torch.full_like(b.x0, obj.mask_id)], b.x0, ["select"])
        h_base = layout.hidden_states(base, b.copies, b.x0, ["exact"] * len(b.copies))
        h_student = layout.hidden_states(model, b.copies, b.x0, ["sparse"] * len(b.copies))
        ce, kl = b.terms(h_student, b.rows_of(h_base), obj.loss_chunk)
    assert st["kl"] > 0 and abs(st["kl"] - float(kl)) < 1e-7 and abs(st["ce"] - float(ce)) < 1e-7
    _, shared = mage_ft_loss(model, tokens, w, force, keep, obj, torch.Generator().manual_seed(seed))
    assert abs(shared["kl"] - st["kl"]) > 1e-6            # the adapters' teacher differs
    assert shared["mass_recall"] == st["mass_recall"]      # one selection, one recall
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_run_with_the_base_teacher(uninterrupted, ckpt, tmp_path):
    """teacher "base": step 1 (adapters start at zero) is the default run's step 1; the run
    trains and exports like any other."""
    out = tmp_path / "base"
    result = finetune(config(ckpt, out, teacher="base", steps=2))
    assert result["status"] == "done"
    got, want = losses(read_log(out)), losses(read_log(uninterrupted[0]))
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-9)   # (fp32: two passes vs one)
    assert abs(got[1]["kl"] - want[1]["kl"]) > 1e-3 * want[1]["kl"]   # (2% apart when written)


# -- runs, resumption, outputs ------------------------------------------------------------------
def test_run_writes_log_checkpoint_and_loadable_outputs(uninterrupted, ckpt):
    out, result = uninterrupted
    assert result["status"] == "done" and result["step"] == 4
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["kl"] >= 0 and r["mass_recall"] is not None for r in log)
    final = mage_ext.load_model(result["final"])
    adapter = mage_ext.load_model(os.path.join(out, "adapter"))
    base = mage_ext.load_model(ckpt)
    ids = torch.randint(10, 1900, (1, 24))
    with torch.no_grad():
        f, a, b = (m.model(ids).logits for m in (final, adapter, base))
    assert (f - a).abs().max() < 1e-4          # the merged export equals base + adapter
    assert (f - b).abs().max() > 1e-4          # and training changed the model
    assert final.mask_id == base.mask_id and final.block_size == BS
    assert not [n for n in os.listdir(out) if ".tmp-" in n or ".old-" in n]


def test_injected_stop_resumes_step_for_step(uninterrupted, ckpt, tmp_path):
    out = tmp_path / "b"
    r1 = finetune(config(ckpt, out), _stop_after=2)
    assert r1["status"] == "interrupted" and r1["step"] == 2 and r1["final"] is None
    assert not os.path.exists(out / "final")
    r2 = finetune(config(ckpt, out))
    assert r2["status"] == "done" and r2["step"] == 4
    assert losses(read_log(out)) == losses(read_log(uninterrupted[0]))


def test_sigterm_to_the_cli_resumes_step_for_step(uninterrupted, ckpt, tmp_path):
    """A real SIGTERM mid-run: the CLI saves a checkpoint and exits 143; the same command
    finishes the run; the losses equal the uninterrupted run's step for step."""
    out = tmp_path / "c"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config(ckpt, out, steps=40)))
    cmd = [sys.executable, "-m", "mage_ext.finetune", "--config", str(cfg_file)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "log.jsonl") and len(read_log(out)) >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == INTERRUPTED_EXIT, err
    stopped = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 1 <= stopped < 40 and "run the same command to resume" in err
    cfg = config(ckpt, out, steps=40)
    cfg_a = config(ckpt, tmp_path / "a40", steps=40, save_every=100)
    finetune(cfg)
    finetune(cfg_a)
    assert losses(read_log(out)) == losses(read_log(tmp_path / "a40"))


def test_full_finetuning_bf16_checkpointing_and_grad_accum(ckpt, tmp_path):
    """Full fine-tuning with bf16 autocast, activation checkpointing and two micro-batches on
    jsonl text: runs, and the final model loads."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(["the", "cat", "sat"] * 20)})
                              for _ in range(3)) + "\n")
    cfg = config(ckpt, tmp_path / "full", mode="full", precision="bf16", steps=2, grad_accum=2,
                 gradient_checkpointing=True, data={"jsonl": str(data)})
    r = finetune(cfg)
    assert r["status"] == "done"
    log = read_log(tmp_path / "full")
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(x["loss"])) for x in log)
    mage_ext.load_model(r["final"])
    assert not os.path.exists(tmp_path / "full" / "adapter")


def test_jsonl_packing_and_position(ckpt, tmp_path):
    from mage_ext.train.data import JsonlSource

    lm = mage_ext.load_model(ckpt)
    data = tmp_path / "d.jsonl"
    docs = [" ".join(["the"] * n) for n in (30, 50, 9)]
    data.write_text("".join(json.dumps({"text": d}) + "\n\n" for d in docs))
    src = JsonlSource(str(data), lm.tokenizer, 32, BS, lm.stop_ids[0], 1957)
    a = src.next_batch(2)
    state = src.state_dict()
    b = src.next_batch(3)
    src2 = JsonlSource(str(data), lm.tokenizer, 32, BS, lm.stop_ids[0], 1957)
    src2.load_state_dict(state)
    assert torch.equal(src2.next_batch(3)["tokens"], b["tokens"])
    stream = torch.cat([a["tokens"].flatten(), b["tokens"].flatten()]).tolist()
    eos = lm.stop_ids[0]
    assert stream[30] == eos and stream[81] == eos and stream[91] == eos   # documents joined
    assert src.epoch == 1                                                  # wrapped around
    nopack = JsonlSource(str(data), lm.tokenizer, 32, BS, eos, 1957, packing=False)
    x = nopack.next_batch(1)          # 30 tokens -> 24 (whole blocks) + 8 padding, never masked
    assert x["keep"][0].tolist() == [False] * 24 + [True] * 8
    assert x["weight"][0, 24:].sum() == 0


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, r"unknown config key\(s\) \['bogus'\]"),
    ({"lambda": -1}, "'lambda': expected a number >= 0"),
    ({"lam": 1}, "the KL weight is 'lambda'"),
    ({"k": 0}, "'k': expected an int >= 1"),
    ({"mode": "qlora"}, "'mode': expected one of"),
    ({"steps": 2.5}, "'steps': expected an int"),
    ({"betas": [0.9]}, "'betas'"),
    ({"lora": {"rank": 4}}, r"unknown key\(s\) \['rank'\] in 'lora'"),
    ({"data": {"jsonl": "x", "synthetic": {"filler": 1}}}, "exactly one of 'jsonl'"),
    ({"data": {"synthetic": {"sudoku": 1}}}, "'data.synthetic': expected a kind"),
    ({"n_sink": 8, "n_recent": 8}, "exceed the budget 'k'"),
    ({"teacher": "exact"}, "'teacher': expected one of"),
    ({"teacher": "base", "mode": "full"}, "needs 'mode' \"lora\""),
])
def test_bad_config_values(ckpt, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config(ckpt, tmp_path / "o", **change))
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("change, message", [
    ({"k": 56}, "'k': 56 is not smaller than the longest clean prefix"),
    ({"seq_len": 60}, "not a multiple of the block size 8"),
    ({"seq_len": 8}, "fewer than two blocks"),
    ({"dense_layers": 2}, "leaves no sparse layer"),
    ({"lora": {"target_modules": ["qkv"]}}, r"\['qkv'\] name no module"),
    ({"data": {"synthetic": {"passkey": 1}}}, "data.synthetic.passkey: cannot lay out a sample "
                                              "of 64 tokens in blocks of 8"),
    ({"model": "/nonexistent/dir"}, "config key 'model': load_model: checkpoint directory"),
])
def test_errors_against_the_model_write_nothing(ckpt, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        finetune(config(ckpt, tmp_path / "o", **change))
    assert not os.path.exists(tmp_path / "o")


def test_data_errors(ckpt, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="is empty"):
        finetune(config(ckpt, tmp_path / "o", data={"jsonl": str(empty)}))
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "the cat"}) + "\n")
    with pytest.raises(ConfigError, match="fewer than one sequence of seq_len = 64"):
        finetune(config(ckpt, tmp_path / "o", data={"jsonl": str(short)}))
    with pytest.raises(ConfigError, match="document 1: 2 tokens, shorter than one block"):
        finetune(config(ckpt, tmp_path / "o", data={"jsonl": str(short), "packing": False}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="document 1: expected an object with a string field"):
        finetune(config(ckpt, tmp_path / "o", data={"jsonl": str(bad)}))
    with pytest.raises(ConfigError, match="does not exist"):
        finetune(config(ckpt, tmp_path / "o", data={"jsonl": str(tmp_path / "none.jsonl")}))
    assert not os.path.exists(tmp_path / "o")


def test_model_without_mask_token(tmp_path):
    path = make_checkpoint(tmp_path / "nomask", mask=False)
    with pytest.raises(ConfigError, match="no mask token"):
        finetune(config(path, tmp_path / "o", data={"synthetic": {"filler": 1}}))


def test_resume_refuses_a_changed_config_and_a_foreign_output_dir(ckpt, tmp_path):
    out = tmp_path / "r"
    finetune(config(ckpt, out, steps=1))
    with pytest.raises(ConfigError, match=r"keys \['k'\] differ"):
        finetune(config(ckpt, out, steps=2, k=10))
    with pytest.raises(ConfigError, match=r"keys \['teacher'\] differ"):
        finetune(config(ckpt, out, steps=2, teacher="base"))
    # a checkpoint written before the 'teacher' key existed resumes with its old behaviour
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    del saved["config"]["teacher"]
    torch.save(saved, out / "checkpoint.pt")
    assert finetune(config(ckpt, out, steps=2))["step"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds \['notes.txt'\] and no checkpoint.pt"):
        finetune(config(ckpt, other))
    early = tmp_path / "early"   # stopped before its first checkpoint: starts afresh
    early.mkdir()
    (early / "log.jsonl").write_text('{"step": 1, "loss": 0}\n')
    assert finetune(config(ckpt, early, steps=1))["status"] == "done"
    assert [r["step"] for r in read_log(early)] == [1]


def test_cli_reports_config_errors_in_one_line(ckpt, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config(ckpt, tmp_path / "o", k=0)))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "finetune", "mage_ft.py"), "--config",
                        str(cfg_file)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["mage_ft: error: config key 'k': expected an int "
                                             ">= 1, got 0"]


@requires_cuda
@pytest.mark.parametrize("family, precision", [("qwen2", "bf16"), ("qwen3", "fp32")])
def test_cuda_run_and_resume(family, precision, tmp_path):
    """MAGE-FT on the GPU (head dim 64, block 16, LoRA): finite losses, a loadable result, and a
    resumed run that repeats the uninterrupted one's losses (to 1e-3: the CUDA backward may sum
    in another order)."""
    ck = make_checkpoint(tmp_path / "ck", family, heads=2, kv_heads=1, head_dim=64, block=16)
    kw = dict(device="cuda", seq_len=128, k=24, precision=precision, steps=4, save_every=100,
              data={"synthetic": {"filler": 1, "niah_single": 1}})
    a = finetune(config(ck, tmp_path / "a", **kw))
    assert a["status"] == "done"
    log_a = read_log(tmp_path / "a")
    assert all(math.isfinite(r["loss"]) and r["mass_recall"] is not None for r in log_a)
    mage_ext.load_model(a["final"])
    assert finetune(config(ck, tmp_path / "b", **kw), _stop_after=2)["status"] == "interrupted"
    assert finetune(config(ck, tmp_path / "b", **kw))["status"] == "done"
    for ra, rb in zip(log_a, read_log(tmp_path / "b")):
        assert ra["step"] == rb["step"] and ra["loss"] == pytest.approx(rb["loss"], rel=1e-3)
