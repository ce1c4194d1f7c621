"""Writes the fuzzers' fixed tokenizer (data/qwen_like_tokenizer.json) and seed corpora
(corpus/<fuzzer>/). Run once from the repository root; the outputs are committed:

    python3 tests/fuzz/make_corpus.py
"""
import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

import test_cpp_tokenizer as t  # noqa: E402  (the Qwen-like tokenizer of the parity test)


def safetensors_file(entries, data: bytes, pad=True) -> bytes:
    header = json.dumps(entries).encode()
    if pad:
        header += b" " * ((8 - len(header) % 8) % 8)
    return struct.pack("<Q", len(header)) + header + data


def write(folder: str, name: str, data: bytes) -> None:
    d = HERE / "corpus" / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main():
    (HERE / "data").mkdir(exist_ok=True)
    tok = t.qwen_like(strip_tokens=False)
    tok.save(str(HERE / "data" / "qwen_like_tokenizer.json"))

    for i, text in enumerate(t.CORPUS[:16] + [t.CHAT.format("Hi <w> there")]):
        write("fuzz_tokenizer_encode", f"text{i:02d}", text.encode("utf-8"))

    write("fuzz_json", "config", (Path("mage_ext/assets/tiny_bd/config.json")).read_bytes())
    write("fuzz_json", "escapes", '{"s": "q\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00", "n": [0, -1.5e3, 1E+2, 18446744073709551615], "b": [true, false, null], "o": {}}'.encode())
    write("fuzz_json", "nested", b"[" * 40 + b"]" * 40)

    f32 = struct.pack("<4f", 1, 2, 3, 4)
    write("fuzz_safetensors_header", "two", safetensors_file(
        {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}}, f32))
    write("fuzz_safetensors_header", "empty", safetensors_file({}, b""))
    write("fuzz_safetensors_header", "scalar_zero", safetensors_file(
        {"s": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
         "z": {"dtype": "U8", "shape": [0, 3], "data_offsets": [8, 8]}}, struct.pack("<q", 7), pad=False))

    small_bpe = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "\u0120": 3},
                           "merges": ["a b"], "unk_token": None},
                 "normalizer": {"type": "NFC"},
                 "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                     {"type": "Split", "pattern": {"Regex": t.QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
                     {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
                 "decoder": {"type": "ByteLevel"},
                 "added_tokens": [{"id": 4, "content": "<|im_start|>", "special": True, "normalized": False,
                                   "lstrip": False, "rstrip": True, "single_word": False}]}
    write("fuzz_tokenizer_load", "small_bpe", json.dumps(small_bpe).encode())
    word = {"model": {"type": "WordLevel", "vocab": {"hi": 0, "<unk>": 1}, "unk_token": "<unk>"},
            "pre_tokenizer": {"type": "Whitespace"}, "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
            "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<unk>", "type_id": 0}},
                                                                       {"Sequence": {"id": "A", "type_id": 0}}],
                               "special_tokens": {"<unk>": {"id": "<unk>", "ids": [1], "tokens": ["<unk>"]}}}}
    write("fuzz_tokenizer_load", "word_level", json.dumps(word).encode())
    fallback = {"model": {"type": "BPE", "vocab": {"<0x41>": 0, "<unk>": 1, "b": 2, "##b": 3, "b##b": 4},
                          "merges": [["b", "##b"]], "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True,
                          "continuing_subword_prefix": "##", "ignore_merges": True},
                "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext", "invert": True}}
    write("fuzz_tokenizer_load", "fallback", json.dumps(fallback).encode())


if __name__ == "__main__":
    main()
