"""LongBench's answer metrics, reimplemented without third-party packages.

Each metric is `metric(prediction, ground_truth, all_classes=None) -> float in [0, 1]`; a sample
scores the best metric over its reference answers (`score_sample`). Differences from LongBench's
scripts, on purpose:
  * ROUGE-L is the LCS F1 (beta = 1) over lower-cased whitespace tokens, computed here; LongBench
    calls the `rouge` package, whose F-measure weights recall and precision slightly differently.
  * code similarity uses difflib's SequenceMatcher ratio (fuzzywuzzy's pure-Python fallback).
  * the classification score applies LongBench's rule (drop predicted classes that are strict
    substrings of the answer) without its remove-while-iterating slip.
Chinese datasets (jieba tokenisation) are not supported and are rejected by name.
"""
from __future__ import annotations

import difflib
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse white space (SQuAD style)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def qa_f1_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    pred, gold = prediction.lower().split(), ground_truth.lower().split()
    if not pred or not gold:
        return 0.0
    lcs = lcs_length(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the dataset's label set)")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def retrieval_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Share of the numbers in the prediction equal to the answer's "Paragraph N" id."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval ground truth must contain 'Paragraph <n>', got {ground_truth!r}")
    numbers = re.findall(r"\d+", prediction)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth, all_classes=None) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(ground_truth) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Similarity of the first code line of the prediction (comments and fences skipped)."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return difflib.SequenceMatcher(None, line, ground_truth).ratio()


DATASET_METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "triviaqa": qa_f1_score,
    "gov_report": rouge_l_score, "qmsum": rouge_l_score, "multi_news": rouge_l_score,
    "samsum": rouge_l_score,
    "trec": classification_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}
UNSUPPORTED = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
# few-shot datasets: LongBench scores only the first line of the answer
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")


def metric_for(dataset: str):
    """The metric of a LongBench dataset name (a LongBench-E name ending in "_e" maps the same)."""
    base = dataset[:-2] if dataset.endswith("_e") else dataset
    if base in UNSUPPORTED:
        raise ValueError(f"dataset {dataset!r} is Chinese (jieba tokenisation); not supported")
    if base not in DATASET_METRIC:
        raise ValueError(f"dataset must be one of {sorted(DATASET_METRIC)} (optionally + '_e'), "
                         f"got {dataset!r}")
    return DATASET_METRIC[base]


def score_sample(dataset: str, prediction: str, answers: list, all_classes=None) -> float:
    """Best score over the reference answers, in [0, 1]."""
    if not answers:
        raise ValueError("answers must be a non-empty list")
    fn = metric_for(dataset)
    if dataset.removesuffix("_e") in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(fn(prediction, a, all_classes) for a in answers)


def score_dataset(dataset: str, predictions: list[str], answers: list[list], all_classes=None) -> float:
    """LongBench's dataset score: mean best score x 100, rounded to 2 decimals."""
    if len(predictions) != len(answers):
        raise ValueError(f"predictions ({len(predictions)}) and answers ({len(answers)}) differ in length")
    if not predictions:
        raise ValueError("predictions must not be empty")
    total = sum(score_sample(dataset, p, a, all_classes) for p, a in zip(predictions, answers))
    return round(100 * total / len(predictions), 2)
