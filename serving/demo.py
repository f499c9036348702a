"""`streamsink demo`: a generation on the default model through vLLM with streamsink loaded."""
from __future__ import annotations

import argparse
import time


def run_demo(args: argparse.Namespace) -> int:
    from vllm import SamplingParams

    from streamsink.serving.engine import make_llm

    if args.tokens < 1:
        raise SystemExit("streamsink: error: --tokens must be at least 1")
    llm = make_llm(args.model, streamsink={}, enforce_eager=True)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.8, top_p=0.95, seed=0,
                            ignore_eos=True)
    messages = [{"role": "user", "content": args.prompt}]
    start = time.perf_counter()
    out = llm.chat(messages, params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    n = len(out.outputs[0].token_ids)
    print(out.outputs[0].text)
    print(f"\n[{n} tokens in {elapsed:.1f} s, {n / elapsed:.1f} tokens/s]")
    return 0
