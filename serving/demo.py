"""`streamsink demo`: one long generated stream with a live line of tokens, speed and KV blocks.

The blocks held climb while the stream is shorter than S+W, then stay flat: the KV policy frees
the oldest window block each time a new one fills.
"""
from __future__ import annotations

import argparse
import sys
import time

from streamsink.config import parse_config
from streamsink.errors import UsageError
from streamsink.serving.engine import kv_pool_bytes, make_llm, scheduler_of, streaming_blocks_held


def run(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        raise UsageError("--tokens must be at least 1")
    cfg = parse_config({"sink_tokens": args.sink, "window_tokens": args.window})
    print(f"streamsink demo: {args.tokens} tokens, {cfg.sink_tokens} sinks + "
          f"{cfg.window_tokens}-token window (cache {cfg.cache_tokens}); starting the engine...",
          flush=True)
    llm = make_llm(args.model, streamsink=cfg.as_dict(), in_process=True, enforce_eager=True,
                   weights=args.weights, max_num_seqs=1)
    print(f"streamsink demo: KV pool {kv_pool_bytes(llm) / 2**20:.0f} MiB (sized for one "
          "stream at full window)", flush=True)
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                           tokenize=False, add_generation_prompt=True)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.8, top_p=0.95, seed=0,
                            ignore_eos=True, repetition_penalty=1.1)
    engine = llm.llm_engine
    engine.add_request("demo", prompt, params)
    block_size = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers[0].block_size
    start, peak, text = time.perf_counter(), 0, ""
    n = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n, text = len(out.outputs[0].token_ids), out.outputs[0].text
        if not engine.has_unfinished_requests():
            break  # finished: its blocks are back in the pool; keep the last line as it was
        held = streaming_blocks_held(llm)
        peak = max(peak, held)
        rate = n / max(time.perf_counter() - start, 1e-9)
        tail = text[-48:].replace("\n", " ")
        sys.stdout.write(f"\r{n:>7} tokens | {rate:6.1f} tok/s | KV blocks held {held:>3} "
                         f"({held * block_size} token slots, peak {peak}) | …{tail:<48}")
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    print(f"\n\n{n} tokens in {elapsed:.1f} s ({n / elapsed:.1f} tok/s); KV blocks held peaked at "
          f"{peak} ({peak * block_size} token slots) for a stream of {n} tokens.")
    print("\nLast 400 characters of the stream:\n" + text[-400:])
    return 0
