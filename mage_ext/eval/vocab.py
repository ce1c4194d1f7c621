"""Word-level vocabulary and tokenizer of the project's tiny block-diffusion model.

Every word is one token, so a task's difficulty is the lookup, not spelling. The vocabulary is a pure
function of this file (no randomness beyond a fixed seed), so `build_tokenizer()` gives the same ids
on every machine. Layout (ids in this order):

  specials   <|endoftext|> <|pad|> <|mask|> <|unk|>
  markers    template words of the tasks ("pass", "key", "recall", ":", "=", ...)
  digits     "0".."9"           -- number keys of multi-key NIAH: 7 digit tokens, e.g. "4 8 1 2 9 0 3"
  hex        "00".."ff"         -- uuid-like keys: 4 hex pairs joined by "-", e.g. "3f - a9 - 0c - 77"
  filler     ~110 English words, never used as keys or values
  keys       1024 pseudo-words of two consonant-vowel syllables ("bako", "ridu"), single tokens
  values     512 four-digit numbers ("4821"), single tokens

The pre-tokenizer splits on whitespace and punctuation, so "a9-0c" reads as "a9 - 0c".
"""
from __future__ import annotations

import random
from functools import lru_cache

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|mask|>", "<|unk|>"]
EOS, PAD, MASK, UNK = SPECIALS

MARKERS = [
    ".", ":", "?", "=", "-", ",",
    "the", "pass", "key", "is", "remember", "it", "what", "recall", "all", "var", "which",
    "variables", "equal", "answer", "most", "frequent", "words", "list", "of", "three", "are",
    "magic", "number", "for", "values", "uuid",
]

# Filler vocabulary: plain English, disjoint from markers so a template word is never filler.
FILLER = """
grass sky blue green sun warm day night moon star tree river stone hill road house garden window
door light dark cold wind rain snow cloud field bird song morning evening quiet slow long short
small large old young bright soft deep high low red white black yellow flower leaf branch water
sea wave sand shore boat ship town city street market bread milk apple table chair book paper
letter friend mother father child story walk run sing read write sleep dream think look see hear
open close begin end again always often never here there today tomorrow yesterday very much little
and then so but or with from into over under near far we they you he she
""".split()

_CONSONANTS = "bdfgklmnprstvz"   # 14
_VOWELS = "aeiou"                # 5  -> 70 syllables, 4900 two-syllable words


def _keys() -> list[str]:
    syll = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = [a + b for a in syll for b in syll]
    random.Random(1234).shuffle(words)
    taken = set(FILLER) | set(MARKERS)
    return [w for w in words if w not in taken][:1024]


def _values() -> list[str]:
    return [str(n) for n in sorted(random.Random(5678).sample(range(1000, 10000), 512))]


DIGITS = [str(d) for d in range(10)]
HEX = [f"{i:02x}" for i in range(256)]
KEYS = _keys()
VALUES = _values()


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """All tokens in id order (see the module docstring)."""
    words = SPECIALS + MARKERS + DIGITS + HEX + FILLER + KEYS + VALUES
    if len(set(words)) != len(words):
        dup = sorted({w for w in words if words.count(w) > 1})
        raise AssertionError(f"vocabulary has duplicate words: {dup[:10]}")
    return tuple(words)


@lru_cache(maxsize=1)
def token_to_id() -> dict[str, int]:
    return {w: i for i, w in enumerate(vocabulary())}


def ids(words: list[str] | str) -> list[int]:
    """Ids of words (a list, or one string split on spaces); raises KeyError naming an unknown word."""
    table = token_to_id()
    seq = words.split() if isinstance(words, str) else words
    out = []
    for w in seq:
        if w not in table:
            raise KeyError(f"word {w!r} is not in the tiny vocabulary")
        out.append(table[w])
    return out


def words_of(token_ids) -> list[str]:
    voc = vocabulary()
    return [voc[int(i)] for i in token_ids]


def decode(token_ids) -> str:
    return " ".join(words_of(token_ids))


def build_tokenizer():
    """A `tokenizers.Tokenizer` (WordLevel, whitespace pre-tokenizer) over `vocabulary()`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=token_to_id(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def save_tokenizer(directory: str) -> None:
    """Write tokenizer.json and a tokenizer_config.json that `AutoTokenizer` understands."""
    import json
    import os

    build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS, "pad_token": PAD, "mask_token": MASK, "unk_token": UNK,
        "model_max_length": 32768, "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
