"""The evaluation harness: accuracy, recall and KV fraction per method / budget / task / length.

    from mage_ext.eval.harness import EvalConfig, evaluate
    report = evaluate("mage_ext/assets/tiny", EvalConfig(tasks=("passkey",), lengths=(4096,)))

Every method runs in the same generation loop (mage_ext.generate) at the same budget k, and
each budgeted method once per entry of ``dense_layers`` (the first layers that read the whole
cache):
  exact              dense attention everywhere
  mage / mage_l1     MAGE / MAGE with only the first layer dense (whatever dense_layers says)
  mage_adaptive      MAGE with the adaptive per-layer budget (mean budget k)
  quest, tidal, sparsed   the baselines (spec section 6)
  random / recent    matched controls of the mage row (same dense layers, budget k, exact first
                     step, selection reused by the later steps): k random / the last k entries
                     instead of the top-k (selectors/controls.py)
  control            every layer reads only the last prompt block (window = block size): if
                     accuracy does not fall to chance here, the task does not need the cache
Recall (set and mass, spec section 4) is measured at every later denoising step against that
step's exact top-k, averaged over the layers that select; kv_fraction is the share of the
cache the denoise/commit forwards read.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..core.policy import PolicyConfig
from . import tasks as T
from .meters import MeterGroup, NeedleMassMeter, needle_positions
from .recall import RecallMeter

# harness name -> (PolicyConfig method, dense layers (None: each of EvalConfig.dense_layers),
# adaptive)
_BUDGETED = {
    "mage": ("mage", None, False),
    "mage_l1": ("mage", 1, False),
    "mage_adaptive": ("mage", None, True),
    "quest": ("quest", None, False),
    "tidal": ("tidal", None, False),
    "sparsed": ("sparsed", None, False),
    "random": ("random", None, False),
    "recent": ("recent", None, False),
}
METHOD_NAMES = ("exact", *_BUDGETED, "control")


@dataclass
class EvalConfig:
    tasks: Sequence[str] = ("passkey", "niah_single")
    lengths: Sequence[int] = (4096, 8192, 16384)
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    samples_per_depth: int = 2
    methods: Sequence[str] = METHOD_NAMES
    ks: Sequence[int] = (64, 128, 256, 512, 1024, 2048)
    dense_layers: Union[int, Sequence[int]] = 2   # one or several settings (mage_l1 uses 1)
    batch_size: int = 8
    recall: bool = True
    needle_mass: bool = True         # per-layer attention mass on the needle (exact only)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for t in self.tasks:
            if t not in T.TASKS:
                raise ValueError(f"EvalConfig.tasks: unknown task '{t}', expected one of {T.TASKS}")
        for m in self.methods:
            if m not in METHOD_NAMES:
                raise ValueError(f"EvalConfig.methods: unknown method '{m}', expected one of "
                                 f"{METHOD_NAMES}")
        if any(int(n) <= 0 for n in self.lengths) or any(int(k) <= 0 for k in self.ks):
            raise ValueError("EvalConfig: lengths and ks must be positive")
        if not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"EvalConfig.depths: must lie in [0, 1], got {self.depths}")
        if self.samples_per_depth <= 0 or self.batch_size <= 0:
            raise ValueError("EvalConfig: samples_per_depth and batch_size must be > 0")
        dense = self.dense_layers
        self.dense_layers = (dense,) if isinstance(dense, int) else tuple(dense)
        if not self.dense_layers or any(int(d) < 0 for d in self.dense_layers):
            raise ValueError(f"EvalConfig.dense_layers: expected integers >= 0, got {dense}")
        if int(self.seed) < 0:
            raise ValueError(f"EvalConfig.seed: must be >= 0, got {self.seed}")


def method_policies(name: str, ks: Sequence[int], dense_layers: Union[int, Sequence[int]],
                    block_size: int, seed: int = 0):
    """(k or None, adaptive, PolicyConfig) for each dense-layer setting and budget of one method
    (seed: the random control's draws)."""
    if name == "exact":
        return [(None, False, PolicyConfig(method="exact"))]
    if name == "control":
        return [(block_size, False, PolicyConfig(method="window", window=block_size,
                                                 dense_layers=0, k=block_size))]
    method, fixed, adaptive = _BUDGETED[name]
    settings = [fixed] if fixed is not None else (
        [dense_layers] if isinstance(dense_layers, int) else list(dense_layers))
    return [(k, adaptive, PolicyConfig(method=method, k=k, adaptive=adaptive, dense_layers=dense,
                                       selection_seed=seed))
            for dense in settings for k in ks]


def dense_of(policy: PolicyConfig) -> Optional[int]:
    """The dense layers a record reports: None for exact (every layer reads the whole cache)."""
    return None if policy.method == "exact" else policy.dense_layers


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.time()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        el = time.time() - self.t0
        eta = el / self.done * (self.total - self.done)
        width = 30
        bar = "#" * int(width * self.done / self.total)
        sys.stderr.write(f"\r[{bar:<{width}}] {self.done}/{self.total} {what[:40]:<40} "
                         f"{el:5.0f}s eta {eta:5.0f}s")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _samples(cfg: EvalConfig, task: str, length: int, block_size: int):
    # make_sample mixes task, length and depth into its own seed: sample i of each cell differs
    return [T.make_sample(task, length, seed=cfg.seed * 100_003 + i, depth=depth,
                          block_size=block_size)
            for depth in cfg.depths for i in range(cfg.samples_per_depth)]


class _Cell:
    """What one (method, k) accumulates over the samples of one (task, length)."""

    def __init__(self, recall: bool):
        self.correct, self.kv_fracs, self.mass = [], [], None
        self.recall = RecallMeter() if recall else None


def evaluate(model, cfg: Optional[EvalConfig] = None, *, device=None, dtype=None,
             on_record=None) -> dict:
    """Runs the grid; ``model`` is a checkpoint directory or a ``LoadedModel``.
    ``on_record(record)`` is called as each record is finished (for incremental output)."""
    from ..generation import generate as run_generation
    from ..hf.checkpoint import LoadedModel, load_model

    cfg = cfg or EvalConfig()
    lm = model if isinstance(model, LoadedModel) else load_model(
        model, device=device or "cpu", dtype=dtype or torch.float32)
    block = lm.block_size
    grid = [(m, k, ad, p) for m in cfg.methods
            for (k, ad, p) in method_policies(m, cfg.ks, cfg.dense_layers, block, cfg.seed)]
    cells = [(t, n) for t in cfg.tasks for n in cfg.lengths]
    prog = _Progress(len(grid) * len(cells), cfg.progress)
    records, heat, needle = [], [], []
    for task, length in cells:
        samples = _samples(cfg, task, length, block)
        acc = [_Cell(cfg.recall and m != "exact") for m, *_ in grid]
        for s0 in range(0, len(samples), cfg.batch_size):
            chunk = samples[s0:s0 + cfg.batch_size]
            prefix = None  # the prompt is prefilled once per chunk, for every method
            for cell, (method, k, adaptive, policy) in zip(acc, grid):
                if cfg.needle_mass and method == "exact":
                    cell.mass = cell.mass or NeedleMassMeter([])
                    cell.mass.positions = [needle_positions(s.context, s.answer) for s in chunk]
                meter = MeterGroup(cell.recall, cell.mass)
                res = run_generation(lm, input_ids=[s.prompt for s in chunk], policy=policy,
                                     max_new_tokens=block - len(chunk[0].prefix),
                                     recall_meter=meter if meter.meters else None,
                                     prefix=prefix, keep_prefix=prefix is None)
                prefix = prefix or res.prefix
                cell.kv_fracs.append(res.kv_fraction)
                for s, ids in zip(chunk, res.token_ids):
                    cell.correct.append((s.depth, T.score(s, ids)))
                if s0 + cfg.batch_size >= len(samples):
                    prog.step(f"{task} {length} {method} k={k}")
        for cell, (method, k, adaptive, policy) in zip(acc, grid):
            summ = cell.recall.summary() if cell.recall is not None else {}
            rec = dict(method=method, k=k, adaptive=adaptive, dense_layers=dense_of(policy),
                       task=task, context_len=length, seed=cfg.seed,
                       accuracy=sum(c for _, c in cell.correct) / len(cell.correct),
                       recall=summ.get("set_recall"), mass_recall=summ.get("mass_recall"),
                       oracle_mass=summ.get("oracle_mass"),
                       kv_fraction=sum(cell.kv_fracs) / len(cell.kv_fracs), n=len(cell.correct))
            records.append(rec)
            for depth in cfg.depths:
                vals = [c for d, c in cell.correct if d == depth]
                heat.append(dict(method=method, k=k, dense_layers=dense_of(policy), task=task,
                                 context_len=length, depth=depth, seed=cfg.seed,
                                 accuracy=sum(vals) / len(vals)))
            if cell.mass is not None:
                needle.append(dict(task=task, context_len=length, seed=cfg.seed,
                                   per_layer=cell.mass.per_layer()))
            if on_record is not None:
                on_record(rec)
    return dict(records=records, heatmap=heat, needle_mass=needle)


def _dense(r) -> str:
    return "-" if r.get("dense_layers") is None else str(r["dense_layers"])


def records_table(records: list) -> str:
    """Markdown table: accuracy / recall / mass recall and its ceiling / KV fraction per record."""
    lines = ["| method | k | dense | task | context | seed | accuracy | set recall | mass recall "
             "| mass ceiling | KV read |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in records:
        lines.append(f"| {r['method']} | {r['k'] or '-'} | {_dense(r)} | {r['task']} | "
                     f"{r['context_len']} | {r.get('seed', '-')} | {r['accuracy']:.3f} | "
                     f"{f(r['recall'])} | {f(r['mass_recall'])} | {f(r.get('oracle_mass'))} | "
                     f"{r['kv_fraction']:.3f} |")
    return "\n".join(lines)


def summary_table(records: list) -> str:
    """Markdown table, one row per (method, k, dense layers): accuracy per context length (mean
    over tasks and seeds), overall accuracy, set / mass recall, mass recall's ceiling (the mass
    of each step's own top-k) and KV read (means over tasks, lengths and seeds)."""
    lengths = sorted({r["context_len"] for r in records})
    rows: dict = {}
    for r in records:
        rows.setdefault((r["method"], r["k"], r["adaptive"], _dense(r)), []).append(r)

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    head = "| method | k | dense | " + " | ".join(f"acc {n // 1024}K" for n in lengths) + \
        " | acc mean | set recall | mass recall | mass ceiling | KV read |"
    lines = [head, "|" + " --- |" * 2 + " ---: |" * (len(lengths) + 6)]
    for (method, k, _, dense), rs in rows.items():
        accs = [mean([r["accuracy"] for r in rs if r["context_len"] == n]) for n in lengths]
        lines.append(f"| {method} | {k or '-'} | {dense} | " + " | ".join(f(a) for a in accs) +
                     f" | {f(mean([r['accuracy'] for r in rs]))} | {f(mean([r['recall'] for r in rs]))}"
                     f" | {f(mean([r['mass_recall'] for r in rs]))}"
                     f" | {f(mean([r.get('oracle_mass') for r in rs]))} | "
                     f"{f(mean([r['kv_fraction'] for r in rs]))} |")
    return "\n".join(lines)


__all__ = ["summary_table", "EvalConfig", "METHOD_NAMES", "evaluate", "method_policies", "records_table"]
