"""Chat prompts for ``python -m mage_ext.generate --chat``: the checkpoint's own chat template.

The template comes from the checkpoint directory: ``chat_template.jinja``, else the
``chat_template`` of tokenizer_config.json (a string, or a list of named templates: "default").
It is rendered with jinja2 (a dependency of torch) in a sandbox, as transformers does, with one
user message and ``add_generation_prompt=True``. A checkpoint without a template whose tokenizer
has the ChatML tokens (``<|im_start|>``, ``<|im_end|>``: Qwen2 / Qwen3 and the Fast-dLLM v2 and
SDAR models built on them) gets the plain ChatML layout; anything else is an error.
"""
from __future__ import annotations

import json
import os
from typing import Optional

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def find_template(path: str, tokenizer) -> tuple[str, str]:
    """(template, where it came from) for the checkpoint directory ``path``."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file) as f:
            return f.read(), jinja_file
    template = _tokenizer_config(path).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template.strip():
        return template, os.path.join(path, "tokenizer_config.json")
    if tokenizer is not None and all(tokenizer.token_to_id(t) is not None for t in CHATML_TOKENS):
        return CHATML, "ChatML (the tokenizer has <|im_start|> / <|im_end|>; no template found)"
    raise ValueError(f"--chat: {path} has no chat template (chat_template.jinja, or chat_template "
                     "in tokenizer_config.json) and its tokenizer has no ChatML tokens; pass the "
                     "prompt as it should be read, without --chat")


def render(template: str, user_text: str, special_tokens: Optional[dict] = None,
           system: Optional[str] = None) -> str:
    """The prompt text for one user message (and an optional system message)."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("--chat needs jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user_text}]
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                **(special_tokens or {}))
    except TemplateError as e:
        raise ValueError(f"--chat: the chat template failed: {e}") from None


def special_tokens(path: str) -> dict:
    """bos_token, eos_token ... of tokenizer_config.json as strings (templates use them)."""
    out = {}
    for key, value in _tokenizer_config(path).items():
        if key.endswith("_token"):
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
    return out


def chat_stop_ids(tokenizer) -> list:
    """Ids that end an assistant turn (ChatML's <|im_end|>) where the tokenizer has them."""
    i = tokenizer.token_to_id("<|im_end|>") if tokenizer is not None else None
    return [] if i is None else [int(i)]


def _tokenizer_config(path: str) -> dict:
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)
