"""Checkpoint directories in the Fast-dLLM v2 / SDAR / plain Qwen layouts load into stock models."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mage_ext import load_model
from tiny_models import VOCAB, one_thread, tiny_model  # noqa: F401


def _tokenizer_json(path, mask_name):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab["[UNK]"] = VOCAB - 2
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    if mask_name:
        tok.add_special_tokens([mask_name])             # gets id VOCAB - 1
    tok.save(os.path.join(path, "tokenizer.json"))


def write_checkpoint(path, family="qwen2", model_type="qwen2", tied=False, shards=1,
                     mask_name="|<MASK>|", config_extra=None, seed=0):
    """A tiny random model saved as config.json + safetensors (+ index) + tokenizer.json."""
    os.makedirs(path, exist_ok=True)
    model = tiny_model(family, seed=seed, tie_word_embeddings=tied)
    cfg = model.config.to_dict()
    cfg.update(model_type=model_type, architectures=["X"], auto_map={"AutoModel": "x.X"})
    cfg.pop("mask_token_id", None)
    cfg.update(config_extra or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    names = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[s::shards]}
            save_file(part, os.path.join(path, file))
            weight_map.update({n: file for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    _tokenizer_json(path, mask_name)
    return model


def _same_outputs(a, b):
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-6)


def test_fast_dllm_directory_tied_and_sharded(tmp_path):
    src = write_checkpoint(tmp_path, "qwen2", "Fast_dLLM_Qwen", tied=True, shards=3,
                           config_extra={"bd_size": 16, "eos_token_id": 7})
    lm = load_model(str(tmp_path))
    assert type(lm.model).__name__ == "Qwen2ForCausalLM"
    assert (lm.family, lm.block_size, lm.mask_id, lm.stop_ids) == ("fast_dllm", 16, VOCAB - 1, (7,))
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    assert lm.tokenizer.encode("w3 w4").ids == [3, 4]
    _same_outputs(src, lm.model)


def test_sdar_directory(tmp_path):
    src = write_checkpoint(tmp_path, "qwen3", "sdar", mask_name="<|MASK|>")
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [3, 4]}, f)
    lm = load_model(str(tmp_path), dtype=torch.float32)
    assert type(lm.model).__name__ == "Qwen3ForCausalLM"
    assert (lm.family, lm.block_size, lm.mask_id, lm.stop_ids) == ("sdar", 4, VOCAB - 1, (3, 4))
    _same_outputs(src, lm.model)


def test_plain_qwen2_with_mask_in_config_and_no_tokenizer(tmp_path):
    src = write_checkpoint(tmp_path, config_extra={"mask_token_id": 11})
    os.remove(tmp_path / "tokenizer.json")
    lm = load_model(str(tmp_path), tokenizer=False)
    assert lm.mask_id == 11 and lm.tokenizer is None
    _same_outputs(src, lm.model)


def test_bf16_load(tmp_path):
    write_checkpoint(tmp_path)
    lm = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def _break(path, how):
    if how == "config":
        os.remove(path / "config.json")
    elif how == "weights":
        os.remove(path / "model.safetensors")
    elif how == "tokenizer":
        os.remove(path / "tokenizer.json")
    elif how == "model_type":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = "llama"
        (path / "config.json").write_text(json.dumps(cfg))
    elif how == "shape":
        cfg = json.loads((path / "config.json").read_text())
        cfg["intermediate_size"] = 40
        (path / "config.json").write_text(json.dumps(cfg))
    elif how == "no_mask":
        _tokenizer_json(path, None)
    elif how == "extra_tensor":
        save_file({"model.bogus": torch.zeros(2)}, str(path / "extra.safetensors"))
    elif how == "missing_tensor":
        from safetensors.torch import load_file
        state = load_file(str(path / "model.safetensors"))
        del state["model.norm.weight"]
        save_file(state, str(path / "model.safetensors"))
    elif how == "config_not_json":
        (path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 32,')
    elif how == "config_not_object":
        (path / "config.json").write_text("[1, 2]")
    elif how == "config_directory":
        os.remove(path / "config.json")
        os.mkdir(path / "config.json")
    elif how == "config_values":
        _edit_config(path, num_attention_heads=0)
    elif how == "block_size":
        _edit_config(path, bd_size=-8)
    elif how == "mask_past_vocab":
        _edit_config(path, mask_token_id=VOCAB + 3)
    elif how == "eos_past_vocab":
        _edit_config(path, eos_token_id=[1, VOCAB])
    elif how == "weights_garbage":
        (path / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 10)
    elif how == "weights_truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif how == "index_not_json":
        (path / "model.safetensors.index.json").write_text("{weight_map:")
    elif how == "tokenizer_garbage":
        (path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# Bad checkpoint directories: (how, error type, message). docs/errors.md lists these ids
# (test_errors_doc.py).
LOAD_ERRORS = [
    ("config", FileNotFoundError, "missing config.json"),
    ("config_not_json", ValueError, r"config\.json \(.*config\.json\) is not valid JSON"),
    ("config_not_object", ValueError, "must hold a JSON object, got list"),
    ("config_directory", OSError, "is not a regular file"),
    ("config_values", ValueError, "config.json does not describe a valid Qwen2ForCausalLM"),
    ("block_size", ValueError, "gives block size -8"),
    ("weights", FileNotFoundError, "no \\*.safetensors"),
    ("weights_garbage", ValueError, "model.safetensors is not a valid safetensors file"),
    ("weights_truncated", ValueError, "model.safetensors"),
    ("tokenizer", FileNotFoundError, "missing tokenizer.json"),
    ("tokenizer_garbage", ValueError, "tokenizer.json is not a valid tokenizer.json"),
    ("model_type", ValueError, "unknown model_type 'llama'"),
    ("shape", ValueError, r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), expected \(\d+, \d+\)"),
    ("no_mask", ValueError, "no mask token"),
    ("mask_past_vocab", ValueError, f"mask token id {VOCAB + 3} .* outside the model's vocabulary"),
    ("eos_past_vocab", ValueError, f"eos_token_id {VOCAB} .* outside the model's vocabulary"),
    ("extra_tensor", ValueError, "'model.bogus'"),
    ("missing_tensor", ValueError, "model.norm.weight"),
]


@pytest.mark.parametrize("how, error, match", LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors(tmp_path, how, error, match):
    write_checkpoint(tmp_path)
    _break(tmp_path, how)
    with pytest.raises(error, match=match):
        load_model(str(tmp_path))


def test_load_errors_of_a_sharded_checkpoint(tmp_path):
    write_checkpoint(tmp_path, shards=2)
    _break(tmp_path, "index_not_json")
    with pytest.raises(ValueError, match="weight index .* is not valid JSON"):
        load_model(str(tmp_path))


def test_unreadable_config_names_the_file(tmp_path, monkeypatch):
    """A permission error (simulated: the tests may run as root, which reads anything)."""
    import mage_ext.hf.checkpoint as checkpoint

    write_checkpoint(tmp_path)

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    with pytest.raises(OSError, match=r"cannot read config\.json .*Permission denied"):
        load_model(str(tmp_path))


def test_path_and_dtype_errors(tmp_path):
    write_checkpoint(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file; expected a checkpoint directory"):
        load_model(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        load_model(str(tmp_path), dtype=torch.int8)


def test_missing_directory_and_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    write_checkpoint(tmp_path, shards=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(str(tmp_path))


def test_loaded_model_generates_text(tmp_path):
    from mage_ext import PolicyConfig, generate

    write_checkpoint(tmp_path, config_extra={"bd_size": 8})
    lm = load_model(str(tmp_path))
    res = generate(lm, None, ["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10 w11 w12"],
                   policy=PolicyConfig(method="mage", k=4, dense_layers=1), max_new_tokens=9)
    assert len(res.texts) == 2 and all(len(t) == 9 for t in res.token_ids)
    assert all(t.startswith("w") or t == "" for t in res.texts)


def test_command_line(tmp_path, capsys):
    from mage_ext.cli import generate_main as main

    write_checkpoint(tmp_path, config_extra={"bd_size": 8})
    main(["--model", str(tmp_path), "--prompt", "w1 w2 w3", "--policy", "mage", "--k", "4",
          "--dense-layers", "1", "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"])
    cap = capsys.readouterr()
    assert cap.out.strip() and "-" * 40 not in cap.out  # one prompt: its text only (streamed)
    assert "steps: first" in cap.err and "KV read" in cap.err


@pytest.mark.parametrize("family,model_type", [("qwen2", "Fast_dLLM_Qwen"), ("qwen3", "sdar")])
def test_bf16_load_keeps_rope_fp32_at_long_positions(tmp_path, family, model_type):
    """bf16 loading must not round RoPE's inverse frequencies: at positions near 128K a bf16
    inv_freq (0.6978 -> 0.6992) rotates by radians-wrong angles."""
    write_checkpoint(str(tmp_path), family=family, model_type=model_type,
                     config_extra={"max_position_embeddings": 140000})
    lm = load_model(str(tmp_path), dtype=torch.bfloat16)
    rotary = lm.model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    cfg = lm.model.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    inv64 = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    pos = torch.arange(131072 - 64, 131072 + 64).view(1, -1)
    x = torch.zeros(1, pos.shape[1], dim, dtype=torch.bfloat16)
    cos, sin = rotary(x, pos)
    ang = pos[0].double().unsqueeze(-1) * inv64
    ref_cos = torch.cat([ang.cos(), ang.cos()], -1)
    ref_sin = torch.cat([ang.sin(), ang.sin()], -1)
    # fp32 angles at 131K carry ~0.008 rad of rounding; bf16 cos/sin another 2^-8
    assert (cos[0].double() - ref_cos).abs().max() < 0.02
    assert (sin[0].double() - ref_sin).abs().max() < 0.02
    # the weights themselves are bf16
    assert next(lm.model.parameters()).dtype == torch.bfloat16
