"""ray_serve.py: `streamsink serve --ray` with 1 and 2 replicas under vLLM's serving benchmark."""
from __future__ import annotations

from .base import Doc, ms, no_result, num, source, table

NAMES = ("ray_serve",)


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("ray_serve")
    if not result:
        return no_result("ray_serve")
    d = result.data
    load = d["load"]
    rows = [[str(r["replicas"]), f"{r['requests_per_s']:.2f}", num(r["output_tokens_per_s"]),
             num(r["total_tokens_per_s"]),
             f"{r['ttft_ms_p50'] / 1000:.1f} / {r['ttft_ms_p99'] / 1000:.1f}",
             f"{ms(r['itl_ms_p50'])} / {ms(r['itl_ms_p99'])}",
             f"{r['startup_s'] / 60:.0f}"] for r in d["runs"]]
    parts = [f"{load['prompts']} requests of {load['input_len']} random prompt tokens and "
             f"{load['output_len']} generated tokens, {load['concurrency']} concurrent; engine "
             f"arguments `{' '.join(d['engine_args'])}`.",
             table(["replicas", "requests/s", "generated tokens/s", "prompt + generated "
                    "tokens/s", "TTFT p50 / p99 s", "ITL p50 / p99 ms", "start-up min"], rows)]
    long = (d.get("checks_2_replicas") or {}).get("long_prompt")
    if long:
        parts.append(f"With 2 replicas, one prompt of {long['prompt_tokens']:,} tokens streamed "
                     f"{long['completion_tokens']} tokens back in {long['streamed_chunks']} "
                     f"chunks: first token after {long['ttft_s']:.0f} s, done after "
                     f"{long['total_s']:.0f} s.")
    parts.append(source(result, doc))
    return "\n\n".join(parts)
