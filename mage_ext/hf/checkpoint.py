"""Load Fast-dLLM v2 / SDAR / plain Qwen2 / Qwen3 checkpoint directories into stock transformers.

No remote code: Fast-dLLM v2 (model_type ``Fast_dLLM_Qwen``) is Qwen2.5 with QKV bias and loads
into ``Qwen2ForCausalLM``; SDAR (``sdar``) is Qwen3 with q/k norm and loads into
``Qwen3ForCausalLM``. The directory holds config.json, ``*.safetensors`` (one file, or shards
listed by ``model.safetensors.index.json``) and tokenizer.json. A peft adapter directory
(adapter_config.json naming a local base checkpoint, as MAGE-FT writes) loads as its base with
the adapter merged.

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
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load_model: dtype must be a floating-point torch.dtype, got {dtype!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_model: checkpoint directory '{path}' does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"load_model: '{path}' is a file; expected a checkpoint "
                                 "directory (config.json, *.safetensors, tokenizer.json)")
    if (os.path.isfile(os.path.join(path, "adapter_config.json"))
            and not os.path.isfile(os.path.join(path, "config.json"))):
        return _load_adapter(path, dtype, device, tokenizer)
    raw = _read_json(os.path.join(path, "config.json"), "config.json")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"load_model: unknown model_type '{model_type}' in {path}/config.json; "
                         f"supported: {sorted(MODEL_TYPES)}")
    family, cls_name, default_block = MODEL_TYPES[model_type]
    import transformers

    cls = getattr(transformers, cls_name)
    try:
        config = cls.config_class(**{k: v for k, v in raw.items() if k not in _CONFIG_DROP})
        config._attn_implementation = "sdpa"
        with torch.device(device):  # build where it will run: no host copy of a large model
            model = cls(config)
    except (ValueError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise ValueError(f"load_model: {path}/config.json does not describe a valid "
                         f"{cls_name}: {e}") from e
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
    stop_ids = _stop_ids(path, raw)
    _check_ids_in_vocab(path, config.vocab_size, int(mask_id), stop_ids)
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"load_model: {path}/config.json gives block size {block!r}; expected a "
                         "positive int (bd_size / block_size / block_length)")
    return LoadedModel(model, tok, int(mask_id), stop_ids, block, family)


def _load_adapter(path: str, dtype, device, tokenizer: bool) -> LoadedModel:
    """A peft (LoRA) adapter directory, e.g. MAGE-FT's output_dir/adapter: its base model
    (adapter_config.json base_model_name_or_path, a checkpoint directory) with the adapter merged."""
    raw = _read_json(os.path.join(path, "adapter_config.json"), "adapter_config.json")
    base = raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"load_model: {path}/adapter_config.json names no base model "
                         "(base_model_name_or_path)")
    base = base if os.path.isabs(base) else os.path.join(path, base)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"load_model: the adapter in {path} is for the base model "
                                f"'{base}', which is not a checkpoint directory here")
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ImportError(f"load_model: {path} is a peft adapter; loading it needs peft "
                          "(pip install 'mage_ext[finetune]')") from e
    import warnings

    lm = load_model(base, dtype=dtype, device=device, tokenizer=tokenizer)
    with warnings.catch_warnings():  # peft calls transformers' deprecated names
        warnings.simplefilter("ignore", FutureWarning)
        lm.model = PeftModel.from_pretrained(lm.model, path).merge_and_unload().eval()
    return lm


def _check_ids_in_vocab(path: str, vocab: int, mask_id: int, stop_ids: tuple) -> None:
    if not 0 <= mask_id < vocab:
        raise ValueError(f"load_model: the mask token id {mask_id} (config.json mask_token_id "
                         f"or tokenizer.json) is outside the model's vocabulary [0, {vocab}) in "
                         f"{path}")
    for s in stop_ids:
        if not 0 <= s < vocab:
            raise ValueError(f"load_model: eos_token_id {s} (config.json / "
                             f"generation_config.json) is outside the model's vocabulary "
                             f"[0, {vocab}) in {path}")


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
    if not os.path.exists(file):
        raise FileNotFoundError(f"load_model: missing {what} ({file})")
    if not os.path.isfile(file):
        raise OSError(f"load_model: {what} ({file}) is not a regular file")
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise OSError(f"load_model: cannot read {what} ({file}): {e}") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"load_model: {what} ({file}) is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"load_model: {what} ({file}) must hold a JSON object, got "
                         f"{type(doc).__name__}")
    return doc


def _weight_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"load_model: {index} has no weight_map (tensor name -> shard file)")
        shards = sorted(set(map(str, weight_map.values())))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"load_model: shard(s) {missing} listed in {index} are missing")
        return [os.path.join(path, s) for s in shards]
    try:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    except OSError as e:
        raise OSError(f"load_model: cannot list the checkpoint directory {path}: {e}") from e
    if not files:
        raise FileNotFoundError(f"load_model: no *.safetensors weights in {path}")
    return [os.path.join(path, f) for f in files]


def _load_weights(model, path: str) -> None:
    from safetensors import safe_open

    params = dict(model.state_dict())
    seen = set()
    with torch.no_grad():
        for file in _weight_files(path):
            with _open_safetensors(safe_open, file) as f:
                for name in f.keys():
                    if name not in params:
                        raise ValueError(f"load_model: tensor '{name}' in {file} is not a parameter "
                                         f"of {type(model).__name__}")
                    t = _get_tensor(f, name, file)
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


def _open_safetensors(safe_open, file: str):
    try:
        return safe_open(file, framework="pt")
    except OSError as e:
        raise OSError(f"load_model: cannot read {file}: {e}") from e
    except Exception as e:  # safetensors' SafetensorError: a bad header, a truncated file
        raise ValueError(f"load_model: {file} is not a valid safetensors file ({e})") from e


def _get_tensor(f, name: str, file: str):
    try:
        return f.get_tensor(name)
    except Exception as e:  # data past the end of a truncated file, an unknown dtype
        raise ValueError(f"load_model: tensor '{name}' in {file} cannot be read ({e}); the "
                         "file is damaged or truncated") from e


def _load_tokenizer(path: str):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_model: missing tokenizer.json ({file}); pass "
                                "tokenizer=False to load without it")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise ValueError(f"load_model: {file} is not a valid tokenizer.json ({e}); pass "
                         "tokenizer=False to load without it") from e


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
