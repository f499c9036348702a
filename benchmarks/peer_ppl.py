"""Perplexity of one text through each system, in the ways each can score it.

- streamsink, streaming S+W: `streamsink ppl --sink S --window W` (every token t+1 scored with
  the S first tokens and the W most recent ones visible; chunked prefill).
- streamsink, dense: the same command with a window wider than the text (every earlier token
  visible): the reference both streaming modes lose against.
- llama.cpp, context shift through llama-server, token at a time: the text is fed as if the
  model were generating it in one slot of `keep + window` tokens. Each token is one
  /completion request whose prompt is the slot's token list (cached, so only the new token is
  computed) and whose one "generated" token is forced to the text's next token by a logit
  bias; the server reports that token's probability from the raw logits (before any sampler, so
  the bias does not enter it). When the slot is full the client drops tokens exactly as the
  server's context shift does (keep the first `keep`, discard half of the rest), and the server's
  cache reuse (`--cache-reuse`) moves the kept tail's K/V to its new positions (seq_rm + seq_add:
  the same two operations, with the same re-rotation of K, as a context shift during generation).
  So its window is not fixed: between half and all of the slot, saw-toothing.
- llama.cpp, dense through llama-server: the same feed in a slot larger than the text (no shift):
  checks that both systems score the same tokens the same way when neither evicts anything.
- llama.cpp, `llama-perplexity --ctx-size C`: the text cut into non-overlapping C-token chunks,
  each evaluated from scratch, scoring only the second half of each chunk (C-1-C/2 tokens a
  chunk, each seeing between C/2 and C-2 earlier tokens of its own chunk). Not streaming: a
  different number, over a different subset of the tokens.

Every function returns {"ppl", "tokens", "what"} (+ per-token NLLs where there are any).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.request


def _ppl(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))


def text_token_ids(text_path: str, checkpoint: str, max_tokens: int) -> list[int]:
    """The token ids `streamsink ppl` scores (the same tokenizer call, offset 0)."""
    from transformers import AutoTokenizer

    from streamsink.serving.ppl import load_token_ids

    return load_token_ids(text_path, AutoTokenizer.from_pretrained(checkpoint), 0, max_tokens)


def streamsink_ppl(text_path: str, checkpoint: str, *, sink: int, window: int, max_tokens: int,
                   nll_path: str) -> dict:
    cmd = [sys.executable, "-m", "streamsink.serving.cli", "ppl", "--text", text_path,
           "--model", checkpoint, "--sink", str(sink), "--window", str(window),
           "--max-tokens", str(max_tokens), "--out", nll_path]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"streamsink ppl failed: {done.stderr[-2000:]}")
    m = re.search(r"ppl=([0-9.]+) tokens=(\d+)", done.stdout)
    with open(nll_path) as f:
        nlls = [float(line) for line in f]
    return {"ppl": float(m.group(1)), "tokens": int(m.group(2)), "nlls": nlls,
            "seconds": round(time.monotonic() - t0, 1)}


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def llama_server_nlls(base_url: str, ids: list[int], *, keep: int, slot_ctx: int | None,
                      progress: bool = True) -> dict:
    """NLL of ids[t+1] given what the slot holds after feeding ids[..t] (see the module doc).
    slot_ctx None: never shift (the slot must hold the whole text)."""
    slot: list[int] = []
    nlls: list[float] = []
    shifts: list[int] = []  # text positions where the slot shifted
    t0 = time.monotonic()
    for t in range(len(ids) - 1):
        # llama-server shifts before decoding the next token when n_tokens + 1 >= n_ctx.
        if slot_ctx is not None and len(slot) + 1 >= slot_ctx:
            n_left = len(slot) - keep
            n_discard = n_left // 2
            slot = slot[:keep] + slot[keep + n_discard:]
            shifts.append(t)
        slot.append(ids[t])
        out = _post(base_url + "/completion", {
            "prompt": slot, "n_predict": 1, "n_probs": 1, "cache_prompt": True,
            "temperature": 0.0, "logit_bias": [[ids[t + 1], 1.0e4]],
            "return_tokens": True})
        probs = out["completion_probabilities"][0]
        if probs["id"] != ids[t + 1]:
            raise RuntimeError(f"forced token {ids[t + 1]} but the server sampled {probs['id']}")
        nlls.append(-probs["logprob"])
        if progress and (t + 1) % 500 == 0:
            rate = (t + 1) / (time.monotonic() - t0)
            print(f"    {t + 1}/{len(ids) - 1} tokens ({rate:.1f} tok/s), running ppl "
                  f"{_ppl(nlls):.3f}", flush=True)
    return {"ppl": _ppl(nlls), "tokens": len(nlls), "nlls": nlls, "shifts_at": shifts,
            "seconds": round(time.monotonic() - t0, 1)}


def llama_perplexity(binary: str, gguf: str, text_path: str, *, ctx: int, threads: int,
                     kv_type: str | None) -> dict:
    cmd = [binary, "--model", gguf, "--file", text_path, "--ctx-size", str(ctx),
           "--threads", str(threads), "--threads-batch", str(threads)]
    if kv_type:
        cmd += ["--cache-type-k", kv_type, "--cache-type-v", kv_type]
    t0 = time.monotonic()
    done = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True)
    log = done.stdout + done.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed ({done.returncode}): {log[-2000:]}")
    n_chunks = int(chunks.group(1)) if chunks else None
    return {"ppl": float(m.group(1)), "stderr": float(m.group(2)), "chunks": n_chunks,
            # each chunk scores its tokens ctx/2+1 .. ctx-1
            "tokens": n_chunks * (ctx - 1 - ctx // 2) if n_chunks else None,
            "seconds": round(time.monotonic() - t0, 1), "argv": cmd[1:]}


def write_text_of_tokens(ids: list[int], checkpoint: str, path: str) -> None:
    """The text whose tokens these are (for llama-perplexity, which reads a file)."""
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(checkpoint).decode(ids)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def nll_agreement(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    return {"tokens": n, "max_abs_diff": max(diffs) if diffs else None,
            "mean_abs_diff": sum(diffs) / n if n else None}


def running_ppl(nlls: list[float], width: int) -> list[float]:
    return [_ppl(nlls[x - width:x]) for x in range(width, len(nlls) + 1, max(1, width // 4))]

