"""A long chat session through `streamsink serve`'s OpenAI chat endpoint, prefix caching on and
off: the time each turn takes, how much of each prompt came from the cache, and whether the
answers are exact.

Each turn sends the whole conversation (as OpenAI clients do): ~100 tokens of a book as the
user turn, 64 generated tokens (greedy, ignore_eos) as the answer; the history soon dwarfs
S+W. With caching on a turn should prefill only its own tokens (plus at most a block of
alignment), so its time stays flat; with caching off it re-prefills the whole history.

1. caching on: the conversation is generated; per turn the wall time of the request, the prompt
   and cached token counts (usage.prompt_tokens_details.cached_tokens), the token ids (prompt
   and answer, return_token_ids) and the answer's log-probabilities;
2. caching off (`--no-enable-prefix-caching`): the same messages (the answers of run 1 as the
   assistant turns), timed the same way; its answers must equal run 1's;
3. re-scoring: an offline caching-off engine computes, token by token (prompt log-probabilities),
   every turn's prompt + answer as the server saw them; the answers' log-probabilities must equal
   those the caching-on server returned while generating them (<= 1e-3).

    .venv/bin/python benchmarks/chat_session.py                  # 40 turns, 4+1020
    .venv/bin/python benchmarks/chat_session.py --quick          # 6 short turns, 4+252
    .venv/bin/python benchmarks/chat_session.py --turns 8 --label chat_session_small
Writes benchmarks/results/<label>/<date>-<commit>.json (plot: `make docs`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import urllib.request

import common

TOLERANCE = 1e-3


def user_turns(model_dir: str, turns: int, tokens: int) -> list[str]:
    """Consecutive passages of a book (synthetic text without ../shared/data), each with a
    short instruction, ~`tokens` tokens per turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    book = os.path.join(common.SHARED_DATA, "katrine-14263.txt")
    if os.path.exists(book):
        with open(book, encoding="utf-8", errors="replace") as f:
            text = f.read()[20_000:]  # past the front matter
    else:
        text = " ".join(f"Sentence {i} of a long story about a lighthouse keeper and the sea."
                        for i in range(20 * turns * tokens // 12))
    ids = tokenizer(text)["input_ids"]
    head = "Here is the next part of the story. What do you make of it?\n\n"
    per_turn = max(16, tokens - len(tokenizer(head)["input_ids"]))
    return [head + tokenizer.decode(ids[t * per_turn:(t + 1) * per_turn]).strip()
            for t in range(turns)]


def post(url: str, body: dict, timeout: float = 3600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def converse(api_url: str, model: str, turns: list[str], answer_tokens: int,
             answers: list[str] | None = None) -> list[dict]:
    """One session, turn by turn. `answers`: use these as the assistant turns (a replay)."""
    messages, records = [], []
    for t, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        body = {"model": model, "messages": messages, "max_tokens": answer_tokens,
                "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 1,
                "return_token_ids": True}
        start = time.perf_counter()
        reply = post(api_url + "/chat/completions", body)
        seconds = time.perf_counter() - start
        choice, usage = reply["choices"][0], reply["usage"]
        details = usage.get("prompt_tokens_details") or {}
        records.append({
            "turn": t + 1, "seconds": seconds, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": details.get("cached_tokens") or 0,
            "content": choice["message"]["content"],
            "prompt_token_ids": reply.get("prompt_token_ids"),
            "token_ids": choice.get("token_ids"),
            "logprobs": [x["logprob"] for x in choice["logprobs"]["content"]]})
        answer = answers[t] if answers else choice["message"]["content"]
        messages.append({"role": "assistant", "content": answer})
        print(f"turn {t + 1}: {seconds:.2f} s, prompt {usage['prompt_tokens']}, cached "
              f"{records[-1]['cached_tokens']}", flush=True)
    return records


def run_server(args, caching: bool, turns: list[str], answers=None) -> list[dict]:
    from streamsink.model_store import served_name
    from streamsink.serving.loadtest.servers import EngineArgs, ServerProcess

    extra = [] if caching else ["--no-enable-prefix-caching"]
    engine = EngineArgs(model=args.model_dir, kv_cache_bytes=None,
                        max_num_batched_tokens=args.chunk, max_num_seqs=4, extra=extra)
    log = os.path.join(tempfile.gettempdir(), f"chat_session_{'on' if caching else 'off'}.log")
    server = ServerProcess("streamsink", engine, log, sink=args.sink, window=args.window)
    server.start()
    try:
        print(f"caching {'on' if caching else 'off'}: {server.api_url} (log {log})", flush=True)
        return converse(server.api_url, served_name(args.model_dir), turns, args.answer_tokens,
                        answers)
    finally:
        server.stop()


def chains(records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Each turn's prompt + answer ids, grouped into the fewest sequences to score: a turn whose
    sequence extends the previous one (its answer re-tokenized to the same ids) shares it."""
    groups: list[tuple[list[int], list[int]]] = []
    for i, r in enumerate(records):
        seq = list(r["prompt_token_ids"]) + list(r["token_ids"])
        if groups and seq[:len(groups[-1][0])] == groups[-1][0]:
            groups[-1] = (seq, groups[-1][1] + [i])
        else:
            groups.append((seq, [i]))
    return groups


def rescore(args, records: list[dict]) -> list[float]:
    """Per turn: max |Δ log-probability| of its answer, server (caching on, while generating) vs
    an offline caching-off engine scoring prompt + answer token by token."""
    from vllm import SamplingParams

    from streamsink.serving.engine import make_llm

    groups = chains(records)
    llm = make_llm(args.model_dir, {"sink_tokens": args.sink, "window_tokens": args.window},
                   in_process=True, enable_prefix_caching=False,
                   max_num_batched_tokens=args.chunk)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": seq} for seq, _ in groups], params,
                        use_tqdm=False)
    diffs = [0.0] * len(records)
    for (seq, members), out in zip(groups, outs):
        for i in members:
            r = records[i]
            start = len(r["prompt_token_ids"])
            want = [out.prompt_logprobs[start + k][tok].logprob
                    for k, tok in enumerate(r["token_ids"])]
            diffs[i] = max(abs(a - b) for a, b in zip(r["logprobs"], want))
    del llm
    gc.collect()
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--user-tokens", type=int, default=100)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--skip-off", action="store_true", help="no caching-off server run")
    parser.add_argument("--skip-rescore", action="store_true", help="no offline re-scoring")
    parser.add_argument("--label", default=None, help="results name (default chat_session, "
                                                      "chat_session_quick with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="6 turns of 60 + 24 tokens, 4+252 (a smoke run, minutes)")
    args = parser.parse_args()
    if args.quick:
        args.turns, args.user_tokens, args.answer_tokens, args.window = 6, 60, 24, 252
    args.label = args.label or ("chat_session_quick" if args.quick else "chat_session")

    from streamsink.model_store import resolve_model

    args.model_dir = resolve_model(args.model)
    turns = user_turns(args.model_dir, args.turns, args.user_tokens)
    on = run_server(args, True, turns)
    off = None
    if not args.skip_off:
        off = run_server(args, False, turns, answers=[r["content"] for r in on])
    rescored = None if args.skip_rescore else rescore(args, on)

    cached_share = [r["cached_tokens"] / r["prompt_tokens"] for r in on]
    summary = {
        "turns": args.turns, "sink": args.sink, "window": args.window,
        "user_tokens": args.user_tokens, "answer_tokens": args.answer_tokens,
        "last_prompt_tokens": on[-1]["prompt_tokens"],
        "min_cached_share_from_turn_3": min(cached_share[2:], default=None),
        "seconds_on_turn_5": on[4]["seconds"] if len(on) >= 5 else None,
        "seconds_on_last_turn": on[-1]["seconds"],
        "last_over_turn_5": on[-1]["seconds"] / on[4]["seconds"] if len(on) >= 5 else None,
        "sequences_rescored": len(chains(on)),
    }
    if off:
        summary["answers_equal_off"] = sum(a["content"] == b["content"] for a, b in zip(on, off))
        summary["max_abs_dlogprob_off"] = max(
            (max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))
             for a, b in zip(on, off) if a["content"] == b["content"]), default=None)
        summary["seconds_off_last_turn"] = off[-1]["seconds"]
    if rescored:
        summary["max_abs_dlogprob_rescored"] = max(rescored)
        summary["rescored_within_tolerance"] = max(rescored) <= TOLERANCE
    per_turn = []
    for i, r in enumerate(on):
        row = {k: r[k] for k in ("turn", "seconds", "prompt_tokens", "cached_tokens")}
        row["cached_share"] = cached_share[i]
        if off:
            row["seconds_off"] = off[i]["seconds"]
            row["answer_equal_off"] = r["content"] == off[i]["content"]
        if rescored:
            row["max_abs_dlogprob_rescored"] = rescored[i]
        per_turn.append(row)
    path = common.save(args.label, {"summary": summary, "per_turn": per_turn}, args)
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
