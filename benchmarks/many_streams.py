"""Many concurrent long streams on the same KV memory budget: aggregate generated tokens/s and
per-token latency (p50/p99 of the gaps between a stream's tokens), streamsink against stock vLLM.

Both engines live in this process, both in vLLM's default (compiled) mode, and their steps
alternate; each engine's clock counts only its own steps, so machine noise falls on both alike.

Stock vLLM keeps every stream's whole history, so a fixed pool holds few long streams at once
(the rest wait or are preempted); streamsink holds each stream in a constant number of blocks.

    .venv/bin/python benchmarks/many_streams.py [--quick] [--model M]
Writes benchmarks/results/many_streams[_quick]/<date>-<commit>.json (plot: `make docs`).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import common


class StreamRun:
    """`streams` requests on one in-process engine, stepped from outside so that two engines can
    alternate steps. Time is the engine's own busy time (the sum of its step durations), so the
    other engine's steps between two of ours do not count, and machine noise falls on both."""

    def __init__(self, llm, streams: int, prompt_len: int, new_tokens: int) -> None:
        from vllm import SamplingParams

        self.engine = llm.llm_engine
        self.streams = streams
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        for i in range(streams):
            self.engine.add_request(f"s{streams}-{i}",
                                    {"prompt_token_ids": [(17 * j + 101 * i) % 5000 + 100
                                                          for j in range(prompt_len)]}, params)
        self.clock = 0.0
        self.last_seen: dict[str, tuple[int, float]] = {}
        self.gaps: list[float] = []
        self.generated = 0
        # raw samples: each step's own seconds and the tokens it produced (all streams)
        self.steps: list[tuple[float, int]] = []

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished_requests()

    def step(self) -> None:
        start = time.perf_counter()
        outs = self.engine.step()
        took = time.perf_counter() - start
        self.clock += took
        produced = self.generated
        for out in outs:
            n = len(out.outputs[0].token_ids)
            prev_n, prev_t = self.last_seen.get(out.request_id, (0, None))
            if n > prev_n:
                if prev_t is not None:  # gaps after the first token: inter-token latency
                    self.gaps.extend([(self.clock - prev_t) / (n - prev_n)] * (n - prev_n))
                self.generated += n - prev_n
                self.last_seen[out.request_id] = (n, self.clock)
        self.steps.append((took, self.generated - produced))

    def result(self) -> dict:
        gaps = sorted(self.gaps)
        return {"streams": self.streams, "generated_tokens": self.generated,
                "seconds": self.clock, "tokens_per_second": self.generated / self.clock,
                "itl_p50_ms": 1000 * statistics.median(gaps),
                "itl_p99_ms": 1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
                "step_seconds": [t for t, _ in self.steps],
                "step_tokens": [n for _, n in self.steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="1 and 8 streams, 128 + 256 tokens each, a 256 MiB pool")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--streams", type=int, nargs="+", default=None,
                        help="stream counts to run (default 1 8 32 64; --quick: 1 8)")
    parser.add_argument("--eager", action="store_true",
                        help="both engines eager (quick start-up for smoke tests; the published "
                             "numbers are measured in the default compiled mode)")
    args = parser.parse_args()
    from streamsink.serving.engine import make_llm

    if args.quick:
        # The pool must hold one request's window plus a whole prefill chunk (vLLM's default
        # 4096 tokens for a streaming engine): ~200 MB for SmolLM2.
        counts, prompt_len, new_tokens, pool = [1, 8], 128, 256, 256 << 20
    else:
        counts, prompt_len, new_tokens, pool = [1, 8, 32, 64], 512, 512, 512 << 20
    counts = args.streams or counts
    engines = {}
    for label, streamsink in (("stock", None),
                              ("streamsink", {"sink_tokens": args.sink,
                                              "window_tokens": args.window})):
        # Stock holds each stream's whole history, so it needs max_model_len >= its length;
        # a streaming engine runs past max_model_len (its own default). Both in vLLM's default
        # (compiled) mode, as users run them.
        length = {} if streamsink else {"max_model_len": prompt_len + new_tokens + 64}
        engines[label] = make_llm(args.model, streamsink=streamsink, in_process=True,
                                  max_num_seqs=max(counts), **length,
                                  kv_cache_memory_bytes=pool, enable_prefix_caching=False,
                                  **({"enforce_eager": True} if args.eager else {}))
    rows = []
    for streams in counts:
        runs = {label: StreamRun(llm, streams, prompt_len, new_tokens)
                for label, llm in engines.items()}
        while not all(run.done for run in runs.values()):
            for run in runs.values():  # alternate steps: stock, streamsink, stock, ...
                if not run.done:
                    run.step()
        for label, run in runs.items():
            row = {"engine": label, **run.result()}
            rows.append(row)
            print(f"{label:>10} {streams:>3} streams: {row['tokens_per_second']:7.1f} tok/s, "
                  f"p50 {row['itl_p50_ms']:.0f} ms, p99 {row['itl_p99_ms']:.0f} ms", flush=True)
    engines.clear()
    gc.collect()
    ratios = {}
    for streams in counts:
        stock = next(r for r in rows if r["engine"] == "stock" and r["streams"] == streams)
        ours = next(r for r in rows if r["engine"] == "streamsink" and r["streams"] == streams)
        ratios[str(streams)] = ours["tokens_per_second"] / stock["tokens_per_second"]
    name = "many_streams" + ("_quick" if args.quick else "")
    print("wrote", common.save(name, {
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "kv_pool_bytes": pool,
        "sink_tokens": args.sink, "window_tokens": args.window, "rows": rows,
        "method": "two in-process engines stepping alternately, "
                  + ("eager (--eager)" if args.eager else "vLLM's default compiled mode")
                  + "; time = each engine's own busy time",
        "throughput_ratio_streamsink_over_stock": ratios}, args))


if __name__ == "__main__":
    main()
