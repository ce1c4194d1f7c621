"""MAGE-FT: fine-tune a block-diffusion checkpoint to lean on [MASK]-guided sparse attention.

    from mage_ext.train.mage_ft import finetune
    finetune("cfg.json")            # or a dict; python -m mage_ext.finetune --config cfg.json

Per optimizer step, grad_accum micro-batches of batch_size sequences, each through
mage_ext.train.objective.mage_ft_loss (selection + teacher without grad, the sparse student with
grad; CE + lambda * KL). LoRA (peft) or full fine-tuning, fp32 or bf16 autocast, optional
activation checkpointing. The output directory holds:
  config.json       the validated run config
  log.jsonl         one JSON line per optimizer step (loss, ce, kl, recall, lr, grad norm, times)
  checkpoint.pt     trainable weights, optimizer, scheduler, RNG states and data position, every
                    save_every steps, at the end, and on SIGTERM / SIGINT (then the run stops);
                    rerunning the same config resumes from it, step for step
  final/            the fine-tuned model (LoRA merged) in the checkpoint's dtype: load_model(final)
  adapter/          (LoRA) the peft adapter; load_model(adapter) merges it into its base
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch

from . import sharded_checkpoint
from .checkpoint import atomic_torch_save, atomic_write_text, export_model, saved_dtype
from .config import RESUMABLE_CHANGES, ConfigError, FTConfig, load_config
from .data import make_source
from .layout import causal_lm, enable_activation_checkpointing
from .objective import MageFTObjective, mage_ft_loss
from .sharded import LossModule, Ranks, clip_grad_norm, shard

INTERRUPTED_EXIT = 143   # the CLI's exit status after a SIGTERM (checkpoint saved)


def _device(cfg: FTConfig, ranks: Ranks) -> torch.device:
    if cfg.device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(cfg.device)
        except RuntimeError as e:
            raise ConfigError(f"config key 'device': {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {cfg.device!r} but no CUDA device is available")
    if ranks.sharded and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())   # each rank's own (torchrun)
    return dev


def _load(cfg: FTConfig, device):
    from ..hf.checkpoint import load_model

    base_dtype = torch.bfloat16 if (cfg.precision == "bf16" and cfg.mode == "lora") else torch.float32
    try:
        return load_model(cfg.model, dtype=base_dtype, device=device)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model': {e}") from e


def _check_against_model(cfg: FTConfig, lm, device) -> int:
    """Model-dependent checks; returns the block size."""
    bs = cfg.block_size or lm.block_size
    mc = lm.model.config
    if cfg.seq_len % bs:
        raise ConfigError(f"config key 'seq_len': {cfg.seq_len} is not a multiple of the block "
                          f"size {bs}")
    if cfg.seq_len < 2 * bs:
        raise ConfigError(f"config key 'seq_len': {cfg.seq_len} holds fewer than two blocks of "
                          f"{bs}; no block would have a clean prefix to select from")
    if cfg.k >= cfg.seq_len - bs:
        raise ConfigError(f"config key 'k': {cfg.k} is not smaller than the longest clean prefix "
                          f"(seq_len - block_size = {cfg.seq_len - bs}): every block would read "
                          "its whole prefix, and MAGE-FT would be plain training")
    if cfg.dense_layers >= mc.num_hidden_layers:
        raise ConfigError(f"config key 'dense_layers': {cfg.dense_layers} leaves no sparse layer "
                          f"in a model of {mc.num_hidden_layers} layers")
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    if device.type == "cuda" and (head_dim not in (64, 128) or bs > 64):
        raise ConfigError(f"the CUDA kernels take head dim 64 / 128 and blocks up to 64; this "
                          f"model has head dim {head_dim}, block size {bs}")
    return bs


def _prepare(cfg: FTConfig, lm):
    """The trained module (a peft wrapper for LoRA) with its trainable parameters set."""
    model = lm.model
    if cfg.mode == "lora":
        try:
            import peft
        except ImportError as e:
            raise ConfigError("config key 'mode': 'lora' needs peft (pip install "
                              "'mage_ext[finetune]')") from e
        lc = cfg.lora
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in lc["target_modules"] if t not in names]
        if missing:
            raise ConfigError(f"config key 'lora.target_modules': {missing} name no module of "
                              f"{type(model).__name__}")
        base = os.path.abspath(cfg.model)    # recorded in the adapter (peft reads the attribute)
        model.name_or_path = base
        with _quiet_peft():
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                target_modules=lc["target_modules"], base_model_name_or_path=base))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(causal_lm(model))
    model.train()
    return model


@contextmanager
def _quiet_peft():
    """peft calls transformers' deprecated names (FutureWarnings that say nothing to a user)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _lr_lambda(cfg: FTConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Stop:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint after the current step and
    returns. Handlers are installed only from the main thread and restored at the end."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:   # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now (the last checkpoint stays)
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# Config keys added after checkpoints were first written, with the value that older runs had.
KEYS_ADDED_LATER = {"teacher": "model"}


def _check_resumable(saved: dict, cfg: FTConfig, path: str) -> None:
    saved, now = {**KEYS_ADDED_LATER, **saved}, cfg.to_json()
    diff = sorted(k for k in set(saved) | set(now)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"{path} was written with a different config (keys {diff} differ); "
                          "resume with the same values or choose a new output_dir")


def _truncate_log(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(lines))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def finetune(config, *, _stop_after=None) -> dict:
    """Runs (or resumes) MAGE-FT from a config (path, dict or FTConfig); returns
    {"status": "done" | "interrupted", "step", "output_dir", "final", "log"}.
    _stop_after (tests): behave as if SIGTERM arrived during that optimizer step."""
    cfg = load_config(config)
    ranks = Ranks.current()
    rows = ranks.rows(cfg.batch_size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg, ranks)
    out = cfg.output_dir
    ckpt_path, log_path = _checkpoint_path(out, ranks), os.path.join(out, "log.jsonl")
    resume = os.path.exists(ckpt_path)
    # A run stopped before its first checkpoint leaves only these; anything else is not ours.
    foreign = (sorted(set(os.listdir(out)) - {"config.json", "log.jsonl", "checkpoint.tmp"})
               if os.path.isdir(out) and not resume else [])
    if foreign:
        raise ConfigError(f"config key 'output_dir': {out!r} holds {foreign[:3]} and no "
                          f"{os.path.basename(ckpt_path)} to resume; choose a new or empty "
                          "directory")
    saved = None
    if resume:
        saved = (sharded_checkpoint.read_meta(ckpt_path) if ranks.sharded else
                 torch.load(ckpt_path, map_location="cpu", weights_only=False))
        _check_resumable(saved["config"], cfg, ckpt_path)

    torch.manual_seed(cfg.seed)
    lm = _load(cfg, device)
    bs = _check_against_model(cfg, lm, device)
    data = make_source(cfg, lm, bs)
    model = _prepare(cfg, lm)
    root = LossModule(model)
    if ranks.sharded:
        shard(root, causal_lm(model).model.layers, device, ranks.world)
    params = [p for p in model.parameters() if p.requires_grad]   # (sharded: DTensors)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    obj = MageFTObjective(
        block_size=bs, mask_id=lm.mask_id, k=cfg.k, dense_layers=cfg.dense_layers, lam=cfg.lam,
        token_shift=(lm.family == "fast_dllm") if cfg.token_shift is None else cfg.token_shift,
        complementary=cfg.complementary, n_sink=cfg.n_sink, n_recent=cfg.n_recent,
        loss_chunk=cfg.loss_chunk)

    def teacher_ctx(m):   # "base": the KL's teacher is the model with its adapters off
        return m.disable_adapter if cfg.teacher == "base" else None

    step = 0
    if saved is not None and ranks.sharded:
        sharded_checkpoint.load(ckpt_path, root, opt)
    elif saved is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in saved["trainable"].items():
                named[n].copy_(t)
        opt.load_state_dict(saved["optimizer"])
    if saved is not None:
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["noise_rng"])
        _set_rng_state(saved["rng"])
        data.load_state_dict(saved["data"])
        step = saved["step"]
    if ranks.main:   # only rank 0 writes (the data, noise and step are the same on every rank)
        _truncate_log(log_path, step)    # lines past the checkpoint (or all, on a fresh start)
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "config.json"), json.dumps(cfg.to_json(), indent=1))

    def save_checkpoint():
        meta = {"step": step, "config": cfg.to_json(), "scheduler": sched.state_dict(),
                "noise_rng": gen.get_state(), "rng": _rng_state(), "data": data.state_dict()}
        if ranks.sharded:
            sharded_checkpoint.save(ckpt_path, root, opt, meta, ranks)
        else:
            atomic_torch_save(dict(meta, trainable=_trainable_state(model),
                                   optimizer=opt.state_dict()), ckpt_path)

    # Sharded: no autocast weight cache. FSDP2 reuses one unsharded parameter object across the
    # selection and student forwards; casts cached from it reached the gradients a step late
    # (grad norm 0 at step 1 with activation checkpointing; tests/python/test_mage_ft_fsdp.py).
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not ranks.sharded)
                if cfg.precision == "bf16" else nullcontext())
    bar = None
    if cfg.progress and ranks.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc="MAGE-FT", dynamic_ncols=True)
    status = "done"
    log_file = open(log_path, "a", encoding="utf-8") if ranks.main else nullcontext()
    with _Stop() as stop, log_file as log:
        while step < cfg.steps:
            t0 = time.perf_counter()
            recall = cfg.recall_every > 0 and step % cfg.recall_every == 0
            stats = []
            for _ in range(cfg.grad_accum):
                b = data.next_batch(cfg.batch_size)
                with autocast:
                    loss, st = root(lambda m: mage_ft_loss(
                        m, b["tokens"], b["weight"], b["force_mask"], b["keep"], obj, gen,
                        recall=recall, rows=rows, frozen_teacher=teacher_ctx(m)))
                (loss / cfg.grad_accum).backward()
                stats.append(dict(st, loss=float(loss.detach())))
            grad_norm = clip_grad_norm(params, cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            rec = {"step": step, "lr": lr, "grad_norm": float(grad_norm),
                   **{k: _mean([s.get(k) for s in stats])
                      for k in ("loss", "ce", "kl", "set_recall", "mass_recall", "t_select")},
                   "tokens": sum(s["tokens"] for s in stats),
                   "seconds": time.perf_counter() - t0}
            rec = ranks.reduce_stats(rec, device)
            if ranks.main and (step % cfg.log_every == 0 or step == cfg.steps):
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("loss", "kl", "mass_recall")
                                 if rec[k] is not None}, refresh=False)
                bar.update(1)
            stopping = ranks.any(stop.signal is not None
                                 or (_stop_after is not None and step >= _stop_after), device)
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                save_checkpoint()
            if stopping and step < cfg.steps:
                status = "interrupted"
                break
    if bar is not None:
        bar.close()
    result = {"status": status, "step": step, "output_dir": out, "log": log_path, "final": None}
    if status == "done" and ranks.sharded:
        result["final"] = _export_sharded(cfg, root, ranks)
    elif status == "done":
        result["final"] = _export(cfg, model)
    return result


def _checkpoint_path(out: str, ranks: Ranks) -> str:
    """checkpoint.pt (one process) or checkpoint/ (sharded, DCP); the other kind is an error."""
    plain = os.path.join(out, "checkpoint.pt")
    dcp_dir = os.path.join(out, sharded_checkpoint.DIRNAME)
    if ranks.sharded and os.path.exists(plain):
        raise ConfigError(f"config key 'output_dir': {out!r} holds a one-process checkpoint.pt; "
                          "resume it without torch.distributed (plain python, not torchrun) or "
                          "choose a new output_dir")
    if not ranks.sharded and os.path.isdir(dcp_dir):
        raise ConfigError(f"config key 'output_dir': {out!r} holds a sharded checkpoint/ "
                          "(written under torch.distributed); resume it under torchrun, with "
                          "any number of processes (1 included), or choose a new output_dir")
    return dcp_dir if ranks.sharded else plain


def _export_sharded(cfg: FTConfig, root, ranks: Ranks) -> str:
    """Gathers the whole model on rank 0, which loads it into an unsharded copy (LoRA: the
    same peft wrapper) and exports that as a one-process run does."""
    state = sharded_checkpoint.full_model_state(root)
    final = os.path.join(cfg.output_dir, "final")
    if ranks.main:
        copy = LossModule(_prepare(cfg, _load(cfg, torch.device("cpu"))))
        copy.load_state_dict(state)
        final = _export(cfg, copy.model)
    ranks.barrier()
    return final


def _export(cfg: FTConfig, model) -> str:
    final = os.path.join(cfg.output_dir, "final")
    dtype = saved_dtype(cfg.model)
    if cfg.mode == "lora":
        from .checkpoint import replace_dir
        with _quiet_peft():
            replace_dir(os.path.join(cfg.output_dir, "adapter"), model.save_pretrained)
            model = model.merge_and_unload()
    export_model(causal_lm(model), cfg.model, final, dtype)
    return final
