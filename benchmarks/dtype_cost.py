"""What bf16 costs, and what streaming costs in each dtype: warm prompt log-probabilities of the
same tokens (a book) on four in-process engines — stock fp32, streamsink fp32, stock bf16,
streamsink bf16 — in rounds that run each engine once (so machine noise falls on all alike);
the medians and their ratios are the result. Also how far each engine's NLLs are from the
fp32 engine of the same method (bf16's rounding, measured).

    .venv/bin/python benchmarks/dtype_cost.py [--quick] [--tokens N] [--rounds R]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--text", default=os.path.join(common.SHARED_DATA, "katrine-14263.txt"))
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 tokens, 1 round")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from streamsink.model_store import resolve_model
    from streamsink.serving.engine import make_llm
    from streamsink.serving.ppl import load_token_ids, streaming_nlls

    tokens, rounds = (300, 1) if args.quick else (args.tokens, args.rounds)
    model = resolve_model(args.model)
    ids = load_token_ids(args.text, AutoTokenizer.from_pretrained(model), 0, tokens)
    streaming = {"sink_tokens": args.sink, "window_tokens": args.window}
    engines = {}
    for dtype in ("float32", "bfloat16"):
        for method, cfg in (("stock", None), ("streamsink", streaming)):
            engines[f"{method}_{dtype}"] = make_llm(
                model, streamsink=cfg, in_process=True, dtype=dtype, max_num_seqs=1,
                max_num_batched_tokens=2048, enable_prefix_caching=False,
                **({} if cfg else {"max_model_len": 8192}))
    nlls = {name: streaming_nlls(llm, ids, progress=False) for name, llm in engines.items()}
    times = {name: [] for name in engines}
    for _ in range(rounds):
        for name, llm in engines.items():
            start = time.perf_counter()
            streaming_nlls(llm, ids, progress=False)
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    for name, sec in seconds.items():
        print(f"{name:>20}: {sec:6.2f} s", flush=True)
    ratios = {"streamsink_over_stock_float32": seconds["streamsink_float32"]
              / seconds["stock_float32"],
              "streamsink_over_stock_bfloat16": seconds["streamsink_bfloat16"]
              / seconds["stock_bfloat16"],
              "stock_bfloat16_over_float32": seconds["stock_bfloat16"] / seconds["stock_float32"]}
    drift = {method: max(abs(a - b) for a, b in zip(nlls[f"{method}_float32"],
                                                     nlls[f"{method}_bfloat16"]))
             for method in ("stock", "streamsink")}
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    print(f"max |NLL bf16 - NLL fp32|: stock {drift['stock']:.4f}, "
          f"streamsink {drift['streamsink']:.4f}")
    engines.clear()
    gc.collect()
    path = common.save("dtype_cost" + ("_quick" if args.quick else ""), {
        "tokens": len(ids), "sink_tokens": args.sink, "window_tokens": args.window,
        "rounds": rounds, "median_seconds": seconds, "seconds_by_round": times,
        "ratios": ratios,
        "max_abs_nll_bf16_vs_fp32": drift,
        "cpu_bf16": {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                     "amx": torch.cpu._is_amx_tile_supported(),
                     "avx512": torch.cpu._is_avx512_supported()},
        "method": "prompt log-probabilities, warm, engines in rounds (vLLM default mode)",
        "nlls": nlls}, args)
    print("wrote", path)


if __name__ == "__main__":
    main()
