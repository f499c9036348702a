"""Decode time per step: streamsink (S+W = C, stream well past C) against stock vLLM with about C
tokens in context, batch 1 and 16 (target: within 1.03x of stock as it runs by default).

Stock runs as users run it (vLLM's default CPU compilation: torch.compile + inductor), and also
with --enforce-eager for reference; streamsink runs in the same default mode. All engines live in
this process and their decode steps alternate (stock, stock-eager, streamsink, stock, ...), so
machine noise falls on all alike; the ratio of the medians is the result.

    .venv/bin/python benchmarks/decode_latency.py [--quick] [--model M]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import common


def start_decoding(llm, prompts: list[list[int]], steps: int, tag: str,
                   options: dict | None = None) -> None:
    """Queue the prompts and run prefill until every request has its first token. options: a
    request's streamsink options (request_options.py)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, detokenize=False,
                            extra_args={"streamsink": options} if options else None)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", {"prompt_token_ids": p}, params)
    started = set()
    while len(started) < len(prompts):
        for out in engine.step():
            if out.outputs[0].token_ids:
                started.add(out.request_id)


def timed_step(llm) -> float:
    t = time.perf_counter()
    llm.llm_engine.step()
    return time.perf_counter() - t


def finish(llm) -> None:
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="cache 256, batches 1 and 4")
    parser.add_argument("--cache", type=int, default=1024, help="attended length C = S + W")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the measurement in this process (same engines); the ratios "
                             "reported are the medians of the rounds' ratios")
    parser.add_argument("--eager", action="store_true",
                        help="every engine eager (quick start-up for smoke tests; the published "
                             "numbers are measured in the default compiled mode)")
    args = parser.parse_args()
    from streamsink.serving.engine import make_llm

    cache = 256 if args.quick else args.cache
    batches = [1, 4] if args.quick else [1, 16]
    steps = 8 if args.quick else args.steps
    common_kwargs = dict(in_process=True, max_num_seqs=max(batches), enable_prefix_caching=False,
                         **({"enforce_eager": True} if args.eager else {}))
    engines = {
        "stock": make_llm(args.model, streamsink=None, max_model_len=cache + 2048,
                          **common_kwargs),
        "stock_eager": make_llm(args.model, streamsink=None, max_model_len=cache + 2048,
                                **{**common_kwargs, "enforce_eager": True}),
        "streamsink": make_llm(args.model, streamsink={"sink_tokens": args.sink,
                                                       "window_tokens": cache - args.sink},
                               **common_kwargs),
    }
    # Stock attends to its whole context: start it so that it decodes at ~C tokens. Streamsink
    # starts past C, so every step attends exactly C keys (sinks + window).
    contexts = {"stock": cache - steps // 2, "stock_eager": cache - steps // 2,
                "streamsink": cache + 200}
    results, by_round, eager_by_round = [], {}, {}
    for round_ in range(args.rounds):
        for batch in batches:
            times = {name: [] for name in engines}
            for name, llm in engines.items():
                prompts = [[(7 * i + 13 * j) % 5000 + 100 for j in range(contexts[name])]
                           for i in range(batch)]
                start_decoding(llm, prompts, steps, f"r{round_}b{batch}-")
            for _ in range(steps):
                for name, llm in engines.items():
                    times[name].append(timed_step(llm))
            medians = {}
            for name, llm in engines.items():
                finish(llm)
                medians[name] = sec = statistics.median(times[name])
                results.append({"engine": name, "batch": batch, "round": round_,
                                "context_at_start": contexts[name],
                                "median_seconds_per_step": sec, "ms_per_token": 1000 * sec / batch,
                                "step_seconds": times[name]})
                print(f"{name:>10} batch {batch:>2}: {1000 * sec:.1f} ms/step", flush=True)
            key = f"batch_{batch}"
            by_round.setdefault(key, []).append(medians["streamsink"] / medians["stock"])
            eager_by_round.setdefault(key, []).append(medians["stock_eager"] / medians["stock"])
            print(f"round {round_} batch {batch}: streamsink / stock = {by_round[key][-1]:.3f}; "
                  f"stock eager / stock = {eager_by_round[key][-1]:.3f}", flush=True)
    # One round is one alternating measurement; with several, the ratio is their median.
    ratios = {k: statistics.median(v) for k, v in by_round.items()}
    eager_ratios = {k: statistics.median(v) for k, v in eager_by_round.items()}
    print("streamsink / stock:", {k: round(v, 3) for k, v in ratios.items()}, flush=True)
    for llm in engines.values():
        del llm
    gc.collect()
    from streamsink import shadow_op

    # STREAMSINK_NATIVE_SHADOWS=0 measures the stock-op fallback; its file is kept apart.
    native = shadow_op.loaded()
    path = common.save("decode_latency" + ("_quick" if args.quick else "")
                       + ("" if native else "_stock_op_shadows"),
                       {"cache_tokens": cache, "sink_tokens": args.sink, "steps": steps,
                        "sink_shadows": "native op" if native else "stock ops",
                        # the model's layer count: one call a step writes every layer's shadows
                        "shadow_layers_per_call": shadow_op.layers_per_call(),
                        "method": "alternating decode steps of three in-process engines; stock "
                                  "and streamsink in " + ("eager mode (--eager)" if args.eager
                                                          else "vLLM's default (compiled) mode"),
                        "rounds": args.rounds, "results": results,
                        "ratio_streamsink_over_stock": ratios,
                        "ratio_streamsink_over_stock_by_round": by_round,
                        "ratio_stock_eager_over_stock": eager_ratios}, args)
    print("wrote", path)


if __name__ == "__main__":
    main()
