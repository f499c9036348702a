"""latency_vs_cache.py: per-token decode latency against cache size C (paper Fig. 10)."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, image, ms, no_result, ratio, source, table

NAMES = ("latency_vs_cache",)
IMAGE = "latency_vs_cache.png"


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("latency_vs_cache")
    if not result:
        return no_result("latency_vs_cache")
    rows = [[f"{r['cache']:,}", ms(r["recompute_ms"]), ms(r["stock_dense_ms"]),
             ms(r["streamsink_ms"]), ratio(r["speedup_vs_recompute"], 1),
             ratio(r["ratio_vs_stock_dense"])] for r in result.data["rows"]]
    return "\n\n".join([
        table(["C", "re-computation ms", "stock, C tokens of history, ms", "streamsink ms",
               "speedup vs re-computation", "streamsink / stock"], rows),
        image(doc, IMAGE, "per-token decode latency against cache size"),
        source(result, doc)])


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("latency_vs_cache")
    if not result:
        return []
    rows = result.data["rows"]
    caches = [r["cache"] for r in rows]
    fig, (ax,) = plotting.figure()
    for key, label in (("recompute_ms", "sliding window + re-computation"),
                       ("stock_dense_ms", "stock vLLM, C tokens of history"),
                       ("streamsink_ms", f"streamsink ({result.data['sink_tokens']} sinks + "
                                         "window)")):
        ax.plot(caches, [r[key] for r in rows], marker="o", label=label)
    ax.set(yscale="log", xlabel="cache size C (tokens)", ylabel="ms per generated token",
           title="Per-token decode latency (batch 1)")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(caches, [str(c) for c in caches])
    plotting.save(fig, [ax], os.path.join(img_dir, IMAGE))
    return [IMAGE]
