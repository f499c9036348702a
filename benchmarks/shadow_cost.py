"""What the sink shadows (docs/architecture.md §4, option 4) cost inside a batch-16 decode step: the
native op (shadow_op.cpp, shipped), the stock-op path it replaced (the fallback without a
compiler), and a step without shadows — the floor any shadow write can reach.

A diagnostic, not a result users get: variant "none" skips the shadows, so its attention is WRONG
on purpose; only its step time means anything. One stock engine (default compiled mode) and one
streamsink engine (4+1020, past C) in this process; every streamsink step (variant by turn)
follows a stock step, as in decode_latency.py.

    .venv/bin/python benchmarks/shadow_cost.py [--batch 16] [--steps 24]
"""
from __future__ import annotations

import argparse
import statistics
import time

import common
from decode_latency import start_decoding, timed_step

VARIANTS = {
    "native": "the shipped path: one native loop a step, every layer (gather, rotate, write)",
    "stock-ops": "the fallback: gather of every element, vLLM's rotary op, vLLM's cache write",
    "none": "no shadows at all (wrong attention): the step's floor",
}


def install_variants(state: dict) -> None:
    from streamsink import attention

    shipped = attention.StreamsinkAttentionImpl._write_shadows

    def timed(self, layer, kv_cache, shadows):
        t = time.perf_counter()
        variant = state["variant"]
        if variant == "native":
            assert self.native_shadows is not None, "the native shadow op is not loaded"
            shipped(self, layer, kv_cache, shadows)
        elif variant == "stock-ops":
            native, self.native_shadows = self.native_shadows, None
            shipped(self, layer, kv_cache, shadows)
            self.native_shadows = native
        state["shadow_seconds"] += time.perf_counter() - t

    attention.StreamsinkAttentionImpl._write_shadows = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24, help="steps per variant")
    args = parser.parse_args()
    state = {"variant": "native", "shadow_seconds": 0.0}
    install_variants(state)
    from streamsink.serving.engine import make_llm

    kwargs = dict(in_process=True, max_num_seqs=args.batch, enable_prefix_caching=False)
    stock = make_llm(args.model, streamsink=None, max_model_len=1024 + 2048, **kwargs)
    streaming = make_llm(args.model, streamsink={"sink_tokens": 4, "window_tokens": 1020},
                         **kwargs)
    total = args.steps * len(VARIANTS)
    for tag, llm, context in (("stock", stock, 1024 - total // 2), ("ss", streaming, 1224)):
        prompts = [[(7 * i + 13 * j) % 5000 + 100 for j in range(context)]
                   for i in range(args.batch)]
        start_decoding(llm, prompts, total + 8, tag)
    stock_times, times = [], {v: [] for v in VARIANTS}
    shadow = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for variant in VARIANTS:
            stock_times.append(timed_step(stock))
            state.update(variant=variant, shadow_seconds=0.0)
            times[variant].append(timed_step(streaming))
            shadow[variant].append(state["shadow_seconds"])
    stock_step = statistics.median(stock_times)
    print(f"stock batch {args.batch}: {1000 * stock_step:.1f} ms/step")
    rows = []
    for variant, what in VARIANTS.items():
        step = statistics.median(times[variant])
        rows.append({"variant": variant, "what": what, "median_ms_per_step": 1000 * step,
                     "ratio_over_stock": step / stock_step,
                     "median_shadow_ms_per_step": 1000 * statistics.median(shadow[variant]),
                     "step_seconds": times[variant], "shadow_seconds": shadow[variant]})
        print(f"{variant:>10}: {1000 * step:.1f} ms/step, {step / stock_step:.3f}x stock, "
              f"shadows {rows[-1]['median_shadow_ms_per_step']:.2f} ms", flush=True)
    path = common.save("shadow_cost", {
        "batch": args.batch, "steps_per_variant": args.steps, "cache_tokens": 1024,
        "stock_median_ms_per_step": 1000 * stock_step, "variants": rows,
        "stock_step_seconds": stock_times,
        "method": "one stock (compiled) and one streamsink (compiled, 4+1020 past C) engine in "
                  "one process, steps alternating; variant 'none' computes wrong attention "
                  "on purpose (timing only)"}, args)
    print("wrote", path)


if __name__ == "__main__":
    main()
