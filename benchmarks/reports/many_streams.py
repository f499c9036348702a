"""many_streams.py: many concurrent streams on one KV budget, stock against streamsink."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, div, image, ms, no_result, num, ratio, source, table

NAMES = ("many_streams",)
IMAGE = "many_streams.png"


def _pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    counts = sorted({r["streams"] for r in rows})
    pick = {(r["engine"], r["streams"]): r for r in rows}
    return [(pick[("stock", n)], pick[("streamsink", n)]) for n in counts]


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("many_streams")
    if not result:
        return no_result("many_streams")
    d = result.data
    rows = [[str(stock["streams"]), num(stock["tokens_per_second"]),
             num(ours["tokens_per_second"]),
             ratio(div(ours["tokens_per_second"], stock["tokens_per_second"])),
             f"{ms(stock['itl_p50_ms'])} / {ms(stock['itl_p99_ms'])}",
             f"{ms(ours['itl_p50_ms'])} / {ms(ours['itl_p99_ms'])}",
             ratio(div(ours["itl_p99_ms"], stock["itl_p99_ms"]))]
            for stock, ours in _pairs(d["rows"])]
    return "\n\n".join([
        f"Each stream: {d['prompt_tokens']:,}-token prompt + {d['new_tokens']:,} generated "
        f"tokens; KV pool {d['kv_pool_bytes'] >> 20} MiB for each engine; streamsink "
        f"{d['sink_tokens']}+{d['window_tokens']}.",
        table(["streams", "stock tok/s", "streamsink tok/s", "tok/s ratio",
               "stock p50 / p99 ms", "streamsink p50 / p99 ms", "p99 ratio"], rows),
        image(doc, IMAGE, "throughput and per-token latency against concurrent streams"),
        source(result, doc)])


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("many_streams")
    if not result:
        return []
    d = result.data
    fig, (ax1, ax2) = plotting.figure(2, size=(11, 4))
    for label, color in (("stock", "tab:blue"), ("streamsink", "tab:orange")):
        mine = sorted((r for r in d["rows"] if r["engine"] == label), key=lambda r: r["streams"])
        counts = [r["streams"] for r in mine]
        ax1.plot(counts, [r["tokens_per_second"] for r in mine], marker="o", color=color,
                 label=label)
        ax2.plot(counts, [r["itl_p99_ms"] for r in mine], marker="o", color=color,
                 label=f"{label} p99")
        ax2.plot(counts, [r["itl_p50_ms"] for r in mine], marker="x", linestyle="--",
                 color=color, label=f"{label} p50")
    ax1.set(xlabel="concurrent streams", ylabel="generated tokens/s (all streams)",
            title=f"throughput, KV pool {d['kv_pool_bytes'] >> 20} MiB")
    ax2.set(xlabel="concurrent streams", ylabel="ms between a stream's tokens",
            title="per-token latency (after the first token)", yscale="log")
    plotting.save(fig, [ax1, ax2], os.path.join(img_dir, IMAGE))
    return [IMAGE]
