"""MAGE-FT training data: a user's JSON-lines text or the project's synthetic tasks, as batches of
fixed-length sequences, with a position that a checkpoint saves and a resumed run restores.

* ``JsonlSource``: one document per line (a JSON object with a text field), tokenized with the
  checkpoint's tokenizer. packing (default): documents joined by the end-of-text token into one
  stream cut into seq_len pieces; without packing each document is one sequence (cut to seq_len,
  shorter ones padded with end-of-text that is never masked and carries no loss). The file is
  read in order, epoch after epoch; the position is (epoch, line, the tokens carried over).
* ``SyntheticSource``: mage_ext.eval.tasks samples (answers always masked, the question prefix
  never, RULER-style) and filler text, in the project's tiny vocabulary; the position is the
  generator's state.
A batch is a dict of CPU tensors: tokens [batch, seq_len] int64, weight float32, force_mask and
keep bool (the per-token rules of mage_ext.train.objective.noise).
"""
from __future__ import annotations

import json
import os
import random

import torch

from .config import ConfigError


def synthetic_example(kind: str, length: int, rng: random.Random, block_size: int,
                      answer_weight: float = 1.0):
    """A TrainExample of ``length`` tokens: a task sample, or ``"filler"`` text."""
    from ..eval import tasks as T

    if kind == "filler":
        return T.TrainExample(T.filler(length, rng), [1.0] * length, [False] * length,
                              [False] * length)
    if kind in T.TASKS:
        s = T.make_sample(kind, length, rng.randrange(2**31), block_size=block_size)
        return T.to_train_example(s, block_size, answer_weight)
    raise ValueError(f"data kind must be 'filler' or one of {T.TASKS}, got {kind!r}")


def to_batch(examples) -> dict:
    """CPU tensors of equal-length TrainExamples (mage_ext.eval.tasks.TrainExample)."""
    return {
        "tokens": torch.tensor([e.tokens for e in examples], dtype=torch.long),
        "weight": torch.tensor([e.weight for e in examples], dtype=torch.float32),
        "force_mask": torch.tensor([e.force_mask for e in examples], dtype=torch.bool),
        "keep": torch.tensor([e.keep for e in examples], dtype=torch.bool),
    }


class SyntheticSource:
    def __init__(self, mix: dict, seq_len: int, block_size: int, seed: int,
                 answer_weight: float = 1.0, vocab_size: int = 0, mask_id: int = -1):
        from ..eval import vocab as V

        want = len(V.vocabulary())
        if vocab_size != want or mask_id != V.token_to_id()[V.MASK]:
            raise ConfigError(
                f"data.synthetic: the synthetic tasks are written in the project's tiny "
                f"vocabulary ({want} tokens, [MASK] id {V.token_to_id()[V.MASK]}); this model has "
                f"{vocab_size} tokens and [MASK] id {mask_id}. Use data.jsonl with text instead")
        self.mix, self.seq_len, self.bs, self.aw = mix, seq_len, block_size, answer_weight
        self.rng = random.Random(f"mage-ft/{seed}")
        for kind in mix:  # a task that cannot be laid out at this length fails here, not later
            try:
                synthetic_example(kind, seq_len, random.Random(0), block_size)
            except (ValueError, AssertionError) as e:
                raise ConfigError(f"data.synthetic.{kind}: cannot lay out a sample of {seq_len} "
                                  f"tokens in blocks of {block_size}: {e}") from e

    def next_batch(self, n: int) -> dict:
        kinds = self.rng.choices(list(self.mix), weights=list(self.mix.values()), k=n)
        return to_batch([synthetic_example(k, self.seq_len, self.rng, self.bs, self.aw)
                         for k in kinds])

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


class JsonlSource:
    def __init__(self, path: str, tokenizer, seq_len: int, block_size: int, eos_id: int,
                 vocab_size: int, text_field: str = "text", packing: bool = True):
        if tokenizer is None:
            raise ConfigError("data.jsonl: the checkpoint has no tokenizer.json to tokenize text")
        if not os.path.isfile(path):
            raise ConfigError(f"data.jsonl: {path!r} does not exist or is not a file")
        self.path, self.tok, self.seq_len, self.bs = path, tokenizer, seq_len, block_size
        self.eos, self.vocab, self.field, self.packing = eos_id, vocab_size, text_field, packing
        self.epoch, self.line, self.carry = 0, 0, []
        self._lines = None
        self._check_has_data()

    # -- reading -------------------------------------------------------------------------------
    def _read_lines(self) -> list:
        if self._lines is None:   # offsets of the non-empty lines: the file is read lazily
            offsets, pos = [], 0
            with open(self.path, "rb") as f:
                for raw in f:
                    if raw.strip():
                        offsets.append(pos)
                    pos += len(raw)
            self._lines = offsets
        return self._lines

    def _document(self, i: int) -> list:
        with open(self.path, "rb") as f:
            f.seek(self._lines[i])
            raw = f.readline()
        where = f"data.jsonl {self.path!r}, document {i + 1}"
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get(self.field), str):
            raise ConfigError(f"{where}: expected an object with a string field "
                              f"{self.field!r} (data.text_field)")
        ids = self.tok.encode(doc[self.field]).ids
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ConfigError(f"{where}: token id {bad[0]} is outside the model's vocabulary "
                              f"[0, {self.vocab})")
        if not self.packing and len(ids) < self.bs:
            raise ConfigError(f"{where}: {len(ids)} tokens, shorter than one block "
                              f"({self.bs}); drop it or use data.packing = true")
        return ids

    def _check_has_data(self) -> None:
        lines = self._read_lines()
        if not lines:
            raise ConfigError(f"data.jsonl {self.path!r} is empty (no documents)")
        if self.packing:
            total = 0
            for i in range(len(lines)):
                total += len(self._document(i)) + 1
                if total >= self.seq_len:
                    return
            raise ConfigError(f"data.jsonl {self.path!r} holds {total} tokens (with separators), "
                              f"fewer than one sequence of seq_len = {self.seq_len}")
        self._document(0)

    def _next_doc(self) -> list:
        lines = self._read_lines()
        if self.line >= len(lines):
            self.epoch, self.line = self.epoch + 1, 0
        ids = self._document(self.line)
        self.line += 1
        return ids

    def _next_sequence(self):
        from ..eval.tasks import TrainExample

        if not self.packing:
            ids = self._next_doc()[:self.seq_len]
            ids = ids[:len(ids) // self.bs * self.bs]
            pad = self.seq_len - len(ids)
            return TrainExample(ids + [self.eos] * pad, [1.0] * len(ids) + [0.0] * pad,
                                [False] * self.seq_len, [False] * len(ids) + [True] * pad)
        while len(self.carry) < self.seq_len:
            self.carry.extend(self._next_doc() + [self.eos])
        ids, self.carry = self.carry[:self.seq_len], self.carry[self.seq_len:]
        n = self.seq_len
        return TrainExample(ids, [1.0] * n, [False] * n, [False] * n)

    def next_batch(self, n: int) -> dict:
        return to_batch([self._next_sequence() for _ in range(n)])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "line": self.line, "carry": list(self.carry),
                "size": os.path.getsize(self.path)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != os.path.getsize(self.path):
            raise ConfigError(f"data.jsonl {self.path!r} changed size since the checkpoint was "
                              "written; the saved data position would not be the same data")
        self.epoch, self.line, self.carry = state["epoch"], state["line"], list(state["carry"])


def make_source(cfg, lm, block_size: int):
    """The data source of a validated config for a loaded checkpoint (mage_ext.LoadedModel)."""
    d = cfg.data
    vocab = lm.model.config.vocab_size
    if d["synthetic"] is not None:
        return SyntheticSource(d["synthetic"], cfg.seq_len, block_size, cfg.seed,
                               d["answer_weight"], vocab, lm.mask_id)
    eos = lm.stop_ids[0] if lm.stop_ids else None
    if eos is None:
        raise ConfigError(f"data.jsonl: the checkpoint {cfg.model!r} names no end-of-text token "
                          "(eos_token_id) to separate and pad documents")
    return JsonlSource(d["jsonl"], lm.tokenizer, cfg.seq_len, block_size, eos, vocab,
                       d["text_field"], d["packing"])
