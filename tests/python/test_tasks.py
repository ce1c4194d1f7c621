"""Synthetic tasks: determinism, layout, depth placement, answers recoverable, scoring, tokenizer."""
import pytest

from mage_ext.eval import tasks as T
from mage_ext.eval import vocab as V

B = 32


def test_deterministic_and_seeded():
    for task in T.TASKS:
        a, b = T.make_sample(task, 1024, 7, 0.3), T.make_sample(task, 1024, 7, 0.3)
        assert (a.context, a.prefix, a.answer) == (b.context, b.prefix, b.answer)
        c = T.make_sample(task, 1024, 8, 0.3)
        assert (a.context, a.answer) != (c.context, c.answer)


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("length", [1024, 4096, 32768])
def test_layout(task, length):
    s = T.make_sample(task, length, 1)
    assert len(s.context) == length - B and len(s.context) % B == 0
    assert len(s.ctx_weight) == len(s.context)
    # the prompt's full blocks are exactly the context: the question heads the generation block
    assert len(s.prompt) // B * B == len(s.context)
    assert len(s.prefix) + len(s.answer) < B
    assert V.MASK not in V.words_of(s.prompt + s.answer)


@pytest.mark.parametrize("task", ["passkey", "niah_single"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_depth(task, depth):
    s = T.make_sample(task, 4096, 3, depth)
    start = V.words_of(s.context).index("the" if task == "passkey" else "remember")
    if task == "passkey":   # filler never contains "the"; the needle starts with it
        assert "the" not in V.FILLER
    needle = 16 if task == "passkey" else 5
    assert abs(start / (len(s.context) - needle) - depth) < 0.01


def _find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multikey_number",
                                  "niah_multikey_uuid", "niah_multikey_16"])
def test_needle_answer_in_prompt(task):
    for seed in range(5):
        s = T.make_sample(task, 2048, seed)
        key = s.prefix[2:]                               # "recall :" + key
        hits = _find(s.context, key)
        assert len(hits) == 1, "the asked key occurs once in the context"
        assert s.context[hits[0] + len(key)] == s.answer[0]   # the value follows the key


def test_passkey_multivalue_vt_fwe_recoverable():
    s = T.make_sample("passkey", 2048, 0)
    assert V.words_of(s.context).count(V.words_of(s.answer)[0]) == 2
    s = T.make_sample("niah_multivalue", 2048, 0)
    key = s.prefix[-1]
    assert [s.context[i + 1] for i in _find(s.context, [key])] == s.answer
    s = T.make_sample("vt", 2048, 0)
    w = V.words_of(s.context)
    assigned = {w[i + 1]: w[i + 3] for i in range(len(w) - 3) if w[i] == "var"}
    chain, target = [], V.words_of(s.prefix)[3]
    for x, rhs in assigned.items():                     # links appear in chain order
        if rhs == target or rhs in chain:
            chain.append(x)
    assert chain == s.answer_words()
    s = T.make_sample("fwe", 2048, 0)
    w = V.words_of(s.context)
    top = sorted(set(w), key=lambda x: -w.count(x))[:3]
    assert top == s.answer_words()
    assert len({w.count(x) for x in top} | {w.count(sorted(set(w), key=lambda x: -w.count(x))[3])}) == 4


@pytest.mark.parametrize("task,n_values,n_other", [("niah_multivalue", 4, 0),
                                                   ("niah_multivalue_6", 6, 0),
                                                   ("niah_multivalue_distract", 2, 8)])
@pytest.mark.parametrize("length", [256, 2048])
def test_multivalue_variants(task, n_values, n_other, length):
    for seed in range(4):
        s = T.make_sample(task, length, seed, depth=seed / 3)
        w = V.words_of(s.context)
        needles = [(w[i + 2], w[i + 3]) for i in range(len(w) - 4)
                   if w[i:i + 2] == ["remember", ":"] and w[i + 4] == "."]
        key = V.words_of(s.prefix)[-1]
        assert V.words_of(s.prefix) == ["recall", "all", ":", key]
        assert len(needles) == n_values + n_other
        # the asked key's values, in order of appearance, are the answer
        assert [v for k, v in needles if k == key] == s.answer_words()
        others = [(k, v) for k, v in needles if k != key]
        assert len(others) == n_other and len({k for k, _ in others}) == n_other
        assert not {v for _, v in others} & set(s.answer_words())
        # each needle's key and value have weight 0 (unpredictable); the template words do not
        assert sum(wt == 0.0 for wt in s.ctx_weight) == 2 * (n_values + n_other)
        # scoring: the share of the asked values present, distractor values count for nothing
        assert T.score(s, s.answer) == 1.0
        assert T.score(s, V.ids([v for _, v in others]) or [0]) == 0.0
        assert T.score(s, s.answer[:1]) == pytest.approx(1 / n_values)


def test_new_tasks_keep_the_layout_at_the_shortest_length():
    for task in ("niah_multikey_16", "niah_multivalue_6", "niah_multivalue_distract"):
        s = T.make_sample(task, 4 * B, 0)
        assert len(s.context) == 3 * B and len(s.prefix) + len(s.answer) < B


def test_scoring():
    s = T.make_sample("passkey", 1024, 0)
    assert T.score(s, s.answer) == 1.0
    assert T.score(s, [s.answer[0] + 1]) == 0.0
    assert T.exact_match(["a", "b", "c"], ["a", "b"]) == 1.0
    m = T.make_sample("niah_multivalue", 1024, 0)
    assert T.score(m, list(reversed(m.answer))) == 1.0         # a set: order-free
    assert T.score(m, m.answer[:2] + [V.ids(["the"])[0]] * 2) == 0.5
    assert T.string_match_all("The Cat sat", ["cat", "dog"]) == 0.5
    with pytest.raises(ValueError, match="answers"):
        T.string_match_all("x", [])


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be one of"):
        T.make_sample("nope", 1024, 0)
    with pytest.raises(ValueError, match="multiple of block_size"):
        T.make_sample("passkey", 1000, 0)
    with pytest.raises(ValueError, match="depth must be in"):
        T.make_sample("passkey", 1024, 0, depth=1.5)


def test_train_example():
    s = T.make_sample("niah_single", 256, 0)
    e = T.to_train_example(s, B, answer_weight=2.0)
    assert len(e.tokens) == len(e.weight) == len(e.force_mask) == len(e.keep) == 256
    n = len(s.context)
    assert e.tokens[n:n + len(s.prefix)] == s.prefix and all(e.keep[n:n + len(s.prefix)])
    a = n + len(s.prefix)
    assert e.force_mask[a] and e.weight[a] == 2.0 and not e.keep[a]
    assert sum(e.force_mask) == len(s.answer)


def test_tokenizer():
    tok = V.build_tokenizer()
    assert tok.get_vocab_size() == len(V.vocabulary())
    assert tok.token_to_id("<|mask|>") == V.token_to_id()[V.MASK]
    s = T.make_sample("niah_multikey_uuid", 1024, 2)
    text = V.decode(s.prompt + s.answer)
    assert tok.encode(text).ids == s.prompt + s.answer        # every word is one token
    assert all(len(tok.encode(w).ids) == 1 for w in V.KEYS[:50] + V.VALUES[:50])
    assert len(V.KEYS) == 1024 and len(V.VALUES) == 512
    assert tok.encode("zzzz").ids == [V.token_to_id()[V.UNK]]
    with pytest.raises(KeyError, match="zzzz"):
        V.ids("zzzz")
