"""KV blocks held and process memory against stream length: streamsink over a long stream,
stock vLLM on the same engine settings until it reaches its limit (max_model_len / pool).

    .venv/bin/python benchmarks/memory.py [--quick] [--tokens N] [--model M]
Writes benchmarks/results/memory[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import gc
import os

import common

CHUNK = 2048  # prefill chunk (max_num_batched_tokens) of both engines

def stream(llm, tokens: int, label: str, every: int) -> list[dict]:
    """Feed one prompt of `tokens` tokens (chunked prefill) and 64 decode tokens; sample blocks
    held and RSS after each step."""
    import psutil
    from tqdm import tqdm
    from vllm import SamplingParams

    from streamsink.serving.engine import scheduler_of

    engine = llm.llm_engine
    prompt = [(37 * j) % 5000 + 100 for j in range(tokens)]
    engine.add_request(label, {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=64, ignore_eos=True, detokenize=False))
    scheduler = scheduler_of(llm)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    process = psutil.Process(os.getpid())
    samples, last = [], -every
    bar = tqdm(total=tokens + 64, unit="tok", desc=label)
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
            samples.append({"tokens": done, "blocks_held": held,
                            "rss_mib": process.memory_info().rss / 2**20})
    bar.close()
    return samples


def plot(results: dict, path: str) -> None:
    fig, (ax1, ax2) = common.figure(2, size=(11, 4))
    for label, rows in results.items():
        xs = [r["tokens"] for r in rows]
        ax1.plot(xs, [r["blocks_held"] for r in rows], label=label)
        ax2.plot(xs, [r["rss_mib"] for r in rows], label=label)
    from matplotlib.ticker import FuncFormatter

    thousands = FuncFormatter(lambda x, _: f"{x / 1000:g}k")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(thousands)
    ax1.set(xlabel="tokens in the stream", ylabel="KV blocks held", title="KV cache")
    ax2.set(xlabel="tokens in the stream", ylabel="process RSS (MiB)", title="process memory")
    common.save_figure(fig, [ax1, ax2], path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="12,000 tokens")
    args = parser.parse_args()
    from streamsink.serving.engine import make_llm

    tokens = 12_000 if args.quick else args.tokens
    every = max(tokens // 200, 128)
    results = {}
    for label, streamsink, max_len in (("streamsink 4+1020", {}, tokens + 128),
                                       ("stock vLLM", None, None)):
        kwargs = dict(in_process=True, enforce_eager=True, max_num_seqs=1,
                      max_num_batched_tokens=CHUNK, enable_prefix_caching=False)
        if max_len:
            kwargs["max_model_len"] = max_len
        llm = make_llm(args.model, streamsink=streamsink, **kwargs)
        limit = llm.llm_engine.model_config.max_model_len
        # Stock can only hold what max_model_len allows: stream up to its limit.
        results[label] = stream(llm, min(tokens, limit - 64), label, every)
        del llm
        gc.collect()
    name = "memory" + ("_quick" if args.quick else "")
    png = os.path.join(common.RESULTS, name + ".png")
    plot(results, png)
    summary = {label: {"max_tokens": rows[-1]["tokens"],
                       "peak_blocks_held": max(r["blocks_held"] for r in rows),
                       "rss_first_mib": rows[0]["rss_mib"], "rss_last_mib": rows[-1]["rss_mib"]}
               for label, rows in results.items()}
    for label, row in summary.items():
        print(f"{label}: {row}")
    print("wrote", common.save(name, {"chunk_tokens": CHUNK, "summary": summary,
                                      "samples": results}), png)


if __name__ == "__main__":
    main()
