"""Reader of user-supplied LongBench jsonl files (nothing is downloaded).

Each line is one JSON object with at least: input (str), context (str), answers (list),
all_classes (list or null), length (int), dataset (str). Errors name the file and the line number.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

_FIELDS = {"input": str, "context": str, "answers": list, "length": int, "dataset": str}


@dataclass
class LongBenchSample:
    input: str
    context: str
    answers: list
    all_classes: list | None
    length: int
    dataset: str
    id: str | None = None


def _parse(obj, where: str) -> LongBenchSample:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name, typ in _FIELDS.items():
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
        if not isinstance(obj[name], typ) or (typ is int and isinstance(obj[name], bool)):
            raise ValueError(f"{where}: field {name!r} must be {typ.__name__}, "
                             f"got {type(obj[name]).__name__}")
    if not obj["answers"]:
        raise ValueError(f"{where}: field 'answers' must not be empty")
    classes = obj.get("all_classes")
    if classes is not None and not isinstance(classes, list):
        raise ValueError(f"{where}: field 'all_classes' must be a list or null, got {type(classes).__name__}")
    return LongBenchSample(obj["input"], obj["context"], obj["answers"], classes, obj["length"],
                           obj["dataset"], obj.get("_id"))


def load_jsonl(path: str, limit: int | None = None) -> list[LongBenchSample]:
    """All samples of one file (blank lines skipped); `limit` keeps the first ones."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LongBench file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(_parse(obj, f"{path}:{n}"))
            if limit is not None and len(out) >= limit:
                break
    return out


def load_dataset(data_dir: str, dataset: str, limit: int | None = None) -> list[LongBenchSample]:
    """`<data_dir>/<dataset>.jsonl`, LongBench's file naming."""
    return load_jsonl(os.path.join(data_dir, f"{dataset}.jsonl"), limit)
