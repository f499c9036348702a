"""perplexity.py: streaming perplexity on books (paper Tables 1-2, Fig. 3)."""
from __future__ import annotations

import math
import os
import re

from . import plotting
from .base import Doc, image, no_result, source, table

NAMES = ("perplexity",)
IMAGE = "perplexity.png"
RUNNING_IMAGE = "perplexity_running.png"
SMOOTHING = 100  # tokens per point of the running curve
VARIANT = re.compile(r"^(\d+)\+(\d+)_all$")


def book_label(file: str) -> str:
    return os.path.splitext(file)[0]


def sinks_of(row: dict) -> list[int]:
    return sorted(int(m.group(1)) for m in map(VARIANT.match, row) if m)


def _cell(row: dict, key: str) -> str:
    return f"{row[key + '_subset']:.2f} ({row[key + '_all']:.2f})"


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("perplexity")
    if not result:
        return no_result("perplexity")
    d = result.data
    rows_in = d["table"]
    sinks = sinks_of(rows_in[0])
    header = ["book", "C"] + [f"{s}+C" if s == 0 else f"{s}+C−{s}" for s in sinks] + [
        "re-computation", "dense"]
    rows = []
    for r in rows_in:
        c = r["cache"]
        rows.append([book_label(r["book"]), f"{c:,}"]
                    + [_cell(r, f"{s}+{c - s}") for s in sinks]
                    + [f"{r['recompute_subset']:.2f}", _cell(r, "dense")])
    parts = [f"First {d['tokens']:,} tokens of each book; first number: perplexity on every "
             f"{d['stride']}th position past C (where re-computation is evaluated), in "
             "brackets: over all tokens.",
             table(header, rows), image(doc, IMAGE, "perplexity against cache size")]
    if _running_curves(d):
        parts.append(image(doc, RUNNING_IMAGE, "running perplexity"))
    parts.append(source(result, doc))
    return "\n\n".join(parts)


def _ppl(values: list[float]) -> float:
    return math.exp(sum(values) / len(values))


def _running_curves(d: dict) -> dict:
    """{label: per-token NLLs} of the first book at the smallest C, when the run kept them."""
    samples = d.get("samples") or []
    if not samples:
        return {}
    book = sorted({s["book"] for s in samples})[0]
    cache = min(s["cache"] for s in samples if s["method"] == "streaming")
    curves = {f"{s['sink']}+{cache - s['sink']}": s["nlls"]
              for s in sorted((s for s in samples if s["book"] == book
                               and s["method"] == "streaming" and s["cache"] == cache),
                              key=lambda s: s["sink"])}
    curves.update({"dense": s["nlls"] for s in samples
                   if s["book"] == book and s["method"] == "dense"})
    return {"book": book, "cache": cache, "curves": curves}


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("perplexity")
    if not result:
        return []
    d = result.data
    books = sorted({r["book"] for r in d["table"]})
    fig, axes = plotting.figure(len(books), size=(5.5 * len(books), 4))
    for ax, book in zip(axes, books):
        mine = sorted((r for r in d["table"] if r["book"] == book), key=lambda r: r["cache"])
        caches = [r["cache"] for r in mine]
        for s in sinks_of(mine[0]):
            ax.plot(caches, [r[f"{s}+{r['cache'] - s}_subset"] for r in mine], marker="o",
                    label=f"{s} sink{'s' if s != 1 else ''} + window")
        ax.plot(caches, [r["recompute_subset"] for r in mine], marker="s", linestyle=":",
                color="black", label="re-computation")
        ax.plot(caches, [r["dense_subset"] for r in mine], linestyle="--", color="gray",
                label="dense")
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(caches, [str(c) for c in caches])
        ax.set(xlabel="cache size C (tokens)", title=book_label(book),
               ylabel=f"perplexity, every {d['stride']}th position past C")
    plotting.save(fig, axes, os.path.join(img_dir, IMAGE))
    written = [IMAGE]
    running = _running_curves(d)
    if running:
        fig, (ax,) = plotting.figure(size=(7, 4))
        for label, nlls in running["curves"].items():
            xs = range(SMOOTHING, len(nlls) + 1)
            ax.plot(xs, [_ppl(nlls[x - SMOOTHING:x]) for x in xs], label=label,
                    linestyle="--" if label == "dense" else "-")
        ax.set(yscale="log", xlabel="token position",
               ylabel=f"perplexity of the last {SMOOTHING} tokens",
               title=f"{book_label(running['book'])}, cache {running['cache']}")
        plotting.save(fig, [ax], os.path.join(img_dir, RUNNING_IMAGE))
        written.append(RUNNING_IMAGE)
    return written
