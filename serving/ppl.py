"""`streamsink ppl`: the paper's streaming perplexity of a text, through chunked prefill.

ids = tokenizer(text)["input_ids"][offset:offset+max_tokens]; every NLL(ids[t+1] | ids[<=t]) comes
from the engine's prompt log-probabilities, computed with the streaming semantics (S sinks + W
window, in-cache positions) in large prefill chunks rather than one token at a time.
"""
from __future__ import annotations

import argparse
import math
import sys

from streamsink.config import parse_config
from streamsink.errors import UsageError
from streamsink.serving.engine import make_llm, scheduler_of
from streamsink.serving.engine_args import choose_model


def load_token_ids(text_path: str, tokenizer, offset: int, max_tokens: int | None) -> list[int]:
    try:
        with open(text_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"--text {text_path}: {exc.strerror}") from None
    ids = tokenizer(text)["input_ids"]
    ids = ids[offset:] if max_tokens is None else ids[offset:offset + max_tokens]
    if len(ids) < 2:
        raise UsageError(f"--text {text_path}: fewer than 2 tokens after --offset {offset}")
    return ids


def streaming_nlls(llm, ids: list[int], progress: bool = True) -> list[float]:
    """NLL of ids[1:] under the engine, with a progress bar over the prefill."""
    from tqdm import tqdm
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    engine.add_request("ppl", {"prompt_token_ids": ids}, params)
    scheduler = scheduler_of(llm)
    bar = tqdm(total=len(ids), unit="tok", desc="prefill", disable=not progress,
               file=sys.stderr)
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = out
        done = max((r.num_computed_tokens for r in scheduler.requests.values()),
                   default=len(ids))
        bar.update(max(0, done - bar.n))
    bar.update(len(ids) - bar.n)
    bar.close()
    logprobs = result.prompt_logprobs
    return [-logprobs[t][ids[t]].logprob for t in range(1, len(ids))]


def run(args: argparse.Namespace) -> int:
    if args.offset < 0 or (args.max_tokens is not None and args.max_tokens < 2):
        raise UsageError("--offset must be >= 0 and --max-tokens >= 2")
    cfg = parse_config({"sink_tokens": args.sink, "window_tokens": args.window})
    from transformers import AutoTokenizer

    choice = choose_model(args.model, args.weights)
    model = choice.path
    ids = load_token_ids(args.text, AutoTokenizer.from_pretrained(model), args.offset,
                         args.max_tokens)
    if cfg.window_tokens > len(ids):
        # A window wider than the text never evicts anything (dense): the narrower window is
        # the same computation and keeps the engine's rows and KV admission small.
        cfg = parse_config({"sink_tokens": cfg.sink_tokens, "window_tokens": len(ids)})
    llm = make_llm(model, streamsink=cfg.as_dict(), in_process=True, enforce_eager=True,
                   dtype=choice.dtype, max_num_batched_tokens=args.chunk, max_num_seqs=1)
    nlls = streaming_nlls(llm, ids)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(f"{v:.8f}\n" for v in nlls)
    mean = sum(nlls) / len(nlls)
    print(f"ppl={math.exp(mean):.6f} tokens={len(nlls)}")
    return 0
