"""The C++ tokenizer (csrc/runtime/base/tokenizer.*, driven through build/cpp-tests/mage_tokenize)
against the Python `tokenizers` library, token for token.

No real Qwen tokenizer.json can be downloaded here, so the test builds realistic ones with the
`tokenizers` library itself: byte-level BPE with the Qwen2 split regex, NFC and the special
tokens Qwen ships (trained on a small corpus with BpeTrainer), a GPT-2 style one (ByteLevel with
its own regex and a prefix space, merges written as "a b" strings), a unk / fuse_unk BPE with a
Whitespace pre-tokenizer, WordPiece decoder and a BOS template, and the shipped model's WordLevel
tokenizer. Each must encode a corpus of unicode, emoji, code, CJK, whitespace runs, special
tokens and chat-template text to the same ids, and decode ids (also random ones, also streamed
in chunks that cut multi-byte characters) to the same text.
"""
import json
import random
import subprocess
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers, processors, trainers  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build" / "cpp-tests" / "mage_tokenize"
SHIPPED = ROOT / "mage_ext" / "assets" / "tiny_bd" / "tokenizer.json"

pytestmark = pytest.mark.skipif(
    not BINARY.is_file(),
    reason=f"{BINARY} is not built (cmake -S . -B build/cpp-tests -G Ninja && "
           "cmake --build build/cpp-tests --target mage_tokenize)")

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see it's what they've done; we'd say THEY'RE RIGHT, it'S fine.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\r\n\tsum += a[i] * b[i];  // dot\r\n}\n",
    "数学是科学的语言。日本語のテキストも、한국어 문장도 있습니다。",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ❤️ hearts",
    "Café naïve résumé — Ünïcödé façade; e\u0301 (decomposed) vs é; Å Å; ﬁ ligature",
    "Numbers: 3.14159, 2,718, 1e-9, ١٢٣ (Arabic-Indic), ⅻ, ² and ½.",
    "   leading spaces, trailing spaces   \n\n\n  blank lines\t\ttabs \u3000ideographic space\u00a0nbsp",
    "line one\nline two\r\nline three\rend \x85 next-line \u2028 separator\u180e mongolian",
    "ſ long s 'ſ 'S 'LL and straße STRASSE İstanbul",
    "Σίσυφος ΣΊΣΥΦΟΣ кириллица Кириллица עברית العربية हिन्दी ไทย",
    "https://example.com/path?query=1&x=y#frag <a href=\"x\">link</a> {\"json\": [1, 2]}",
    "x" * 300 + " " + "ab" * 150 + "   " + "!!!???" * 20,
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "text<|endoftext|>more<|MASK|><|MASK|> <|im_end|>  <|im_start|>",
    "<|im_start|<|im_end|>|> partial <|endoftext| tokens <tool_call> x<tool_call>y",
    "single word: <w> a<w> <w>b (<w>) <w>",
    "",
    " ",
    "\n",
    "a",
    "🤖",
    "ZWJ\u200dJoin\u200cNon zero\u200bwidth \ufeffbom",
    "\U0002a6d6 ext-b \U00030000 ext-g (rare CJK)",
]


def train_corpus():
    base = [t for t in CORPUS if t] * 3
    return base + [CHAT.format(t) for t in CORPUS[:6]]


def qwen_like(strip_tokens: bool = True) -> Tokenizer:
    """strip_tokens=False leaves out the lstrip/rstrip added token (whose stripped spaces do not
    come back on decode), for the fuzzer's round trip (tests/fuzz/make_corpus.py)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_corpus(), trainer)
    tok.add_tokens([AddedToken("<tool_call>", lstrip=strip_tokens, rstrip=strip_tokens,
                               normalized=False),
                    AddedToken("<w>", single_word=True, normalized=False)])
    if strip_tokens:
        tok.add_tokens([AddedToken("é!", normalized=True)])  # decoded through the byte alphabet
    return tok


def gpt2_like() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_corpus(), trainer)
    return tok


def unk_wordpiece_like() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]", fuse_unk=True, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["[UNK]", "[BOS]"],
                                  continuing_subword_prefix="##", limit_alphabet=60)
    tok.train_from_iterator(train_corpus()[:10], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))])
    return tok


def as_string_merges(path: Path) -> None:
    """Rewrites the merges as "a b" strings (the format older tokenizer.json files use)."""
    doc = json.loads(path.read_text())
    doc["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]]
    path.write_text(json.dumps(doc, ensure_ascii=False))


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    files = {}
    for name, build in (("qwen", qwen_like), ("gpt2", gpt2_like), ("unk", unk_wordpiece_like)):
        path = d / f"{name}.json"
        build().save(str(path))
        if name == "gpt2":
            as_string_merges(path)
        files[name] = path
    files["shipped"] = SHIPPED
    return files


def run(path: Path, requests: list) -> list:
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in requests) + "\n"
    r = subprocess.run([str(BINARY), "--tokenizer", str(path)], input=lines.encode(),
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    out = [json.loads(line) for line in r.stdout.decode().split("\n") if line]
    assert len(out) == len(requests)
    return out


def texts_for(name):
    texts = CORPUS + [CHAT.format(t) for t in CORPUS[:8]]
    if name == "shipped":  # its vocabulary: passkey prompts
        texts += ["the pass key is 71432. remember it. what is the pass key?",
                  "var_a = 12 , var_b = var_a . which variables equal 12 ?"]
    return texts


@pytest.mark.parametrize("name", ["qwen", "gpt2", "unk", "shipped"])
def test_encode_and_decode_match_python(tokenizer_files, name):
    path = tokenizer_files[name]
    py = Tokenizer.from_file(str(path))
    texts = texts_for(name)
    got = run(path, [{"text": t} for t in texts])
    for text, g in zip(texts, got):
        assert "error" not in g, (text, g)
        want = py.encode(text).ids
        assert g["ids"] == want, f"{name}: {text!r}\nC++    {g['ids']}\nPython {want}"
        assert g["text"] == py.decode(want), text
        assert g["text_all"] == py.decode(want, skip_special_tokens=False), text
    if name == "qwen":  # the corpus exercised what it should: multi-token specials and merges
        ids = [i for g in got for i in g["ids"]]
        for s in SPECIALS[:3] + ["<tool_call>", "<w>"]:
            assert py.token_to_id(s) in ids, s


@pytest.mark.parametrize("name", ["qwen", "gpt2", "unk", "shipped"])
def test_decode_of_random_ids_matches_python_and_streams(tokenizer_files, name):
    path = tokenizer_files[name]
    py = Tokenizer.from_file(str(path))
    n = py.get_vocab_size(with_added_tokens=True)
    rng = random.Random(5)
    requests = []
    for _ in range(60):  # random ids cut multi-byte characters; a few unknown ids too
        ids = [rng.randrange(n + 3) for _ in range(rng.randrange(1, 40))]
        requests.append({"ids": ids, "chunk": rng.randrange(1, 6)})
    got = run(path, requests)
    for req, g in zip(requests, got):
        want = py.decode(req["ids"])
        assert g["text"] == want, req
        assert g["text_all"] == py.decode(req["ids"], skip_special_tokens=False), req
        assert g["stream"] == want, req


def test_invalid_utf8_is_an_error_not_a_crash(tokenizer_files):
    r = subprocess.run([str(BINARY), "--tokenizer", str(tokenizer_files["qwen"])],
                       input=b'{"text": "ok \xff\xfe bad"}\n{"text": "fine"}\n', capture_output=True)
    assert r.returncode == 0
    lines = [json.loads(x) for x in r.stdout.decode().split("\n") if x]
    assert "UTF-8" in lines[0]["error"] and "ids" in lines[1]


def test_unsupported_parts_are_refused_by_name(tmp_path, tokenizer_files):
    doc = json.loads(tokenizer_files["qwen"].read_text())
    doc["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    r = subprocess.run([str(BINARY), "--tokenizer", str(bad)], input=b"", capture_output=True)
    assert r.returncode != 0 and b"Metaspace" in r.stderr and b"bad.json" in r.stderr


ALPHABET = (list("abcXYZ09 '\t\n\r.,!?-_()[]{}<>|/\\\"#$%&*+=:;@^`~") +
            ["  ", "\r\n", "\u3000", "\xa0", "\x85", "\u2028", "\u180e", "\u200b", "\u200d",
             "é", "e\u0301", "ß", "ſ", "İ", "Σ", "ж", "ع", "ह", "ไ", "数", "学", "語", "한",
             "😀", "👍🏽", "🇫🇷", "\U0002a6d6", "²", "½", "١", "ⅻ", "\U0001d7d8", "ﬁ"] +
            SPECIALS + ["<tool_call>", "<w>", "'s", "'LL", "<|im_start"])


@pytest.mark.parametrize("name", ["qwen", "gpt2", "unk"])
def test_random_strings_match_python(tokenizer_files, name):
    path = tokenizer_files[name]
    py = Tokenizer.from_file(str(path))
    rng = random.Random(11)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 60))) for _ in range(400)]
    for text, g in zip(texts, run(path, [{"text": t} for t in texts])):
        want = py.encode(text).ids
        assert g.get("ids") == want, f"{name}: {text!r}\nC++    {g}\nPython {want}"
        assert g["text"] == py.decode(want), text
