"""Warnings about prompts a model cannot answer well (``generate`` calls ``warn_about_prompts``).

Nothing here changes a generation; it says why an output may be poor:
* words the tokenizer does not know (word-level vocabularies map them to one unknown token,
  silently: the shipped tiny model knows 1957 words, mage_ext/eval/vocab.py);
* a decoding style other than the one the checkpoint was trained for (SDAR style on a
  Fast-dLLM v2 model ends its first block at once: an empty output);
* for the shipped tiny model, a layout it was not trained on: it answers a question that follows
  whole blocks of context (mage_ext/eval/tasks.py); a prompt shorter than one block has no
  prefilled context, and its answers are unreliable.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

MAX_NAMED = 5  # unknown words quoted in a warning


def unknown_words(tokenizer, text: str) -> tuple[int, int, list]:
    """(unknown words, words, the unknown words as written) of ``text``; (0, n, []) where the
    tokenizer has no unknown token (byte-level BPE knows every string)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers fast tokenizers
    model = getattr(backend, "model", None)
    unk = getattr(model, "unk_token", None)
    if unk is None or not hasattr(backend, "token_to_id"):
        return 0, 0, []
    unk_id = backend.token_to_id(unk)
    enc = backend.encode(text)
    found = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk_id]
    return len(found), len(enc.ids), found


def warn_about_prompts(loaded, tokenizer, texts: Optional[Sequence[str]], seqs: list,
                       style: str, block_size: int) -> None:
    """Warns (``warnings.warn``, attributed to generate's caller) about each problem found."""
    if texts is not None and tokenizer is not None:
        for i, text in enumerate(texts):
            n_unk, n, words = unknown_words(tokenizer, text)
            if n_unk:
                _warn(f"prompt {i}: {n_unk} of {n} words are not in the tokenizer's vocabulary "
                      f"(each became its unknown token): {_quote(words)}{_vocab_hint(tokenizer)}")
    trained = getattr(loaded, "family", None)
    if trained is not None and style != trained:
        model_type = getattr(getattr(getattr(loaded, "model", None), "config", None),
                             "model_type", "?")
        _warn(f"style '{style}' but this checkpoint (model_type {model_type}) was trained for the "
              f"'{trained}' style: expect an empty or wrong output (leave style unset to use "
              f"'{trained}')")
    if is_tiny_task_model(tokenizer):
        short = [i for i, s in enumerate(seqs) if len(s) < block_size]
        if short:
            _warn(f"prompt(s) {short[:MAX_NAMED]} shorter than one block ({block_size} tokens): "
                  f"the shipped tiny model was trained on questions that follow whole blocks of "
                  f"context (mage_ext/eval/tasks.py); its answers to such prompts are unreliable")


def is_tiny_task_model(tokenizer) -> bool:
    """True for the tokenizer of the project's tiny model (mage_ext/eval/vocab.py)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if backend is None or not hasattr(backend, "get_vocab_size"):
        return False
    from .eval import vocab as V

    table = V.token_to_id()
    if backend.get_vocab_size() != len(table):
        return False
    return all(backend.token_to_id(w) == table[w] for w in ("recall", "pass", V.KEYS[0],
                                                             V.VALUES[-1]))


def _vocab_hint(tokenizer) -> str:
    if is_tiny_task_model(tokenizer):
        return (" (the shipped tiny model knows only the words of mage_ext/eval/vocab.py: its "
                "task templates, filler words, keys and values)")
    return ""


def _quote(words: list) -> str:
    distinct = list(dict.fromkeys(words))
    more = len(distinct) - MAX_NAMED
    return ", ".join(repr(w) for w in distinct[:MAX_NAMED]) + (f" and {more} more" if more > 0
                                                                else "")


def _warn(msg: str) -> None:
    # stacklevel 4: this function, warn_about_prompts, generate, generate's caller
    warnings.warn(f"generate: {msg}", UserWarning, stacklevel=4)
