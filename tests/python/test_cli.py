"""The command lines (``python -m mage_ext.generate``, ``python -m mage_ext.eval``) and what a new
user meets first (issue 17): one-line errors with their exit status, validated values, defaults
in --help, streaming, chat templates, the eval's output paths, tokenizer and layout warnings,
the build's CUDA decision and the needle demo."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import mage_ext
from mage_ext import cli, cli_common
from mage_ext.core.policy import METHODS
from mage_ext.eval import tasks, vocab
from test_checkpoint import write_checkpoint
from tiny_models import VOCAB, one_thread  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "mage_ext", "assets", "tiny_bd")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Fast-dLLM-style checkpoint (block 8) with a word-level tokenizer."""
    d = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(str(d), config_extra={"bd_size": 8})
    return str(d)


@pytest.fixture(scope="module")
def tiny():
    return mage_ext.load_model(TINY)


def _run(main, argv, capsys):
    """(exit status, stdout, stderr) of main(argv)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_line_error(err: str, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


# -- generate: errors and validation ------------------------------------------------------------

@pytest.mark.parametrize("opt,value,word", [
    ("--temperature", "-1", "--temperature"), ("--temperature", "nan", "--temperature"),
    ("--top-p", "0", "--top-p"), ("--top-p", "1.5", "--top-p"), ("--k", "0", "--k"),
    ("--k", "x", "--k"), ("--max-new-tokens", "0", "--max-new-tokens"),
    ("--threshold", "2", "--threshold"), ("--policy", "magic", "--policy"),
    ("--steps", "0", "--steps"), ("--seed", "-3", "--seed"), ("--dtype", "int8", "--dtype"),
    ("--window", "0", "--window"), ("--fixed-steps", "0", "--fixed-steps"),
    ("--dense-layers", "-1", "--dense-layers"), ("--sub-block", "0", "--sub-block"),
    ("--prefill-chunk", "0", "--prefill-chunk")])
def test_generate_bad_option_values_exit_2(capsys, opt, value, word):
    code, out, err = _run(cli.generate_main, ["--model", "x", "--prompt", "p", opt, value], capsys)
    assert code == 2 and out == ""
    _one_line_error(err, word)


@pytest.mark.parametrize("argv,words", [
    (["--ids", "1,2,99999"], ["99999", "vocabulary"]),
    (["--ids", "1,-2"], ["-2", "vocabulary"]),
    (["--ids", "1,a"], ["--ids"]),
    (["--prompt", "w1", "--ids", "1"], ["--prompt", "--ids"]),
    ([], ["--prompt", "--ids"]),
    (["--ids", "1", "--chat"], ["--chat"]),
    (["--prompt", "w1", "--chat"], ["chat template"]),
    (["--prompt", "w1", "--block-size", "6"], ["sub_block"]),
    (["--prompt", "w1", "--style", "sdar", "--steps", "9"], ["steps"]),
    (["--prompt", "w1", "--n-sink", "3", "--n-recent", "3", "--k", "4"], ["n_sink"]),
    (["--prompt", "w1", "--device", "tpu"], ["--device"]),
])
def test_generate_bad_inputs_exit_1_with_one_line(ckpt, capsys, argv, words):
    code, out, err = _run(cli.generate_main, ["--model", ckpt, "--device", "cpu"] + argv, capsys)
    assert code == 1 and out == ""
    _one_line_error(err, *words)


def test_generate_missing_checkpoint_one_line(tmp_path, capsys):
    code, _, err = _run(cli.generate_main, ["--model", str(tmp_path / "no"), "--prompt", "a"],
                        capsys)
    assert code == 1
    _one_line_error(err, "does not exist")


def test_a_closed_pipe_ends_the_command_quietly():
    """`python -m ... | head -1`: the reader leaves early; no error line, no traceback."""
    code = ("from mage_ext.cli_common import run_cli\n"
            "run_cli(lambda argv: [print('row ' * 20) for _ in range(200000)], 'prog', [])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("row ") and proc.stdout.count("\n") == 1
    assert proc.stderr == ""


def test_generate_debug_shows_the_exception(ckpt):
    with pytest.raises(cli_common.CliError, match="vocabulary"):
        cli.generate_main(["--model", ckpt, "--ids", "1,99999", "--debug", "--device", "cpu"])


def test_cuda_device_without_gpu_is_one_line(ckpt, capsys):
    if torch.cuda.is_available() and mage_ext.cuda_kernels_built():
        pytest.skip("a GPU with the CUDA kernels is here")
    code, _, err = _run(cli.generate_main, ["--model", ckpt, "--prompt", "w1", "--device", "cuda"],
                        capsys)
    assert code == 1
    _one_line_error(err, "--device cuda")


# -- generate: help and defaults ----------------------------------------------------------------

def test_generate_help_shows_defaults_and_every_policy(capsys):
    code, out, _ = _run(cli.generate_main, ["--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for m in METHODS:
        assert f"\n  {m} " in out, m   # the policy list in the description names every method
    assert "{" + ",".join(METHODS) + "}" in out
    # the C++ binary's defaults (mage_generate): 256 new tokens, greedy, seed, policy mage k 512
    for want in ["--max-new-tokens N tokens generated at most per prompt (fewer where a stop id "
                 "comes) (default: 256)", "(default: mage)", "(default: 512)",
                 "(sampling temperature (0: greedy) (default: 0.0)", "(default: 1.0)",
                 "seed of the sampling (default: 0)", "auto: bfloat16 on CUDA, float32 on the CPU",
                 "--fixed-steps", "--window", "--chat", "--seed", "(default: 0.9)",
                 "(default: low_confidence_static)", "(default: sparse)"]:
        assert want.lstrip("(") in flat, want


def test_cli_constants_match_generation():
    from mage_ext import generation

    assert cli.STYLES == generation.STYLES and cli.REMASKING == generation.REMASKING


def test_auto_dtype_and_device():
    cpu = torch.device("cpu")
    assert cli_common.resolve_dtype("auto", cpu) == torch.float32
    assert cli_common.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert cli_common.resolve_dtype("float16", cpu) == torch.float16
    want = "cuda" if torch.cuda.is_available() and mage_ext.cuda_kernels_built() else "cpu"
    assert cli_common.resolve_device("auto").type == want


# -- generate: output and streaming -------------------------------------------------------------

def test_streamed_output_equals_the_final_output(ckpt, capsys):
    base = ["--model", ckpt, "--prompt", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11", "--k", "4",
            "--dense-layers", "1", "--max-new-tokens", "21", "--device", "cpu"]
    code, streamed, err = _run(cli.generate_main, base, capsys)
    assert code == 0 and streamed.endswith("\n")
    code, whole, _ = _run(cli.generate_main, base + ["--no-stream"], capsys)
    assert code == 0 and streamed == whole
    assert "KV read" in err and "steps: first" in err and "warning" not in err


def test_batch_prints_each_output_and_ids_in_ids_out(ckpt, capsys):
    code, out, _ = _run(cli.generate_main, ["--model", ckpt, "--ids", "1,2,3", "--ids",
                                            "4,5,6,7,8,9,10,11,12", "--max-new-tokens", "5",
                                            "--device", "cpu"], capsys)
    assert code == 0
    first, second = out.strip().split("\n" + "-" * 40 + "\n")
    lm = mage_ext.load_model(ckpt)
    res = mage_ext.generate(lm, input_ids=[[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]],
                            max_new_tokens=5)
    assert [first, second] == [" ".join(map(str, t)) for t in res.token_ids]


class _Recorder:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass


def test_stream_writes_each_block_in_order_skipping_the_prompt(tiny):
    """Blocks arrive as generate's on_block gives them: [batch, B], the first starting with the
    prompt's remainder; text is written as each block finishes, stop ids end it."""
    out = _Recorder()
    st = cli.Stream(tiny.tokenizer, prompt_rem=3, stop_ids=[0], max_new_tokens=100, out=out)
    w = vocab.ids
    block0 = torch.tensor([w("what is the") + w("sky blue green sun")])
    block1 = torch.tensor([w("warm day") + w("<|endoftext|>") + w("night moon")])
    st.on_block(0, block0)
    assert "".join(out.parts) == "sky blue green sun"
    st.on_block(1, block1)
    assert "".join(out.parts) == "sky blue green sun warm day"
    assert len(out.parts) == 2 and st.done
    st.finish("sky blue green sun warm day")
    assert "".join(out.parts) == "sky blue green sun warm day\n"


def test_stream_caps_at_max_new_tokens_and_streams_ids():
    out = _Recorder()
    st = cli.Stream(None, prompt_rem=0, stop_ids=[], max_new_tokens=5, out=out)
    st.on_block(0, torch.tensor([[7, 8, 9, 10]]))
    assert "".join(out.parts) == "7 8 9 10"
    st.on_block(1, torch.tensor([[11, 12, 13, 14]]))
    st.finish("7 8 9 10 11")
    assert "".join(out.parts) == "7 8 9 10 11\n"


def test_stream_is_written_while_generating(ckpt):
    """on_block writes before the next block is decoded (streaming, not printing at the end)."""
    lm = mage_ext.load_model(ckpt)
    out = _Recorder()
    st = cli.Stream(lm.tokenizer, prompt_rem=3, stop_ids=[], max_new_tokens=30, out=out)
    seen = []

    def on_block(i, ids):
        st.on_block(i, ids)
        seen.append(len(out.parts))
    res = mage_ext.generate(lm, None, ["w1 w2 w3"], stop_ids=[], max_new_tokens=30,
                            on_block=on_block)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[0] >= 1 and seen[-1] > seen[0]
    st.finish(res.texts[0])
    assert "".join(out.parts) == res.texts[0] + "\n"


# -- chat templates -----------------------------------------------------------------------------

def _chatml_tokenizer(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[UNK]", "user", "assistant", "hi", "there"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


def test_chat_template_from_the_checkpoint(tmp_path):
    from mage_ext import chat

    tok = _chatml_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}))
    template, where = chat.find_template(str(tmp_path), tok)
    assert where.endswith("tokenizer_config.json")
    text = chat.render(template, "hi there", chat.special_tokens(str(tmp_path)))
    assert text == "<s>[user] hi there[assistant]"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    template, where = chat.find_template(str(tmp_path), tok)
    assert where.endswith("chat_template.jinja") and chat.render(template, "hi") == "hi!"


def test_chatml_fallback_and_stop_id(tmp_path):
    from mage_ext import chat

    tok = _chatml_tokenizer(tmp_path)
    template, where = chat.find_template(str(tmp_path), tok)
    assert "ChatML" in where
    assert chat.render(template, "hi") == ("<|im_start|>user\nhi<|im_end|>\n"
                                           "<|im_start|>assistant\n")
    assert chat.chat_stop_ids(tok) == [tok.token_to_id("<|im_end|>")]


def test_chat_template_errors_are_value_errors(tmp_path, tiny):
    from mage_ext import chat

    with pytest.raises(ValueError, match="no chat template"):
        chat.find_template(TINY, tiny.tokenizer)
    with pytest.raises(ValueError, match="chat template failed: nope"):
        chat.render("{{ raise_exception('nope') }}", "hi")


# -- tokenizer and layout warnings ---------------------------------------------------------------

def test_unknown_words_are_named(tiny):
    from mage_ext.prompt_checks import unknown_words

    n, total, words = unknown_words(tiny.tokenizer, "Summarise: the pass key is 1234 ! zork")
    assert (n, total) == (4, 9) and words == ["Summarise", "1234", "!", "zork"]


def test_generate_warns_about_unknown_words_and_short_prompts(tiny):
    with pytest.warns(UserWarning) as rec:
        res = mage_ext.generate(tiny, None, ["Summarise the sky : what is the pass key ?"],
                                max_new_tokens=4)
    msgs = [str(w.message) for w in rec]
    unk = [m for m in msgs if "not in the tokenizer's vocabulary" in m]
    assert len(unk) == 1 and "1 of 10 words" in unk[0] and "'Summarise'" in unk[0]
    assert "mage_ext/eval/vocab.py" in unk[0]
    assert any("shorter than one block" in m for m in msgs)
    assert len(res.token_ids[0]) <= 4
    # attributed to the caller of generate, not to mage_ext internals
    assert all(w.filename == __file__ for w in rec)


def test_no_warning_for_an_answerable_prompt(tiny):
    s = tasks.make_sample("passkey", 256, seed=3, depth=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = mage_ext.generate(tiny, None, [vocab.decode(s.prompt)], max_new_tokens=4)
    assert res.token_ids[0][:1] == s.answer


def test_style_the_checkpoint_was_not_trained_for_warns(tiny):
    s = tasks.make_sample("passkey", 128, seed=0, depth=0.5)
    with pytest.warns(UserWarning, match="trained for the 'fast_dllm' style"):
        mage_ext.generate(tiny, input_ids=[s.prompt], style="sdar", max_new_tokens=4)


def test_short_prompt_warning_is_for_the_tiny_model_only(ckpt):
    lm = mage_ext.load_model(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mage_ext.generate(lm, None, ["w1 w2"], max_new_tokens=2)  # a real model answers these


def test_cli_prints_warnings_as_one_line(tiny, capsys):
    code, out, err = _run(cli.generate_main, ["--model", TINY, "--prompt", "zork the pass key",
                                              "--max-new-tokens", "2", "--device", "cpu"], capsys)
    assert code == 0
    lines = err.strip().splitlines()
    assert sum("warning:" in ln for ln in lines) == 2 and "warnings.warn" not in err
    assert all(ln.startswith("python -m mage_ext.generate: warning: generate: ")
               for ln in lines if "warning" in ln)


# -- eval: output paths and validation ----------------------------------------------------------

def test_eval_refuses_to_overwrite_a_committed_result(capsys, monkeypatch):
    committed = "benchmarks/results/eval_tiny.json"
    path = os.path.join(ROOT, committed)
    if not cli_common.committed_files(path):
        pytest.skip("not a git checkout")
    monkeypatch.chdir(ROOT)
    before = open(path, "rb").read()
    from mage_ext.eval.__main__ import main

    code, out, err = _run(main, ["--model", TINY, "--out", committed], capsys)
    assert code == 1 and out == ""
    _one_line_error(err, "committed", "--force")
    code, _, err = _run(main, ["--model", TINY, "--heatmaps", "benchmarks/results/heatmaps"],
                        capsys)
    assert code == 1
    _one_line_error(err, "--heatmaps", "committed")
    assert open(path, "rb").read() == before


def test_refuse_committed_and_force(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("no git")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "a.json").write_text("{}")
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True, env=env)
    with pytest.raises(cli_common.CliError, match="committed"):
        cli_common.refuse_committed(tmp_path / "res" / "a.json", False, "--out")
    with pytest.raises(cli_common.CliError, match="committed"):
        cli_common.refuse_committed(tmp_path / "res", False, "--heatmaps")
    cli_common.refuse_committed(tmp_path / "res" / "a.json", True, "--out")
    cli_common.refuse_committed(tmp_path / "res" / "b.json", False, "--out")   # untracked
    cli_common.refuse_committed(tmp_path / "new" / "b.json", False, "--out")   # new folder


def test_eval_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    from mage_ext.eval.__main__ import main

    monkeypatch.chdir(tmp_path)
    code, out, err = _run(main, ["--model", TINY, "--tasks", "passkey", "--lengths", "128",
                                 "--depths", "0.5", "--samples", "1", "--methods", "exact,mage",
                                 "--ks", "32", "--device", "cpu", "--no-recall"], capsys)
    assert code == 0, err
    files = list((tmp_path / "runs" / "eval").glob("eval-*.json"))
    assert len(files) == 1 and f"wrote runs/eval/{files[0].name}" in out
    data = json.loads(files[0].read_text())
    assert data["dtype"] == "float32" and [r["method"] for r in data["records"]] == ["exact", "mage"]


@pytest.mark.parametrize("argv,code,words", [
    (["--lengths", "abc"], 2, ["--lengths"]), (["--lengths", "0"], 2, ["--lengths"]),
    (["--tasks", "passkey,nope"], 2, ["nope"]), (["--methods", "magic"], 2, ["magic"]),
    (["--depths", "1.5"], 2, ["--depths"]), (["--samples", "0"], 2, ["--samples"]),
    (["--ks", "0"], 2, ["--ks"]), (["--batch-size", "0"], 2, ["--batch-size"]),
    (["--lengths", "100"], 1, ["--lengths", "multiple"]),
])
def test_eval_bad_values(capsys, tmp_path, monkeypatch, argv, code, words):
    from mage_ext.eval.__main__ import main

    monkeypatch.chdir(tmp_path)
    got, out, err = _run(main, ["--model", TINY, "--device", "cpu"] + argv, capsys)
    assert got == code and out == ""
    _one_line_error(err, *words)
    assert not (tmp_path / "runs").exists()


def test_eval_help_shows_defaults(capsys):
    from mage_ext.eval.__main__ import main

    code, out, _ = _run(main, ["--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "(default: 4096,8192,16384)" in flat and "runs/eval/" in flat
    assert "(default: passkey,niah_single)" in flat and "--force" in flat


# -- fresh processes: no warning at start, exit codes -------------------------------------------

def test_generate_subprocess_answers_without_warnings():
    s = tasks.make_sample("passkey", 128, seed=1, depth=0.5)
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "mage_ext.generate",
                        "--model", TINY, "--ids", ",".join(map(str, s.prompt)), "--k", "32",
                        "--max-new-tokens", "8", "--threads", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:1] == [str(s.answer[0])]
    err = r.stderr.strip().splitlines()
    device = "GPU" if torch.cuda.is_available() else "CPU"
    assert len(err) == 1 and "KV read" in err[0] and device in err[0], r.stderr
    bad = subprocess.run([sys.executable, "-m", "mage_ext.eval", "--model", TINY, "--samples",
                          "-1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# -- build and demo -----------------------------------------------------------------------------

@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module (it calls setup() only as __main__), with no MAGE_* switch set."""
    import importlib.util

    for k in [k for k in os.environ if k.startswith("MAGE_")]:
        monkeypatch.delenv(k)
    spec = importlib.util.spec_from_file_location("mage_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_smi(tmp_path, listing: str, rc: int = 0) -> str:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{listing}'\nexit {rc}\n")
    smi.chmod(0o755)
    return str(smi)


def test_setup_gpu_visible(setup_py, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    smi = _fake_smi(tmp_path, "GPU 0: NVIDIA H200 (UUID: x)\\n")
    monkeypatch.setattr(setup_py.shutil, "which", lambda name: smi if name == "nvidia-smi" else None)
    assert setup_py.gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not setup_py.gpu_visible()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    broken = _fake_smi(tmp_path, "NVIDIA-SMI has failed", rc=9)
    monkeypatch.setattr(setup_py.shutil, "which", lambda name: broken if name == "nvidia-smi" else None)
    assert not setup_py.gpu_visible()


def test_setup_builds_cuda_only_when_asked_or_a_gpu_is_visible(setup_py, monkeypatch, capsys):
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("needs a CUDA build of torch and nvcc (else the build is CPU-only anyway)")
    monkeypatch.setattr(setup_py, "gpu_visible", lambda: False)
    assert not setup_py.cuda_wanted()
    assert "no GPU visible; building CPU kernels only" in capsys.readouterr().out
    monkeypatch.setattr(setup_py, "gpu_visible", lambda: True)
    assert setup_py.cuda_wanted()
    monkeypatch.setattr(setup_py, "gpu_visible", lambda: False)
    monkeypatch.setenv("MAGE_CUDA_ARCHS", "9.0a")
    assert setup_py.cuda_wanted()
    monkeypatch.setenv("MAGE_FORCE_CPU", "1")
    assert not setup_py.cuda_wanted()
    monkeypatch.delenv("MAGE_FORCE_CPU")
    monkeypatch.delenv("MAGE_CUDA_ARCHS")
    monkeypatch.setenv("MAGE_REQUIRE_CUDA", "1")  # CI's compile check on a machine without a GPU
    assert setup_py.cuda_wanted()


def test_setup_release_build_drops_debug_info(setup_py, monkeypatch):
    """Python's CFLAGS add -g; -g0 after it halves the CPU-only install time."""
    monkeypatch.setenv("MAGE_FORCE_CPU", "1")
    ext = setup_py.extensions()[0]
    assert ext.extra_compile_args["cxx"][-1] == "-g0"
    monkeypatch.setenv("DEBUG", "1")
    assert "-g0" not in setup_py.extensions()[0].extra_compile_args["cxx"]


def test_needle_demo_runs_and_explains():
    r = subprocess.run([sys.executable, "examples/needle_demo.py", "--length", "256",
                        "--k", "64", "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "answer, exact attention:" in out and "answer, MAGE k=64:" in out
    assert out.count("(correct") == 2 and "same as exact" in out
    for start in ("KV read: MAGE read ", "step time (median): exact ", "note: these times are "
                  "from the CPU"):
        assert sum(ln.startswith(start) for ln in out.splitlines()) == 1, start
    assert "[1/2] exact attention: done" in r.stderr and "total" in r.stderr


def test_generate_passes_prefill_chunk(capsys, monkeypatch):
    """--prefill-chunk reaches generate() (default: DEFAULT_PREFILL_CHUNK), as the binary's."""
    import mage_ext.generation as generation

    seen, real = [], generation.generate

    def spy(*a, **kw):
        seen.append(kw["prefill_chunk"])
        return real(*a, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    ids = ",".join(map(str, range(5, 80)))
    runs = [_run(cli.generate_main, ["--model", TINY, "--ids", ids, "--max-new-tokens", "4",
                                     "--threads", "1", *extra], capsys)
            for extra in ([], ["--prefill-chunk", "32"])]
    from mage_ext.core.loop import DEFAULT_PREFILL_CHUNK
    assert seen == [DEFAULT_PREFILL_CHUNK, 32]
    assert runs[0][0] == runs[1][0] == 0 and runs[0][1] == runs[1][1]
