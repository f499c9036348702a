"""Per-token decode latency against cache size C (paper Fig. 10), three ways on the same vLLM:
- streamsink: S=4 sinks + window C-4, stream past C (each token attends C keys);
- sliding window with re-computation (the paper's baseline): each new token re-prefills the last
  C tokens from scratch (stock engine, prefix caching off);
- stock vLLM with C tokens of history (dense attention, as far as the model's context allows).
Stock and streamsink run as vLLM runs by default on CPU (compiled); at each C their decode steps
alternate (decode_latency.py's method), so machine noise falls on both alike.

    .venv/bin/python benchmarks/latency_vs_cache.py [--quick] [--eager] [--model M]
Writes benchmarks/results/latency_vs_cache[_quick]/<date>-<commit>.json (plot: `make docs`).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import common
from decode_latency import finish, start_decoding, timed_step


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(31 * j + seed) % 5000 + 100 for j in range(n)]


def alternating_decode_ms(engines: dict, contexts: dict, steps: int) -> tuple[dict, dict]:
    """Median ms per decode step of each engine, batch 1, starting at its context, the engines'
    steps alternating; and every step's seconds."""
    times = {name: [] for name in engines}
    for name, llm in engines.items():
        start_decoding(llm, [prompt(contexts[name])], steps, f"d{contexts[name]}-")
    for _ in range(steps):
        for name, llm in engines.items():
            times[name].append(timed_step(llm))
    for llm in engines.values():
        finish(llm)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}, times


def recompute_ms(llm, cache: int, repeats: int) -> tuple[float, list[float]]:
    """Median ms to produce one token by prefilling the last C tokens from scratch; and each
    repeat's seconds."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, detokenize=False)
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt(cache, seed=r + 1)}], params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="C in {256, 512}")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--eager", action="store_true",
                        help="every engine eager (quick start-up for smoke tests)")
    args = parser.parse_args()
    from streamsink.serving.engine import make_llm

    caches = [256, 512] if args.quick else [256, 512, 1024, 2048, 4096]
    steps, repeats = (8, 2) if args.quick else (24, 3)
    base = dict(in_process=True, max_num_seqs=1, enable_prefix_caching=False,
                **({"enforce_eager": True} if args.eager else {}))
    rows = []
    stock = make_llm(args.model, streamsink=None, max_model_len=max(caches) + 64, **base)
    for cache in caches:
        llm = make_llm(args.model, streamsink={"sink_tokens": args.sink,
                                               "window_tokens": cache - args.sink},
                       **base)
        # Stock attends to ~C tokens over the steps; streamsink streams past C (C keys a step).
        ms, step_seconds = alternating_decode_ms(
            {"stock": stock, "streamsink": llm},
            {"stock": cache - steps // 2, "streamsink": cache + 100}, steps)
        recompute, recompute_seconds = recompute_ms(stock, cache, repeats)
        row = {"cache": cache, "stock_dense_ms": ms["stock"], "streamsink_ms": ms["streamsink"],
               "recompute_ms": recompute, "step_seconds": step_seconds,
               "recompute_seconds": recompute_seconds}
        rows.append(row)
        row["speedup_vs_recompute"] = row["recompute_ms"] / row["streamsink_ms"]
        row["ratio_vs_stock_dense"] = row["streamsink_ms"] / row["stock_dense_ms"]
        print(f"C={cache:>5}: streamsink {row['streamsink_ms']:.1f} ms, recompute "
              f"{row['recompute_ms']:.1f} ms ({row['speedup_vs_recompute']:.1f}x), stock dense "
              f"{row['stock_dense_ms']:.1f} ms", flush=True)
        del llm
        gc.collect()
    name = "latency_vs_cache" + ("_quick" if args.quick else "")
    mode = "eager (--eager)" if args.eager else "vLLM's default (compiled)"
    print("wrote", common.save(name, {"sink_tokens": args.sink, "rows": rows,
                                      "method": "batch 1; stock and streamsink decode steps "
                                                f"alternating at each C; every engine {mode}"},
                               args))


if __name__ == "__main__":
    main()
