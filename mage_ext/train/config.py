"""MAGE-FT configuration: a JSON object, validated key by key (unknown keys and bad values are
errors that name the key, the value and what was expected).

Keys and defaults are in DEFAULTS (documented in finetune/README.md, section "MAGE-FT").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .objective import DEFAULT_LAMBDA

LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"]}
# Measured on the shipped tiny model (finetune/results/mage_ft_cpu, finetune/README.md MAGE-FT):
# LoRA at 2e-4 was stable with both small and large KL terms, 1e-3 with lambda 10 was not once the
# KL was large; full fine-tuning's rate is the usual one for 1-7B models.
LR_DEFAULTS = {"lora": 2e-4, "full": 2e-5}
# Keys that may change between a run and its resumption (the rest must match the checkpoint).
RESUMABLE_CHANGES = ("steps", "save_every", "log_every", "device", "threads", "progress",
                     "output_dir", "recall_every")


class ConfigError(ValueError):
    """A bad MAGE-FT configuration (the message names the key)."""


@dataclass
class FTConfig:
    model: str                                   # checkpoint directory (mage_ext.load_model)
    output_dir: str
    data: dict                                   # {"jsonl": path, ...} or {"synthetic": {...}}
    seq_len: int = 2048
    block_size: Optional[int] = None             # None: the checkpoint's
    batch_size: int = 1                          # sequences per micro-batch
    grad_accum: int = 1                          # micro-batches per optimizer step
    steps: int = 100                             # optimizer steps
    mode: str = "lora"                           # "lora" or "full"
    lora: dict = field(default_factory=lambda: dict(LORA_DEFAULTS))
    lr: Optional[float] = None                   # None: LR_DEFAULTS[mode]
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    schedule: str = "cosine"                     # "cosine" (to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    k: int = 512                                 # selection budget per (layer, block, KV head)
    dense_layers: int = 2
    n_sink: int = 0
    n_recent: int = 0
    lam: float = DEFAULT_LAMBDA                  # JSON key "lambda"
    teacher: str = "model"                       # KL teacher: "model" (the trained one) or "base"
    token_shift: Optional[bool] = None           # None: by family (Fast-dLLM v2 yes, SDAR no)
    complementary: bool = True
    loss_chunk: int = 1024
    recall_every: int = 1                        # 0: never measure recall
    precision: str = "fp32"                      # "fp32" or "bf16" (autocast; LoRA: bf16 base)
    gradient_checkpointing: bool = False
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    device: Optional[str] = None                 # None: cuda if available, else cpu
    threads: Optional[int] = None                # torch.set_num_threads
    progress: bool = True

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lambda"] = d.pop("lam")
        return d


_TYPES = {f.name: f.type for f in fields(FTConfig)}


def _fail(key: str, value: Any, want: str):
    raise ConfigError(f"config key {key!r}: expected {want}, got {value!r}")


def _int(key, v, low, allow_none=False):
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        _fail(key, v, f"an int >= {low}" + (" or null" if allow_none else ""))


def _num(key, v, low, high=None, allow_none=False, open_low=False):
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    ok = ok and (v > low if open_low else v >= low) and (high is None or v <= high)
    if not ok:
        rng = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        _fail(key, v, f"a number {rng}" + (" or null" if allow_none else ""))


def _bool(key, v, allow_none=False):
    if not (isinstance(v, bool) or (v is None and allow_none)):
        _fail(key, v, "true or false" + (" or null" if allow_none else ""))


def _choice(key, v, options):
    if v not in options:
        _fail(key, v, f"one of {list(options)}")


def validate(raw: dict) -> FTConfig:
    """An FTConfig from a JSON object; ConfigError on unknown keys or bad values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    if "lam" in raw:
        raise ConfigError("config key 'lam': unknown key (the KL weight is 'lambda')")
    if "lambda" in raw:
        raw["lam"] = raw.pop("lambda")
    known = set(_TYPES)
    unknown = sorted(set(raw) - known)
    if unknown:
        names = sorted((known - {"lam"}) | {"lambda"})
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {names}")
    for key in ("model", "output_dir", "data"):
        if key not in raw:
            raise ConfigError(f"config key {key!r} is required")
    for key in ("model", "output_dir"):
        if not isinstance(raw[key], str) or not raw[key]:
            _fail(key, raw[key], "a non-empty path string")
    cfg = FTConfig(**raw)
    _int("seq_len", cfg.seq_len, 2)
    _int("block_size", cfg.block_size, 1, allow_none=True)
    for key in ("batch_size", "grad_accum", "steps", "k", "loss_chunk", "save_every",
                "log_every"):
        _int(key, getattr(cfg, key), 1)
    for key in ("warmup_steps", "dense_layers", "n_sink", "n_recent", "recall_every", "seed"):
        _int(key, getattr(cfg, key), 0)
    _int("threads", cfg.threads, 1, allow_none=True)
    _choice("mode", cfg.mode, ("lora", "full"))
    _choice("schedule", cfg.schedule, ("cosine", "constant"))
    _choice("precision", cfg.precision, ("fp32", "bf16"))
    _choice("teacher", cfg.teacher, ("model", "base"))
    if cfg.teacher == "base" and cfg.mode != "lora":
        raise ConfigError("config key 'teacher': \"base\" needs 'mode' \"lora\" (the base model is "
                          "the adapters switched off; full fine-tuning keeps no frozen copy)")
    _num("lr", cfg.lr, 0, allow_none=True, open_low=True)
    _num("weight_decay", cfg.weight_decay, 0)
    _num("min_lr_ratio", cfg.min_lr_ratio, 0, 1)
    _num("grad_clip", cfg.grad_clip, 0, open_low=True)
    _num("lambda", cfg.lam, 0)
    if (not isinstance(cfg.betas, list) or len(cfg.betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                       for b in cfg.betas)):
        _fail("betas", cfg.betas, "a list of two numbers in [0, 1)")
    _bool("token_shift", cfg.token_shift, allow_none=True)
    for key in ("complementary", "gradient_checkpointing", "progress"):
        _bool(key, getattr(cfg, key))
    if cfg.device is not None and not isinstance(cfg.device, str):
        _fail("device", cfg.device, "a device string ('cpu', 'cuda', 'cuda:1') or null")
    if cfg.n_sink + cfg.n_recent > cfg.k:
        raise ConfigError(f"config keys 'n_sink' + 'n_recent' = {cfg.n_sink + cfg.n_recent} "
                          f"exceed the budget 'k' = {cfg.k}")
    cfg.lora = _lora(cfg.lora)
    cfg.data = _data(cfg.data)
    if cfg.lr is None:
        cfg.lr = LR_DEFAULTS[cfg.mode]
    return cfg


def _lora(v) -> dict:
    if not isinstance(v, dict):
        _fail("lora", v, "an object with keys " + str(sorted(LORA_DEFAULTS)))
    unknown = sorted(set(v) - set(LORA_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in 'lora'; known: {sorted(LORA_DEFAULTS)}")
    out = {**LORA_DEFAULTS, **v}
    _int("lora.r", out["r"], 1)
    _num("lora.alpha", out["alpha"], 0, open_low=True)
    _num("lora.dropout", out["dropout"], 0, 1)
    tm = out["target_modules"]
    if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
        _fail("lora.target_modules", tm, "a non-empty list of module names")
    return out


DATA_KEYS = {"jsonl": None, "text_field": "text", "packing": True,
             "synthetic": None, "answer_weight": 1.0}


def _data(v) -> dict:
    if not isinstance(v, dict):
        _fail("data", v, 'an object: {"jsonl": path} or {"synthetic": {kind: weight}}')
    unknown = sorted(set(v) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in 'data'; known: {sorted(DATA_KEYS)}")
    out = {**DATA_KEYS, **v}
    if (out["jsonl"] is None) == (out["synthetic"] is None):
        raise ConfigError("config key 'data': give exactly one of 'jsonl' (a path to a JSON-lines "
                          "file with a text field per line) and 'synthetic' ({kind: weight})")
    if out["jsonl"] is not None and (not isinstance(out["jsonl"], str) or not out["jsonl"]):
        _fail("data.jsonl", out["jsonl"], "a path string")
    if not isinstance(out["text_field"], str) or not out["text_field"]:
        _fail("data.text_field", out["text_field"], "a field name")
    _bool("data.packing", out["packing"])
    _num("data.answer_weight", out["answer_weight"], 0)
    if out["synthetic"] is not None:
        from ..eval.tasks import TASKS
        kinds = ("filler",) + tuple(TASKS)
        mix = out["synthetic"]
        if not isinstance(mix, dict) or not mix:
            _fail("data.synthetic", mix, f"an object {{kind: weight}} with kinds from {kinds}")
        for kind, w in mix.items():
            if kind not in kinds:
                _fail("data.synthetic", kind, f"a kind from {kinds}")
            _num(f"data.synthetic.{kind}", w, 0, open_low=True)
    return out


def load_config(source) -> FTConfig:
    """An FTConfig from a path to a JSON file, a dict, or an FTConfig (validated again)."""
    if isinstance(source, FTConfig):
        return validate(source.to_json())
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except ValueError as e:
            raise ConfigError(f"config file {path!r} is not valid JSON: {e}") from e
        return validate(raw)
    return validate(source)
