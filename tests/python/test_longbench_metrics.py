"""LongBench metrics on hand-made examples with hand-computed values, and the jsonl reader."""
import json

import pytest

from mage_ext.eval import longbench as LB
from mage_ext.eval import metrics as M


def test_normalize_answer():
    assert M.normalize_answer("The Cat, sat  on a MAT!") == "cat sat on mat"


def test_qa_f1():
    # pred tokens: cat sat on mat; gold: cat on mat -> P 3/4, R 1, F1 6/7
    assert M.qa_f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert M.qa_f1_score("dog", "cat") == 0.0
    assert M.qa_f1_score("Paris.", "paris") == 1.0


def test_lcs_and_rouge_l():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    # LCS(a b c d e, a c e f) = a c e -> P 3/5, R 3/4, F 2/3
    assert M.rouge_l_score("a b c d e", "a c e f") == pytest.approx(2 / 3)
    assert M.rouge_l_score("x y", "a b") == 0.0
    assert M.rouge_l_score("", "a b") == 0.0
    assert M.rouge_l_score("The cat", "the CAT") == 1.0


def test_classification():
    classes = ["Location", "Number", "Description", "Entity"]
    assert M.classification_score("Number", "Number", classes) == 1.0
    assert M.classification_score("Number or Location", "Number", classes) == 0.5
    assert M.classification_score("Entity", "Number", classes) == 0.0
    # "Cat" is a strict substring of the answer "Category": dropped, so the answer counts alone
    assert M.classification_score("Category", "Category", ["Cat", "Category"]) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        M.classification_score("x", "y", None)


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 12 and Paragraph 3", "Paragraph 12") == 0.5
    assert M.retrieval_score("none", "Paragraph 12") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        M.retrieval_score("1", "12")
    assert M.count_score("There are 7 unique paragraphs out of 30", 7) == 0.5
    assert M.count_score("7", "7") == 1.0


def test_code_sim():
    pred = "```python\n# a comment\nreturn x + 1\n```"
    assert M.code_sim_score(pred, "return x + 1") == 1.0
    # difflib: 3 matching characters out of 4 + 4 -> 2 * 3 / 8
    assert M.code_sim_score("abcd", "abce") == pytest.approx(0.75)


def test_dataset_map_and_scores():
    assert M.metric_for("hotpotqa") is M.qa_f1_score
    assert M.metric_for("gov_report_e") is M.rouge_l_score
    assert M.metric_for("lcc") is M.code_sim_score
    with pytest.raises(ValueError, match="Chinese"):
        M.metric_for("dureader")
    with pytest.raises(ValueError, match="dataset must be one of"):
        M.metric_for("nope")
    # few-shot sets score the first line only; best over answers
    assert M.score_sample("triviaqa", "Paris\nLondon Rome", ["Rome", "Paris"]) == 1.0
    assert M.score_sample("triviaqa", "London\nParis", ["Paris"]) == 0.0
    assert M.score_dataset("passage_count", ["3", "3 or 4"], [[3], [3]]) == 75.0
    with pytest.raises(ValueError, match="differ in length"):
        M.score_dataset("qasper", ["a"], [])


def _line(**over):
    obj = {"input": "q", "context": "c", "answers": ["a"], "all_classes": None, "length": 5,
           "dataset": "qasper", "_id": "x1"}
    obj.update(over)
    return json.dumps(obj)


def test_loader(tmp_path):
    p = tmp_path / "qasper.jsonl"
    p.write_text(_line() + "\n\n" + _line(answers=["b", "c"], _id="x2") + "\n")
    got = LB.load_dataset(str(tmp_path), "qasper")
    assert [s.id for s in got] == ["x1", "x2"] and got[1].answers == ["b", "c"]
    assert len(LB.load_jsonl(str(p), limit=1)) == 1


@pytest.mark.parametrize("bad,msg", [
    ("{not json", r":2: not valid JSON"),
    (json.dumps({"input": "q"}), r":2: missing field 'context'"),
    (_line(length="5"), r":2: field 'length' must be int"),
    (_line(answers=[]), r":2: field 'answers' must not be empty"),
    (_line(all_classes="x"), r":2: field 'all_classes' must be a list or null"),
])
def test_loader_bad_line(tmp_path, bad, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(_line() + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=msg):
        LB.load_jsonl(str(p))


def test_loader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LB.load_jsonl(str(tmp_path / "absent.jsonl"))
