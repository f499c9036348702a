"""ppl_speed.py: `streamsink ppl`'s chunked prefill against a token-at-a-time pass."""
from __future__ import annotations

from .base import Doc, integer, no_result, ratio, sci, seconds, source, table

NAMES = ("ppl_speed",)


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("ppl_speed")
    if not result:
        return no_result("ppl_speed")
    d = result.data
    labels = {"chunked_prefill": "chunked prefill (2,048-token chunks)",
              "token_at_a_time": "one token a step"}
    rows = [[labels.get(k, k), seconds(v["seconds"]), f"{v['ppl']:.6f}", integer(v["tokens"])]
            for k, v in sorted(d["runs"].items())]
    return "\n\n".join([
        f"{d['text']}, streamsink {d['sink_tokens']}+{d['window_tokens']}: chunked prefill "
        f"{ratio(d['speedup'], 1)} faster, perplexity relative difference "
        f"{sci(d['ppl_relative_difference'])}.",
        table(["pass", "seconds", "perplexity", "tokens scored"], rows),
        source(result, doc)])
