"""Seeded synthetic long-context tasks (RULER / Quest passkey style) over the tiny vocabulary.

Layout (block size B, 32 by default). A sample of `length` tokens is `context + prefix + answer`:
  * `context` has exactly length - B tokens, a multiple of B: these full blocks are prefilled;
  * `prefix` (the question, ending with the asked key) heads the first generation block, unmasked --
    Fast-dLLM v2 puts the prompt remainder there, so the lookup must happen in the generated block;
  * `answer` follows in the same block (len(prefix) + len(answer) < B); the rest of that block is EOS.
So the prompt is `context + prefix` and its full blocks are exactly `context`.

Needle formats put the key immediately before its value ("remember : K V ."), and every question ends
with the key, so the answer token (predicted, with the token shift, from the key's hidden state) is the
token that followed the same key in the context: one content match after one previous-token step.

Tasks: passkey, niah_single (one word-key needle), niah_multikey (4 word-key needles),
niah_multikey_number (7 digit-token keys), niah_multikey_uuid (4 hex pairs joined by "-": 7 tokens),
niah_multivalue (4 values of one key), vt (variable tracking, chain of 4), fwe (three most frequent
words). `make_sample(task, length, seed, depth)` is a pure function of its arguments.

Tasks that separate attention policies (docs/evaluation.md, "Tasks that separate methods"): a
one-token answer follows the asked key, which is given, so the model fixes it at the block's first
(all-[MASK]) step, and that step reads the whole cache under MAGE and its controls alike. Answers
of several tokens are mostly fixed at later steps, whose attention the policy decides:
niah_multivalue_6 (6 values of one key), niah_multivalue_distract (2 values of the asked key among
8 needles of other keys). niah_multikey_16 (16 word-key needles, one-token answer) is harder
for the lookup itself and separates policies only where the first layers are sparse too.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from . import vocab as V

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multikey_number", "niah_multikey_uuid",
         "niah_multivalue", "vt", "fwe", "niah_multikey_16", "niah_multivalue_6",
         "niah_multivalue_distract")
# Tasks whose answer is a set: scored by the share of expected words present (RULER string_match_all).
SET_ANSWER_TASKS = ("niah_multivalue", "vt", "fwe", "niah_multivalue_6", "niah_multivalue_distract")


@dataclass
class Sample:
    task: str
    length: int
    depth: float
    context: list[int]              # prefilled full blocks
    prefix: list[int]               # unmasked head of the first generation block (ends with the key)
    answer: list[int]
    ctx_weight: list[float] = field(repr=False, default_factory=list)  # 0 on unpredictable tokens

    @property
    def prompt(self) -> list[int]:
        return self.context + self.prefix

    def answer_words(self) -> list[str]:
        return V.words_of(self.answer)


@dataclass
class TrainExample:
    """One training sequence (a multiple of the block size) and per-token masking rules."""
    tokens: list[int]
    weight: list[float]             # loss weight where the token is masked
    force_mask: list[bool]          # always masked in x_t (answers: the model must produce them)
    keep: list[bool]                # never masked in x_t (the question prefix)


def to_train_example(s: Sample, block_size: int = 32, answer_weight: float = 1.0) -> TrainExample:
    eos = V.ids([V.EOS])[0]
    pad = block_size - len(s.prefix) - len(s.answer)
    tokens = s.context + s.prefix + s.answer + [eos] * pad
    weight = s.ctx_weight + [0.0] * len(s.prefix) + [answer_weight] * len(s.answer) + [1.0] * pad
    n_ctx, n_pre = len(s.context), len(s.prefix)
    force = [False] * (n_ctx + n_pre) + [True] * len(s.answer) + [False] * pad
    keep = [False] * n_ctx + [True] * n_pre + [False] * (len(s.answer) + pad)
    return TrainExample(tokens, weight, force, keep)


# ---------------------------------------------------------------------------------------------------
# Filler: a fixed sparse Markov chain over the filler words, so filler is predictable from the previous
# word (cheap to learn, and it rewards attending to the previous token).

def _successors() -> dict[str, list[str]]:
    rng = random.Random(99)
    return {w: rng.sample(V.FILLER, 3) for w in V.FILLER}


_SUCC = _successors()
_SUCC_P = (0.7, 0.2, 0.1)


def filler(n: int, rng: random.Random) -> list[int]:
    succ = _succ_ids()
    w = V.ids([rng.choice(V.FILLER)])[0]
    out = []
    for _ in range(n):
        out.append(w)
        r = rng.random()
        w = succ[w][0 if r < _SUCC_P[0] else 1 if r < _SUCC_P[0] + _SUCC_P[1] else 2]
    return out


_SUCC_IDS: dict[int, list[int]] = {}


def _succ_ids() -> dict[int, list[int]]:
    if not _SUCC_IDS:
        _SUCC_IDS.update({V.ids([w])[0]: V.ids(nxt) for w, nxt in _SUCC.items()})
    return _SUCC_IDS


# ---------------------------------------------------------------------------------------------------
# Key renderings

def _word_key(rng):
    return [rng.choice(V.KEYS)]


def _number_key(rng):
    return [rng.choice(V.DIGITS[1:])] + [rng.choice(V.DIGITS) for _ in range(6)]


def _uuid_key(rng):
    parts = [rng.choice(V.HEX) for _ in range(4)]
    return [parts[0], "-", parts[1], "-", parts[2], "-", parts[3]]


def _distinct(make, n, rng):
    seen, out = set(), []
    while len(out) < n:
        k = make(rng)
        if tuple(k) not in seen:
            seen.add(tuple(k))
            out.append(k)
    return out


# ---------------------------------------------------------------------------------------------------
# Assembly

Piece = tuple[list[str], list[float]]   # words and their loss weights


def _piece(text: str, random_words: set[str]) -> Piece:
    """Template text; words in random_words get weight 0 (they cannot be predicted)."""
    words = text.split()
    return words, [0.0 if w in random_words else 1.0 for w in words]


def _assemble(pieces: list[Piece], depths: list[float], n_ctx: int, rng) -> tuple[list[int], list[float]]:
    """Insert pieces into filler so that piece i starts near depths[i] * (n_ctx - len(piece i))."""
    total = sum(len(p[0]) for p in pieces)
    if total > n_ctx:
        raise ValueError(f"length too short: the needles need {total} context tokens, have {n_ctx}")
    n_fill = n_ctx - total
    order = sorted(range(len(pieces)), key=lambda i: depths[i])
    cuts = [min(n_fill, round(depths[i] * n_fill)) for i in order]
    fill = filler(n_fill, rng)
    toks, wts, prev = [], [], 0
    for i, cut in zip(order, cuts):
        toks += fill[prev:cut]
        wts += [1.0] * (cut - prev)
        toks += V.ids(pieces[i][0])
        wts += pieces[i][1]
        prev = cut
    toks += fill[prev:]
    wts += [1.0] * (n_fill - prev)
    return toks, wts


def _check_args(task, length, depth, block_size):
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if length % block_size or length < 4 * block_size:
        raise ValueError(f"length must be a multiple of block_size={block_size} and >= "
                         f"{4 * block_size}, got {length}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def make_sample(task: str, length: int, seed: int, depth: float | None = None,
                block_size: int = 32) -> Sample:
    """One sample of `length` tokens (context + generation block); depth of the asked needle in
    [0, 1] (None: drawn from the seed)."""
    _check_args(task, length, depth, block_size)
    rng = random.Random(f"{task}/{length}/{seed}/{depth}")
    if depth is None:
        depth = rng.random()
    if task == "fwe":
        return _fwe(task, length, seed, block_size)
    n_ctx = length - block_size
    pieces, depths, prefix, answer = _TASK_BUILDERS[task](rng, depth, n_ctx)
    context, weight = _assemble(pieces, depths, n_ctx, rng)
    s = Sample(task, length, depth, context, V.ids(prefix), V.ids(answer), weight)
    assert len(s.prefix) + len(s.answer) < block_size, "question and answer must fit one block"
    return s


def _passkey(rng, depth, n_ctx):
    v = rng.choice(V.VALUES)
    words = f"the pass key is {v} . remember it . {v} is the pass key .".split()
    wts = [1.0] * len(words)
    wts[4] = 0.0                      # the first mention is unpredictable; the repeat is a copy
    return [(words, wts)], [depth], "what is the pass key ? the pass key is".split(), [v]


def _niah(make_key, n_needles):
    def build(rng, depth, n_ctx):
        keys = _distinct(make_key, n_needles, rng)
        vals = rng.sample(V.VALUES, n_needles)
        pieces = [_piece(f"remember : {' '.join(k)} {v} .", set(k) | {v}) for k, v in zip(keys, vals)]
        depths = [depth] + [rng.random() for _ in range(n_needles - 1)]
        return pieces, depths, ["recall", ":"] + keys[0], [vals[0]]
    return build


def _multivalue(rng, depth, n_ctx, n_values=4, n_other=0):
    """n_values needles of one key (the answer, in order of appearance) and n_other needles of
    other keys (distractors: same format, other key, a value not in the answer)."""
    key = _word_key(rng)
    vals = rng.sample(V.VALUES, n_values)
    depths = sorted([depth] + [rng.random() for _ in range(n_values - 1)])
    pieces = [_piece(f"remember : {key[0]} {v} .", {key[0], v}) for v in vals]
    if n_other:
        others = rng.sample([k for k in V.KEYS if k != key[0]], n_other)
        other_vals = rng.sample([v for v in V.VALUES if v not in vals], n_other)
        pieces += [_piece(f"remember : {k} {v} .", {k, v}) for k, v in zip(others, other_vals)]
        depths += [rng.random() for _ in range(n_other)]
    return pieces, depths, ["recall", "all", ":"] + key, vals   # answer in order of appearance


def _vt(rng, depth, n_ctx, chain=4):
    names = rng.sample(V.KEYS, chain)
    v = rng.choice(V.VALUES)
    rhs = [v] + names[:-1]
    pieces = [_piece(f"var {x} = {r} .", {x, v}) for x, r in zip(names, rhs)]
    # the chain must be read in order: spread the links over [depth, 1] or [0, depth]
    lo, hi = (depth, 1.0) if depth <= 0.5 else (0.0, depth)
    depths = sorted(lo + (hi - lo) * rng.random() for _ in range(chain))
    return pieces, depths, f"which variables equal {v} ? answer :".split(), names


def _fwe(task, length, seed, block_size):
    rng = random.Random(f"{task}/{length}/{seed}/None")
    n_ctx = length - block_size
    words = rng.sample(V.KEYS, 30)
    # Zipf-like counts with a strict top three, shuffled into the context
    weights = [1.0 / (r + 1) ** 1.2 for r in range(len(words))]
    counts = [max(1, int(n_ctx * w / sum(weights))) for w in weights]
    counts[1] = min(counts[1], counts[0] - 1)
    counts[2] = min(counts[2], counts[1] - 1)
    for r in range(3, len(counts)):
        counts[r] = min(counts[r], counts[2] - 1)
    counts[-1] += n_ctx - sum(counts)     # top up with the rarest word (rounding lost a few)
    if not counts[0] > counts[1] > counts[2] > max(counts[3:]):
        raise ValueError(f"length {length} is too short for a strict top three in fwe")
    seq = [w for w, c in zip(words, counts) for _ in range(c)]
    rng.shuffle(seq)
    top = words[:3]
    prefix = "the three most frequent words are :".split()
    return Sample(task, length, 0.0, V.ids(seq), V.ids(prefix), V.ids(top), [0.0] * n_ctx)


_TASK_BUILDERS = {
    "passkey": _passkey,
    "niah_single": _niah(_word_key, 1),
    "niah_multikey": _niah(_word_key, 4),
    "niah_multikey_number": _niah(_number_key, 4),
    "niah_multikey_uuid": _niah(_uuid_key, 4),
    "niah_multivalue": _multivalue,
    "vt": _vt,
    "niah_multikey_16": _niah(_word_key, 16),
    "niah_multivalue_6": lambda rng, depth, n_ctx: _multivalue(rng, depth, n_ctx, n_values=6),
    "niah_multivalue_distract": lambda rng, depth, n_ctx: _multivalue(rng, depth, n_ctx,
                                                                      n_values=2, n_other=8),
}


# ---------------------------------------------------------------------------------------------------
# Scoring

def exact_match(pred: list, answer: list) -> float:
    """1.0 when the first len(answer) predicted tokens equal the answer (ids or words)."""
    return float(list(pred[:len(answer)]) == list(answer))


def string_match_all(pred_text: str, answers: list[str]) -> float:
    """Share of expected answer strings that occur as whole words of the prediction (RULER style)."""
    if not answers:
        raise ValueError("answers must not be empty")
    words = set(pred_text.lower().split())
    return sum(a.lower() in words for a in answers) / len(answers)


def score(sample: Sample, pred_ids: list[int]) -> float:
    """Exact match for single-answer tasks, string_match_all for set answers."""
    if sample.task in SET_ANSWER_TASKS:
        return string_match_all(V.decode(pred_ids), sample.answer_words())
    return exact_match(pred_ids, sample.answer)
