"""Load Fast-dLLM v2 / SDAR / plain Qwen2 / Qwen3 checkpoint directories into stock transformers.

No remote code: Fast-dLLM v2 (model_type ``Fast_dLLM_Qwen``) is Qwen2.5 with QKV bias and loads
into ``Qwen2ForCausalLM``; SDAR (``sdar``) is Qwen3 with q/k norm and loads into
``Qwen3ForCausalLM``. The directory holds config.json, ``*.safetensors`` (one file, or shards
listed by ``model.safetensors.index.json``) and tokenizer.json.

    lm = load_model("/ckpt/Fast_dLLM_v2_1.5B", dtype=torch.bfloat16, device="cuda")
    lm.model, lm.tokenizer, lm.mask_id, lm.stop_ids, lm.block_size, lm.family
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

# model_type -> (family, transformers class name, default block size)
MODEL_TYPES = {
    "Fast_dLLM_Qwen": ("fast_dllm", "Qwen2ForCausalLM", 32),
    "qwen2": ("fast_dllm", "Qwen2ForCausalLM", 32),
    "sdar": ("sdar", "Qwen3ForCausalLM", 4),
    "qwen3": ("sdar", "Qwen3ForCausalLM", 4),
}
MASK_TOKEN_NAMES = ("|<MASK>|", "<|MASK|>", "<|mask|>", "<mask>", "[MASK]")
_CONFIG_DROP = ("model_type", "architectures", "auto_map", "transformers_version")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Optional[object]   # tokenizers.Tokenizer, or None when not loaded
    mask_id: int
    stop_ids: tuple
    block_size: int
    family: str                   # "fast_dllm" or "sdar": the generation style


def load_model(path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
               tokenizer: bool = True) -> LoadedModel:
    """Loads a checkpoint directory; ``tokenizer=False`` skips tokenizer.json (then the mask id
    must be in config.json as ``mask_token_id``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_model: checkpoint directory '{path}' does not exist")
    raw = _read_json(os.path.join(path, "config.json"), "config.json")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"load_model: unknown model_type '{model_type}' in {path}/config.json; "
                         f"supported: {sorted(MODEL_TYPES)}")
    family, cls_name, default_block = MODEL_TYPES[model_type]
    import transformers

    cls = getattr(transformers, cls_name)
    config = cls.config_class(**{k: v for k, v in raw.items() if k not in _CONFIG_DROP})
    config._attn_implementation = "sdpa"
    with torch.device(device):  # build where it will run: no host copy of a large model
        model = cls(config)
    to_dtype_keeping_rope_fp32(model, dtype)
    _load_weights(model, path)
    model.eval()

    tok = _load_tokenizer(path) if tokenizer else None
    mask_id = raw.get("mask_token_id")
    if mask_id is None:
        if tok is None:
            raise ValueError(f"load_model: {path}/config.json has no mask_token_id and the "
                             "tokenizer was not loaded")
        mask_id = _mask_from_tokenizer(tok, path)
    block = raw.get("bd_size") or raw.get("block_size") or raw.get("block_length") or default_block
    return LoadedModel(model, tok, int(mask_id), _stop_ids(path, raw), int(block), family)


def to_dtype_keeping_rope_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Casts ``model`` to ``dtype`` except the rotary embeddings' inverse frequencies.

    ``model.to(bfloat16)`` would round them too (0.6978 -> 0.6992): the rotation angle
    ``position * inv_freq`` then drifts by up to ~0.4% of the position, radians off at 128K.
    transformers computes cos/sin from them in float32, so float32 tables keep the trained
    angles; only cos/sin are rounded to the activation dtype, as in training.
    """
    kept = {}
    for mod_name, module in model.named_modules():
        for buf_name, buf in module.named_buffers(recurse=False):
            if "inv_freq" in buf_name and buf.is_floating_point():
                kept[(mod_name, buf_name)] = buf.float().clone()
    model.to(dtype=dtype)
    modules = dict(model.named_modules())
    for (mod_name, buf_name), buf in kept.items():
        setattr(modules[mod_name], buf_name, buf.to(getattr(modules[mod_name], buf_name).device))


def _read_json(file: str, what: str) -> dict:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_model: missing {what} ({file})")
    with open(file) as f:
        return json.load(f)


def _weight_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index, "weight index")["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"load_model: shard(s) {missing} listed in {index} are missing")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"load_model: no *.safetensors weights in {path}")
    return [os.path.join(path, f) for f in files]


def _load_weights(model, path: str) -> None:
    from safetensors import safe_open

    params = dict(model.state_dict())
    seen = set()
    with torch.no_grad():
        for file in _weight_files(path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name not in params:
                        raise ValueError(f"load_model: tensor '{name}' in {file} is not a parameter "
                                         f"of {type(model).__name__}")
                    t = f.get_tensor(name)
                    want = params[name]
                    if tuple(t.shape) != tuple(want.shape):
                        raise ValueError(f"load_model: tensor '{name}' has shape {tuple(t.shape)}, "
                                         f"expected {tuple(want.shape)} (from config.json)")
                    want.copy_(t.to(want.dtype))
                    seen.add(name)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [n for n in params if n not in seen and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"load_model: {len(missing)} parameter(s) missing from the weights in "
                         f"{path}, e.g. {missing[:3]}")
    if tied:
        model.tie_weights()


def _load_tokenizer(path: str):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_model: missing tokenizer.json ({file}); pass "
                                "tokenizer=False to load without it")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(file)


def _mask_from_tokenizer(tok, path: str) -> int:
    for name in MASK_TOKEN_NAMES:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    raise ValueError(f"load_model: the tokenizer in {path} has no mask token (looked for "
                     f"{MASK_TOKEN_NAMES}) and config.json has no mask_token_id")


def _stop_ids(path: str, raw: dict) -> tuple:
    ids = []
    gen_file = os.path.join(path, "generation_config.json")
    sources = [raw] + ([_read_json(gen_file, "generation_config.json")]
                       if os.path.isfile(gen_file) else [])
    for src in sources:
        eos = src.get("eos_token_id")
        for i in ([eos] if isinstance(eos, int) else (eos or [])):
            if int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)
