"""Single-request probes of a running server, beside the load test:

- `long_prompt`: what a client gets for a prompt longer than the server's per-stream context
  (llama-server refuses it or not; streamed and not);
- `stream_trace`: one streamed completion with the arrival time of every token, to see what
  happens at the moment a stream outgrows its cache (llama.cpp: the context shift; streamsink:
  blocks freed as the window rolls).
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request


def token_count(base_url: str, text: str) -> int | None:
    """Tokens llama-server makes of `text` (its /tokenize; None for a server without one)."""
    req = urllib.request.Request(base_url + "/tokenize", data=json.dumps({"content": text}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return len(json.loads(r.read())["tokens"])
    except (OSError, ValueError, KeyError):
        return None


def long_prompt(base_url: str, model: str, prompt: str, prompt_tokens: int, max_tokens: int = 16,
                keep: int | None = None) -> dict:
    """The answer to one completion whose prompt exceeds the slot, streamed and not."""
    out = {"prompt_tokens": prompt_tokens, "server_token_count": token_count(base_url, prompt)}
    for stream in (False, True):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0.0, "stream": stream}
        if keep is not None:
            body["n_keep"] = keep
        req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                status, text = r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        key = "streamed" if stream else "plain"
        out[key] = {"http_status": status, "body": text[:2000]}
        if not stream and status == 200:  # it answered: with how much of the prompt?
            usage = json.loads(text).get("usage", {})
            out[key]["usage"] = usage
    return out


def stream_trace(api_url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed /v1/completions (greedy, ignore_eos); the arrival time (s after sending) of
    every chunk that carries a choice with text, and the usage the server reports."""
    parts = urllib.parse.urlsplit(api_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "ignore_eos": True, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", parts.path.rstrip("/") + "/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times, usage, chunks_without_text = [], None, 0
    for raw in resp:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        msg = json.loads(data)
        if msg.get("error"):
            raise RuntimeError(f"stream error: {msg['error']}")
        if msg.get("usage"):
            usage = msg["usage"]
        choices = msg.get("choices") or []
        if choices:
            if choices[0].get("text"):
                times.append(time.perf_counter() - t0)
            else:
                chunks_without_text += 1
    conn.close()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"token_times_s": [round(t, 5) for t in times], "itl_s": [round(g, 5) for g in gaps],
            "usage": usage, "chunks_without_text": chunks_without_text}
