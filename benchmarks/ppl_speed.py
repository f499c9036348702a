"""`streamsink ppl`'s way (chunked prefill, prompt log-probabilities) against a token-at-a-time
pass over the same tokens on the same engine configuration, side by side in one run: time and
perplexity (the target: at least 10x faster, the same perplexity to 1e-4 relative).

    .venv/bin/python benchmarks/ppl_speed.py [--quick] [--tokens N] [--text FILE]
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import time

import common


def run(model: str, ids: list[int], sink: int, window: int, chunk: int) -> tuple[float, list]:
    from streamsink.serving.engine import make_llm
    from streamsink.serving.ppl import streaming_nlls

    # chunk == 1: the scheduler gives the request one token per step, as decoding would.
    llm = make_llm(model, streamsink={"sink_tokens": sink, "window_tokens": window},
                   in_process=True, enforce_eager=True, max_num_seqs=1,
                   max_num_batched_tokens=chunk)
    start = time.perf_counter()
    nlls = streaming_nlls(llm, ids)
    elapsed = time.perf_counter() - start
    del llm
    gc.collect()
    return elapsed, nlls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--text", default=os.path.join(common.SHARED_DATA, "katrine-14263.txt"))
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--quick", action="store_true", help="1,000 tokens, cache 256")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from streamsink.model_store import resolve_model
    from streamsink.serving.ppl import load_token_ids

    tokens, window = (1000, 252) if args.quick else (args.tokens, args.window)
    model = resolve_model(args.model)
    ids = load_token_ids(args.text, AutoTokenizer.from_pretrained(model), 0, tokens)
    rows = {}
    for label, chunk in (("chunked_prefill", 2048), ("token_at_a_time", 1)):
        seconds, nlls = run(model, ids, args.sink, window, chunk)
        ppl = math.exp(sum(nlls) / len(nlls))
        rows[label] = {"seconds": seconds, "ppl": ppl, "tokens": len(nlls), "nlls": nlls}
        print(f"{label:>16}: {seconds:8.1f} s  ppl={ppl:.6f}", flush=True)
    speedup = rows["token_at_a_time"]["seconds"] / rows["chunked_prefill"]["seconds"]
    rel = abs(rows["chunked_prefill"]["ppl"] / rows["token_at_a_time"]["ppl"] - 1)
    print(f"speedup {speedup:.1f}x, perplexity relative difference {rel:.2e}")
    path = common.save("ppl_speed" + ("_quick" if args.quick else ""),
                       {"text": os.path.basename(args.text), "sink_tokens": args.sink,
                        "window_tokens": window, "runs": rows, "speedup": speedup,
                        "ppl_relative_difference": rel}, args)
    print("wrote", path)


if __name__ == "__main__":
    main()
