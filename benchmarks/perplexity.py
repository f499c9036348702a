"""Streaming perplexity on books (paper Tables 1-2, Fig. 3): S+W variants 0+C, 1+(C-1), 2+(C-2),
4+(C-4), 8+(C-8) against sliding-window re-computation and dense attention, C in {256,512,1024}.

Streaming variants and dense come from prompt log-probabilities through chunked prefill (what
`streamsink ppl` does). Re-computation predicts token t+1 from a fresh prefill of the last C
tokens; it costs C tokens of prefill per evaluated token, so it is evaluated on every
`--stride`-th position past C, and the table's "subset" column gives every method's perplexity
on exactly those positions.

    .venv/bin/python benchmarks/perplexity.py [--quick] [--text FILE ...] [--tokens N]
Writes benchmarks/results/perplexity[_quick]/<date>-<commit>.json with every per-token NLL
(`make docs` draws the running perplexity, paper Fig. 3, from them).
"""
from __future__ import annotations

import argparse
import gc
import glob
import math
import os

import common


def ppl(values: list[float]) -> float:
    return math.exp(sum(values) / len(values))


def recompute_nlls(llm, ids: list[int], cache: int, positions: list[int]) -> list[float]:
    """NLL of ids[t+1] from a fresh prefill of ids[t-C+1 .. t] for each t in positions."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    prompts = [{"prompt_token_ids": ids[t - cache + 1:t + 2]} for t in positions]
    outs = llm.generate(prompts, params, use_tqdm=True)
    return [-o.prompt_logprobs[-1][ids[t + 1]].logprob for o, t in zip(outs, positions)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--text", nargs="*", default=None, help="default: the shared books")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="one book, 600 tokens, C=256, S in {0, 4}, stride 16")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from streamsink.model_store import resolve_model
    from streamsink.serving.engine import make_llm
    from streamsink.serving.ppl import load_token_ids, streaming_nlls

    texts = args.text or sorted(glob.glob(os.path.join(common.SHARED_DATA, "*.txt")))
    if not texts:
        raise SystemExit("no --text given and no books in the shared data folder")
    tokens, caches, sinks = args.tokens, [256, 512, 1024], [0, 1, 2, 4, 8]
    if args.quick:
        texts, tokens, caches, sinks = texts[:1], 600, [256], [0, 4]
    model = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    books = {os.path.basename(t): load_token_ids(t, tokenizer, 0, tokens) for t in texts}
    base = dict(in_process=True, enforce_eager=True, max_num_seqs=8,
                enable_prefix_caching=False)
    nlls: dict[tuple, list[float]] = {}

    stock = make_llm(model, streamsink=None, max_model_len=tokens + 64, **base)
    for book, ids in books.items():
        nlls[(book, "dense")] = streaming_nlls(stock, ids, progress=False)
        for cache in caches:
            positions = list(range(cache - 1, len(ids) - 1, args.stride))
            nlls[(book, "recompute", cache)] = recompute_nlls(stock, ids, cache, positions)
    del stock
    gc.collect()
    for cache in caches:
        for sink in sinks:
            llm = make_llm(model, streamsink={"sink_tokens": sink, "window_tokens": cache - sink},
                           **base)
            for book, ids in books.items():
                nlls[(book, sink, cache)] = streaming_nlls(llm, ids, progress=False)
            del llm
            gc.collect()

    table = []
    for book, ids in books.items():
        for cache in caches:
            positions = list(range(cache - 1, len(ids) - 1, args.stride))
            row = {"book": book, "cache": cache,
                   "recompute_subset": ppl(nlls[(book, "recompute", cache)]),
                   "dense_all": ppl(nlls[(book, "dense")]),
                   "dense_subset": ppl([nlls[(book, "dense")][t] for t in positions])}
            for sink in sinks:
                values = nlls[(book, sink, cache)]
                row[f"{sink}+{cache - sink}_all"] = ppl(values)
                row[f"{sink}+{cache - sink}_subset"] = ppl([values[t] for t in positions])
            table.append(row)
            print(" | ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in row.items()), flush=True)
    name = "perplexity" + ("_quick" if args.quick else "")
    # Every per-token NLL (the running-perplexity plot is drawn from these by `make docs`).
    samples = []
    for key, values in nlls.items():
        book, method, *rest = key
        sample = {"book": book, "nlls": values}
        if method == "dense":
            sample["method"] = "dense"
        elif method == "recompute":
            sample.update(method="recompute", cache=rest[0],
                          positions=list(range(rest[0] - 1, len(books[book]) - 1, args.stride)))
        else:
            sample.update(method="streaming", sink=method, cache=rest[0])
        samples.append(sample)
    print("wrote", common.save(name, {"tokens": tokens, "stride": args.stride, "table": table,
                                      "samples": samples}, args))


if __name__ == "__main__":
    main()
