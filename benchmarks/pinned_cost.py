"""What pinning P tokens costs a decode step, two ways, P = 0, 64, 512, 2,048 (window 1,020):

- "shadows": an engine whose S is P. Its decodes past C run vLLM's kernel over one contiguous run
  of C = P + W keys after writing the P sinks' shadows (re-rotated copies) into the slots the
  window left: P copies per layer per step.
- "pinned": one engine (4 + 1,020, max_pinned_tokens 2,048) and requests that ask
  {"streamsink": {"pin_tokens": P}}: their decodes attend the W window keys (PyTorch's fused
  attention) and the P pinned keys as a separate range, stored once where they were written,
  merged by log-sum-exp: no copies.
Both compute the same attention (tests/test_pinned_prefix.py checks the pinned path against the
reference). For each P the two engines decode `--batch` streams past C, one timed step of each
in turn, in one process. Both run eager: the attention, where the two differ, runs outside
torch.compile's graph either way, and five compiled engines would spend most of the run
compiling.

    .venv/bin/python benchmarks/pinned_cost.py [--batch 1] [--steps 40] [--pins 0,64,512,2048]
"""
from __future__ import annotations

import argparse
import gc
import statistics

import common
from decode_latency import finish, start_decoding, timed_step

WINDOW = 1020
BLOCK = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per engine and P")
    parser.add_argument("--pins", default="0,64,512,2048")
    parser.add_argument("--quick", action="store_true", help="smoke run: P 0 and 64, 6 steps")
    args = parser.parse_args()
    pins = [0, 64] if args.quick else [int(p) for p in args.pins.split(",")]
    steps = 6 if args.quick else args.steps
    from streamsink.serving.engine import make_llm

    common_kwargs = dict(in_process=True, max_num_seqs=max(args.batch, 2), enforce_eager=True,
                         enable_prefix_caching=False, kv_cache_memory_bytes=3 << 30)
    pinned_engine = make_llm(args.model, streamsink={
        "sink_tokens": 4, "window_tokens": WINDOW, "max_pinned_tokens": max(pins + [4])},
        **common_kwargs)
    rows = []
    for pin in pins:
        shadow_engine = make_llm(args.model, streamsink={"sink_tokens": pin,
                                                         "window_tokens": WINDOW},
                                 **common_kwargs)
        # Past C and past the first shadow slots, whatever P: P + W + 2 blocks of history.
        length = pin + WINDOW + 2 * BLOCK
        prompts = [[(7 * i + 13 * j) % 5000 + 100 for j in range(length)]
                   for i in range(args.batch)]
        start_decoding(shadow_engine, prompts, 2 * steps, f"s{pin}-")
        start_decoding(pinned_engine, prompts, 2 * steps, f"p{pin}-", {"pin_tokens": pin})
        shadow_times, pinned_times = [], []
        for _ in range(steps):
            shadow_times.append(timed_step(shadow_engine))
            pinned_times.append(timed_step(pinned_engine))
        row = {"pinned_tokens": pin, "cache_tokens": pin + WINDOW,
               "shadows_ms_per_step": 1000 * statistics.median(shadow_times),
               "pinned_ms_per_step": 1000 * statistics.median(pinned_times),
               "shadow_step_seconds": shadow_times, "pinned_step_seconds": pinned_times}
        row["pinned_over_shadows"] = row["pinned_ms_per_step"] / row["shadows_ms_per_step"]
        rows.append(row)
        print(f"P={pin:>5}: shadows {row['shadows_ms_per_step']:.1f} ms/step, pinned "
              f"{row['pinned_ms_per_step']:.1f} ms/step ({row['pinned_over_shadows']:.3f}x)",
              flush=True)
        finish(shadow_engine)
        finish(pinned_engine)
        del shadow_engine
        gc.collect()
    cheaper = [r["pinned_tokens"] for r in rows if r["pinned_over_shadows"] < 1]
    path = common.save("pinned_cost", {
        "batch": args.batch, "steps": steps, "window_tokens": WINDOW, "rows": rows,
        "pinned_cheaper_from": min(cheaper) if cheaper else None,
        "method": "per P: an engine with S = P (kernel + P shadows a step) and one engine with "
                  "4 + 1020 serving requests that pin P tokens (window by PyTorch's fused "
                  "attention, pinned range merged by log-sum-exp), both eager, in one "
                  "process, timed steps alternating; median ms per decode step past C"}, args)
    print("wrote", path)


if __name__ == "__main__":
    main()
