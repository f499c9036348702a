"""Decode time per token: streamsink (S+W = C, stream well past C) against stock vLLM with C
tokens in context, batch 1 and 16, side by side in one run (issue: speed within 1.10x).

    .venv/bin/python benchmarks/decode_latency.py [--quick] [--model M]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import common  # noqa: F401  (environment first; benchmarks/ is on sys.path as the script dir)


def time_decode(llm, prompts: list[list[int]], steps: int) -> float:
    """Median seconds per decode step once every request has its first token."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    started = set()
    while len(started) < len(prompts):  # prefill (chunked) until everyone decodes
        for out in engine.step():
            if out.outputs[0].token_ids:
                started.add(out.request_id)
    durations = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        durations.append(time.perf_counter() - t)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=int, default=1024, help="attended length C = S + W")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    from streamsink.serving.engine import make_llm

    cache = 256 if args.quick else args.cache
    batches = [1, 4] if args.quick else [1, 16]
    steps = 8 if args.quick else args.steps
    results = []
    for label, streamsink, context in (
            ("stock", None, cache - steps - 8),
            ("streamsink", {"sink_tokens": args.sink, "window_tokens": cache - args.sink},
             cache + 200)):
        llm = make_llm(args.model, streamsink=streamsink, enforce_eager=True,
                       max_model_len=cache + 2048, max_num_seqs=max(batches),
                       enable_prefix_caching=False)
        for batch in batches:
            prompts = [[(7 * i + 13 * j) % 5000 + 100 for j in range(context)]
                       for i in range(batch)]
            sec = time_decode(llm, prompts, steps)
            results.append({"engine": label, "batch": batch, "context": context,
                            "seconds_per_step": sec, "ms_per_token": 1000 * sec / batch})
            print(f"{label:>10} batch {batch:>2}: {1000 * sec:.1f} ms/step", flush=True)
        del llm
        gc.collect()
    ratios = {}
    for batch in batches:
        stock = next(r for r in results if r["engine"] == "stock" and r["batch"] == batch)
        ours = next(r for r in results if r["engine"] == "streamsink" and r["batch"] == batch)
        ratios[f"batch_{batch}"] = ours["seconds_per_step"] / stock["seconds_per_step"]
        print(f"batch {batch}: streamsink / stock = {ratios[f'batch_{batch}']:.3f}")
    path = common.save("decode_latency" + ("_quick" if args.quick else ""),
                       {"cache_tokens": cache, "sink_tokens": args.sink, "steps": steps,
                        "results": results, "ratio_streamsink_over_stock": ratios})
    print("wrote", path)


if __name__ == "__main__":
    main()
