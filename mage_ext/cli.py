"""The generation command line: ``python -m mage_ext.generate --model DIR --prompt "..."``.

``mage_ext/generate.py`` only calls ``generate_main``; keeping the code here means importing it
(tests do) never rebinds ``mage_ext.generate``, the function, to a module.

Output: with one prompt the text is streamed to stdout block by block as the blocks are
decoded; with several, each text is printed when all are done, separated by a line of dashes.
``--ids`` prompts (token ids, as the C++ binary ``mage_generate`` takes them) print ids, one line
per prompt. Progress (on a terminal) and the step times go to stderr. Errors are one line with
exit status 1 (2 for a bad option); ``--debug`` shows tracebacks. The defaults are those of
``mage_generate``.

Under ``torchrun --nproc-per-node N`` the model runs tensor-parallel over the N processes (one
GPU each, or the CPU with gloo; mage_ext/hf/tensor_parallel.py) and only rank 0 prints.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from mage_ext.cli_common import (DTYPES, CliError, Parser, PrefillProgress, StatusLine,
                                 init_distributed, launch_rank, nonnegative_float,
                                 nonnegative_int, positive_int, probability, resolve_device,
                                 resolve_dtype, run_cli, unit_interval)
from mage_ext.core.loop import DEFAULT_PREFILL_CHUNK
from mage_ext.core.policy import COMMIT_MODES, METHODS

PROG = "python -m mage_ext.generate"
REMASKING = ("low_confidence_static", "low_confidence_dynamic")  # = generation.REMASKING
STYLES = ("fast_dllm", "sdar")                                     # = generation.STYLES
METHOD_HELP = {
    "exact": "dense attention (the reference)",
    "mage": "MAGE: top-k of the block's first step reused by its later steps",
    "quest": "Quest baseline (page min/max scores, selection every step)",
    "tidal": "Tidal baseline (selection layers pick for the layers after them)",
    "sparsed": "SparseD baseline (full steps first, then a pooled block pattern)",
    "window": "control: the last --window cache entries only",
    "random": "matched control of mage: k random entries, drawn at a block's first step",
    "recent": "matched control of mage: the last k entries, from a block's first step on",
}


def build_parser() -> Parser:
    assert set(METHOD_HELP) == set(METHODS), "describe every PolicyConfig method"
    ap = Parser(PROG, "Block-diffusion generation with MAGE or another attention policy.\n\n"
                      "policies:\n" + "\n".join(f"  {m:8} {METHOD_HELP[m]}" for m in METHODS))
    g = ap.add_argument_group("input")
    g.add_argument("--model", metavar="DIR", required=True, help="checkpoint directory (config.json, "
                   "safetensors, tokenizer.json)")
    g.add_argument("--prompt", metavar="TEXT", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--ids", metavar="IDS", action="append", help="prompt as comma-separated token ids, as "
                   "mage_generate takes it (repeat for a batch); output is ids too")
    g.add_argument("--chat", action="store_true", help="wrap each --prompt in the checkpoint's "
                   "chat template (chat_template.jinja or tokenizer_config.json; ChatML for a "
                   "Qwen tokenizer without one) as one user turn (default: the prompt as given)")
    g = ap.add_argument_group("attention policy")
    g.add_argument("--policy", default="mage", choices=METHODS, help="attention policy (above)")
    g.add_argument("--k", metavar="K", type=positive_int, default=512,
                   help="KV budget per layer and KV head at sparse steps")
    g.add_argument("--adaptive", action="store_true",
                   help="per-layer budgets from first-step dispersion, mean --k (default: off)")
    g.add_argument("--dense-layers", metavar="N", type=nonnegative_int, default=2,
                   help="the first N layers always read the whole cache")
    g.add_argument("--n-sink", metavar="N", type=nonnegative_int, default=0,
                   help="first cache positions always kept (count towards --k)")
    g.add_argument("--n-recent", metavar="N", type=nonnegative_int, default=0,
                   help="last cache positions always kept (count towards --k)")
    g.add_argument("--window", metavar="N", type=positive_int, default=32,
                   help="cache entries read by the window policy")
    g.add_argument("--commit-attention", default="sparse", choices=COMMIT_MODES,
                   help="attention of the forward that writes a finished block")
    g = ap.add_argument_group("decoding")
    g.add_argument("--style", choices=STYLES, default=None,
                   help="decoding style (default: the checkpoint's: qwen2 / Fast_dLLM_Qwen -> "
                        "fast_dllm, qwen3 / sdar -> sdar)")
    g.add_argument("--block-size", metavar="B", type=positive_int, default=None,
                   help="block size (default: the checkpoint's bd_size / block_size, else 32 for "
                        "fast_dllm and 4 for sdar)")
    g.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                   help="tokens generated at most per prompt (fewer where a stop id comes)")
    g.add_argument("--sub-block", metavar="N", type=positive_int, default=8, help="fast_dllm: sub-block size")
    g.add_argument("--threshold", metavar="P", type=unit_interval, default=0.9,
                   help="fast_dllm (and sdar dynamic remasking): confidence threshold")
    g.add_argument("--fixed-steps", metavar="N", type=positive_int, default=None,
                   help="fast_dllm: exactly N denoising steps per block instead of the threshold "
                        "rule (default: the threshold rule)")
    g.add_argument("--steps", metavar="N", type=positive_int, default=4, help="sdar: denoising steps per block")
    g.add_argument("--remasking", choices=REMASKING, default="low_confidence_static",
                   help="sdar: which positions each step fills")
    g.add_argument("--temperature", metavar="T", type=nonnegative_float, default=0.0,
                   help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", metavar="P", type=probability, default=1.0, help="nucleus sampling share, (0, 1]")
    g.add_argument("--seed", metavar="N", type=nonnegative_int, default=0, help="seed of the sampling")
    g = ap.add_argument_group("run")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on the CPU)")
    g.add_argument("--device", metavar="DEV", default="auto",
                   help="cpu, cuda or cuda:N (auto: cuda when a GPU and the CUDA kernels are "
                        "there; under torchrun rank r takes cuda:LOCAL_RANK)")
    g.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="CPU threads (default: torch's choice)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run eager forwards on a GPU (default: the forwards of a block replay "
                        "as CUDA graphs where possible)")
    g.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK,
                   metavar="N", help="prompt tokens per prefill forward, rounded down to whole "
                                     f"blocks (default {DEFAULT_PREFILL_CHUNK})")
    g.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print the output when it is complete (default: stream it block by "
                        "block when there is one prompt)")
    return ap


def generate_main(argv: Optional[Sequence[str]] = None) -> None:
    """The command line; errors exit with one line (see mage_ext/cli_common.py)."""
    run_cli(_main, PROG, argv)


def _main(argv) -> None:
    a = build_parser().parse_args(argv)
    if (a.prompt is None) == (a.ids is None):
        raise CliError("give the prompt(s) as --prompt TEXT or as --ids 1,2,3 (not both)")
    if a.ids is not None and a.chat:
        raise CliError("--chat applies to --prompt text, not to --ids")
    ids = None if a.ids is None else [_parse_ids(s) for s in a.ids]

    import torch

    from mage_ext.core.policy import PolicyConfig
    from mage_ext.generation import generate
    from mage_ext.hf.checkpoint import load_model

    device = init_distributed(resolve_device(a.device))
    dtype = resolve_dtype(a.dtype, device)
    main_rank = launch_rank()[0] == 0  # under torchrun only rank 0 prints
    if a.threads:
        torch.set_num_threads(a.threads)
    policy = PolicyConfig(method=a.policy, k=a.k, adaptive=a.adaptive, dense_layers=a.dense_layers,
                          n_sink=a.n_sink, n_recent=a.n_recent, window=a.window,
                          commit_attention=a.commit_attention)
    status = StatusLine(enabled=main_rank)
    status.update(f"loading {a.model} ({str(dtype).removeprefix('torch.')}, {device})", force=True)
    lm = load_model(a.model, dtype=dtype, device=device)
    stop_ids = list(lm.stop_ids)
    prompts = a.prompt
    if a.chat:
        from mage_ext import chat

        template, where = chat.find_template(a.model, lm.tokenizer)
        prompts = [chat.render(template, p, chat.special_tokens(a.model)) for p in prompts]
        stop_ids += [i for i in chat.chat_stop_ids(lm.tokenizer) if i not in stop_ids]
        status.done(f"chat template: {where}")
    if ids is not None:
        _check_ids(ids, lm.model.config.vocab_size)
        seqs = ids
    else:
        from mage_ext.generation import _encode
        seqs = [_encode(lm.tokenizer, p) for p in prompts]
    torch.manual_seed(a.seed)
    block = a.block_size or lm.block_size
    stream = None
    if a.stream and len(seqs) == 1 and main_rank:
        stream = Stream(lm.tokenizer if ids is None else None, len(seqs[0]) % block, stop_ids,
                        a.max_new_tokens, status)
    with PrefillProgress(lm.model, status, max(len(s) for s in seqs), block):
        res = generate(lm, None, prompts if ids is None else None,
                       input_ids=ids, policy=policy, style=a.style, block_size=a.block_size,
                       sub_block=a.sub_block, threshold=a.threshold, steps=a.steps,
                       remasking=a.remasking, fixed_steps=a.fixed_steps,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       top_p=a.top_p, stop_ids=stop_ids, cuda_graphs=a.cuda_graphs,
                       prefill_chunk=a.prefill_chunk,
                       on_block=stream.on_block if stream else None)
    outputs = (res.texts if ids is None else [" ".join(map(str, t)) for t in res.token_ids])
    if stream is not None:
        stream.finish(outputs[0])
    elif main_rank:
        print(("\n" + "-" * 40 + "\n").join(outputs))
    sys.stdout.flush()
    status.done(_summary(res, device))
    _end_distributed()


class Stream:
    """Writes one sequence's output to stdout as its blocks are decoded (``on_block``), text
    decoded incrementally (held back while it ends inside a multi-byte character)."""

    def __init__(self, tokenizer, prompt_rem: int, stop_ids, max_new_tokens: int,
                 status: Optional[StatusLine] = None, out=None):
        self.tok, self.skip, self.stop = tokenizer, prompt_rem, set(stop_ids)
        self.max_new, self.status, self.out = max_new_tokens, status, out or sys.stdout
        self.ids, self.done, self.printed = [], False, ""

    def on_block(self, block: int, ids) -> None:
        """``generate``'s on_block: ``ids`` [batch, B] of the finished block (row 0 is ours; the
        first block starts with the prompt's remainder)."""
        for t in ids[0].tolist()[self.skip if block == 0 else 0:]:
            if self.done:
                break
            if t in self.stop:
                self.done = True
                break
            self.ids.append(t)
            self.done = len(self.ids) >= self.max_new
        self._write(self._render(self.ids))

    def finish(self, final: str) -> None:
        """Completes the output with ``final`` (the whole result) and a newline."""
        if final.startswith(self.printed):
            self._write(final)
        else:  # cannot happen when the block rule above matches the loop's; never lose text
            self.out.write("\n")
            self.printed = ""
            self._write(final)
        self.out.write("\n")
        self.out.flush()

    def _render(self, ids) -> str:
        if self.tok is None:
            return " ".join(map(str, ids))  # "1 2" is a prefix of "1 23": printing stays right
        from mage_ext.generation import _decode

        text = _decode(self.tok, ids)
        return text.rstrip("\ufffd")  # an unfinished UTF-8 sequence: wait for its bytes

    def _write(self, text: str) -> None:
        if not text.startswith(self.printed) or len(text) == len(self.printed):
            return
        if self.status is not None:
            self.status.stop()  # the streamed text is the progress from here on
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def _end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Every rank done before any tears gloo down: a rank that destroyed its group while a
        # peer still used the connection aborted at exit once in CI ("terminate called without
        # an active exception").
        dist.barrier()
        dist.destroy_process_group()


def _parse_ids(text: str) -> list:
    try:
        ids = [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise CliError(f"--ids: expected comma-separated integers, got '{text[:60]}'") from None
    if not ids:
        raise CliError("--ids: no token ids given")
    return ids


def _check_ids(seqs: list, vocab_size: int) -> None:
    for i, s in enumerate(seqs):
        bad = [t for t in s if not 0 <= t < vocab_size]
        if bad:
            raise CliError(f"--ids (prompt {i}): token id(s) {bad[:5]} outside the model's "
                           f"vocabulary (0..{vocab_size - 1})")


def _summary(res, device) -> str:
    first, later = res.median_step_time(True), res.median_step_time(False)
    fmt = lambda t: "n/a" if t is None else f"{t * 1e3:.2f} ms"  # noqa: E731
    where = "CPU" if device.type == "cpu" else "GPU"
    n = sum(len(t) for t in res.token_ids)
    return (f"{n} tokens; denoising steps: first {fmt(first)}, later {fmt(later)} (median, "
            f"{where}); KV read {res.kv_fraction:.3f} of the cache")
