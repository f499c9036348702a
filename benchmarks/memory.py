"""KV blocks held and process memory against stream length: streamsink over a long stream
(past max_model_len), stock vLLM on the same engine settings until it reaches its limit.

    .venv/bin/python benchmarks/memory.py [--quick] [--tokens N] [--text FILE] [--decode N]
                                          [--streaming-only] [--model M]
The prompt is FILE's tokens repeated to N (default: a synthetic token pattern), then --decode
generated tokens. Writes benchmarks/results/memory[_quick|_<N/1000>k]/<date>-<commit>.json
(every sample; `make docs` draws the plot).
"""
from __future__ import annotations

import argparse
import gc
import os

import common

CHUNK = 2048  # prefill chunk (max_num_batched_tokens) of both engines

def prompt_tokens(llm, tokens: int, text_path: str | None) -> list[int]:
    """`tokens` prompt tokens: a text's tokens repeated, or a synthetic pattern."""
    if not text_path:
        return [(37 * j) % 5000 + 100 for j in range(tokens)]
    with open(text_path, encoding="utf-8") as f:
        ids = llm.get_tokenizer()(f.read())["input_ids"]
    return (ids * (tokens // len(ids) + 1))[:tokens]


def stream(llm, prompt: list[int], decode: int, label: str, every: int) -> list[dict]:
    """Feed one prompt (chunked prefill) and `decode` generated tokens; sample blocks held and
    RSS every `every` tokens."""
    import psutil
    from tqdm import tqdm
    from vllm import SamplingParams

    from streamsink.serving.engine import scheduler_of

    engine = llm.llm_engine
    tokens = len(prompt)
    engine.add_request(label, {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=decode, ignore_eos=True, detokenize=False))
    scheduler = scheduler_of(llm)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    process = psutil.Process(os.getpid())
    samples, last = [], -every
    bar = tqdm(total=tokens + decode, unit="tok", desc=label, mininterval=10)
    while engine.has_unfinished_requests():
        engine.step()
        requests = list(scheduler.requests.values())
        if not requests:
            break
        done = requests[0].num_computed_tokens
        bar.update(done - bar.n)
        if done - last >= every:
            last = done
            held = sum(sum(1 for b in blocks if not b.is_null)
                       for m in managers for blocks in m.req_to_blocks.values())
            samples.append({"tokens": done, "blocks_held": held, "seconds": bar.format_dict[
                "elapsed"], "rss_mib": process.memory_info().rss / 2**20})
    bar.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--text", default=None,
                        help="repeat this text's tokens as the prompt (a path, or the name of a "
                             "book in the shared data folder)")
    parser.add_argument("--decode", type=int, default=64, help="generated tokens after it")
    parser.add_argument("--streaming-only", action="store_true", help="skip stock vLLM")
    parser.add_argument("--quick", action="store_true", help="12,000 tokens")
    args = parser.parse_args()
    from streamsink.config import parse_config
    from streamsink.serving.engine import make_llm
    from streamsink.stream_rule import StreamShape, max_blocks_held

    if args.text and not os.path.exists(args.text):
        args.text = os.path.join(common.SHARED_DATA, args.text)
    tokens = 12_000 if args.quick else args.tokens
    every = max(tokens // 200, 128)
    cfg = parse_config({})
    engines = [("streamsink 4+1020", vars(cfg))]
    if not args.streaming_only:
        engines.append(("stock vLLM", None))
    results, info = {}, {}
    for label, streamsink in engines:
        kwargs = dict(in_process=True, enforce_eager=True, max_num_seqs=1,
                      max_num_batched_tokens=CHUNK, enable_prefix_caching=False)
        llm = make_llm(args.model, streamsink=streamsink, **kwargs)
        max_model_len = llm.llm_engine.model_config.max_model_len
        # Stock can only hold what max_model_len allows: stream up to its limit. A streaming
        # engine runs past it.
        n = tokens if streamsink is not None else min(tokens, max_model_len - args.decode)
        results[label] = stream(llm, prompt_tokens(llm, n, args.text), args.decode, label,
                                every)
        info[label] = {"max_model_len": max_model_len, "stream_tokens": n + args.decode}
        del llm
        gc.collect()
    name = "memory" + ("_quick" if args.quick else "" if tokens == 200_000
                       else f"_{tokens // 1000}k")
    bound = max_blocks_held(StreamShape(cfg.sink_tokens, cfg.window_tokens), 128, CHUNK)
    summary = {}
    for label, rows in results.items():
        settled = rows[len(rows) // 10:] or rows  # after the first tenth (start-up effects)
        summary[label] = dict(
            info[label], max_tokens=rows[-1]["tokens"],
            peak_blocks_held=max(r["blocks_held"] for r in rows),
            rss_first_mib=rows[0]["rss_mib"], rss_last_mib=rows[-1]["rss_mib"],
            rss_settled_min_mib=min(r["rss_mib"] for r in settled),
            rss_settled_max_mib=max(r["rss_mib"] for r in settled),
            seconds=rows[-1]["seconds"], tokens_per_second=rows[-1]["tokens"] / max(
                rows[-1]["seconds"], 1e-9))
    for label, row in summary.items():
        print(f"{label}: {row}")
    print("wrote", common.save(name, {"chunk_tokens": CHUNK, "streaming_block_bound": bound,
                                      "text": os.path.basename(args.text or "") or "synthetic",
                                      "summary": summary, "samples": results}, args))


if __name__ == "__main__":
    main()
