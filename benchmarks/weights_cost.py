"""What each weight format of the default model (--weights: fp32, bf16, q8, q4) costs and buys,
streaming 4+1020, all in one run on this CPU:

- decode: time per step with 1, 8, 32 and 64 streams, every stream past C (each step attends
  S + W keys: the sinks and a full window, vLLM's kernel with sink shadows). The four engines live
  in this process and their steps alternate (fp32, bf16, q8, q4, fp32, ...), so machine noise
  falls on all alike; ratios are of medians.
- prefill: prompt log-probabilities of one 2,048-token prompt, warm, in rounds.
- quality: perplexity of 4,096 tokens of each book in ../shared/data (none of them was used to
  choose any quantization parameter: the recipes are data-free).
- memory: the engine's KV bytes per token and per stream (the per-stream block bound).

The default of `--weights auto` on this kind of CPU is the fastest format whose perplexity stays
within 1% of fp32's on both texts (weights.AUTO_BY_CPU; docs/weights.md renders the run).

    .venv/bin/python benchmarks/weights_cost.py [--quick]
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time

import common
from decode_latency import finish, start_decoding, timed_step

FORMATS = ("fp32", "bf16", "q8", "q4")
TEXTS = ("katrine-14263.txt", "log-school-house-14881.txt")
WARMUP_STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: C 256, batches 1 and 4, 8 steps, 600-token texts")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="prefill rounds")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    args = parser.parse_args()
    if args.quick:
        args.window, args.batches, args.steps = 252, [1, 4], 8
        args.prefill_tokens, args.ppl_tokens, args.rounds = 600, 600, 1
    from transformers import AutoTokenizer

    from streamsink.kv_budget import block_bytes
    from streamsink.serving.engine import make_llm
    from streamsink.serving.engine_args import BLOCK_SIZE, choose_model
    from streamsink.serving.ppl import load_token_ids, streaming_nlls
    from streamsink.stream_rule import StreamShape, max_blocks_held
    from streamsink.weights import cpu_has_native_bf16

    cache = args.sink + args.window
    streaming = {"sink_tokens": args.sink, "window_tokens": args.window}
    choices = {name: choose_model(None, name) for name in args.formats}
    engines = {}
    for name, choice in choices.items():
        print(f"starting {name}: {os.path.basename(choice.path)} in {choice.dtype}", flush=True)
        engines[name] = make_llm(None, streamsink=streaming, in_process=True, weights=name,
                                 max_num_seqs=max(args.batches), enable_prefix_caching=False,
                                 max_num_batched_tokens=2048)
    tokenizer = AutoTokenizer.from_pretrained(choices[args.formats[0]].path)

    # -- decode, alternating steps ---------------------------------------------------------------
    decode = []
    for batch in args.batches:
        times = {name: [] for name in engines}
        for name, llm in engines.items():
            prompts = [[(7 * i + 13 * j) % 5000 + 100 for j in range(cache + 200)]
                       for i in range(batch)]
            start_decoding(llm, prompts, args.steps + WARMUP_STEPS, f"b{batch}-")
            for _ in range(WARMUP_STEPS):  # a new batch size may compile on its first steps
                timed_step(llm)
        for _ in range(args.steps):
            for name, llm in engines.items():
                times[name].append(timed_step(llm))
        for name, llm in engines.items():
            finish(llm)
            sec = statistics.median(times[name])
            decode.append({"weights": name, "batch": batch, "median_seconds_per_step": sec,
                           "tokens_per_s": batch / sec, "step_seconds": times[name]})
            print(f"decode {name:>4} batch {batch:>2}: {1000 * sec:7.1f} ms/step "
                  f"{batch / sec:7.1f} tokens/s", flush=True)

    # -- prefill, in rounds ------------------------------------------------------------------------
    book = os.path.join(common.SHARED_DATA, TEXTS[0])
    ids = load_token_ids(book, tokenizer, 0, args.prefill_tokens)
    prefill = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, llm in engines.items():
            t = time.perf_counter()
            streaming_nlls(llm, ids, progress=False)
            prefill[name].append(time.perf_counter() - t)
    prefill_s = {name: statistics.median(v) for name, v in prefill.items()}
    for name, sec in prefill_s.items():
        print(f"prefill {name:>4}: {len(ids)} tokens in {sec:.2f} s "
              f"({len(ids) / sec:.0f} tokens/s)", flush=True)

    # -- perplexity ------------------------------------------------------------------------------
    quality = {}
    for text in TEXTS:
        ids = load_token_ids(os.path.join(common.SHARED_DATA, text), tokenizer, 0,
                             args.ppl_tokens)
        for name, llm in engines.items():
            nlls = streaming_nlls(llm, ids, progress=False)
            quality.setdefault(name, {})[text] = {"ppl": math.exp(sum(nlls) / len(nlls)),
                                                  "tokens": len(nlls)}
            print(f"ppl {name:>4} {text}: {quality[name][text]['ppl']:.3f}", flush=True)

    memory = {}
    for name, llm in engines.items():
        config = llm.llm_engine.vllm_config
        model_config = config.model_config
        # The engine's own count (what its pool is sized by), per token.
        per_token = block_bytes(config) // config.cache_config.block_size
        blocks = max_blocks_held(StreamShape(args.sink, args.window), BLOCK_SIZE, 1)
        memory[name] = {"kv_dtype": str(model_config.dtype).removeprefix("torch."),
                        "kv_bytes_per_token": per_token,
                        "blocks_per_decoding_stream": blocks,
                        "kv_bytes_per_stream": blocks * BLOCK_SIZE * per_token}
    del engines
    gc.collect()

    base = {b: next(r["median_seconds_per_step"] for r in decode
                    if r["weights"] == "fp32" and r["batch"] == b) for b in args.batches} \
        if "fp32" in args.formats else None
    ratios = {}
    if base:
        for r in decode:
            ratios.setdefault(r["weights"], {})[f"decode_batch_{r['batch']}"] = \
                r["median_seconds_per_step"] / base[r["batch"]]
        for name, sec in prefill_s.items():
            ratios.setdefault(name, {})["prefill"] = sec / prefill_s["fp32"]
        for name, by_text in quality.items():
            for text, q in by_text.items():
                ratios.setdefault(name, {})[f"ppl_{text}"] = q["ppl"] / quality["fp32"][text]["ppl"]
    path = common.save("weights_cost" + ("_quick" if args.quick else ""), {
        "sink_tokens": args.sink, "window_tokens": args.window,
        "native_bf16": cpu_has_native_bf16(),
        "formats": {name: {"checkpoint": os.path.basename(c.path), "dtype": c.dtype}
                    for name, c in choices.items()},
        "method": "in-process streaming engines (vLLM's default compiled mode); decode steps "
                  "alternate between the engines, every stream past C; prefill is warm prompt "
                  "log-probabilities in rounds; perplexity streams 4+1020",
        "decode": decode, "prefill_tokens": args.prefill_tokens,
        "prefill_seconds": prefill_s, "prefill_seconds_by_round": prefill,
        "perplexity": quality, "memory": memory, "ratios_to_fp32": ratios}, args)
    print("wrote", path)


if __name__ == "__main__":
    main()
