"""passkey.py: a pass key k tokens back, asked for at the end; streamsink against dense stock."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, image, no_result, percent, source, table

NAMES = ("passkey",)
IMAGE = "passkey.png"
FILLERS = {"repeat": "repeated sentences", "book": "a book's text"}


def _engines(d: dict) -> list[str]:
    # stock first, then the streaming engine(s), in the order the run recorded them
    seen = []
    for row in d["rows"]:
        if row["engine"] not in seen:
            seen.append(row["engine"])
    return sorted(seen, key=lambda e: e != "stock")


def _lp(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("passkey")
    if not result:
        return no_result("passkey")
    d = result.data
    engines = _engines(d)
    at = {(r["engine"], r["distance"]): r for r in d["rows"]}
    header = ["k (tokens back)", "prompt tokens", "key in the window"]
    for e in engines:
        header += [f"{e}: exact", f"{e}: log p(first digit)"]
    rows = []
    for k in sorted(d["distances"]):
        first = at[(engines[0], k)]
        row = [f"{k:,}", f"{first['prompt_tokens']:,}",
               "yes" if k <= d["window_tokens"] else "no"]
        for e in engines:
            r = at[(e, k)]
            row += [f"{percent(r['exact_match_rate'])} of {r['trials']}",
                    _lp(r["first_digit_logprob_mean"])]
        rows.append(row)
    return "\n\n".join([
        f"{d['trials']} keys per k, {FILLERS.get(d['filler'], d['filler'])} as filler, greedy; "
        f"streamsink "
        f"{d['sink_tokens']}+{d['window_tokens']}; log p: the mean over the keys of the "
        "log-probability of the key's first digit at the first answer step (a uniform guess "
        "among ten digits: -2.30).",
        table(header, rows), image(doc, IMAGE, "pass key retrieval against distance"),
        source(result, doc)])


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("passkey")
    if not result:
        return []
    d = result.data
    fig, (ax1, ax2) = plotting.figure(2, size=(11, 4))
    for e in _engines(d):
        mine = sorted((r for r in d["rows"] if r["engine"] == e), key=lambda r: r["distance"])
        ks = [r["distance"] for r in mine]
        ax1.plot(ks, [100 * r["exact_match_rate"] for r in mine], marker="o", label=e)
        ax2.plot(ks, [r["first_digit_logprob_mean"] for r in mine], marker="o", label=e)
    ks = sorted(d["distances"])
    for ax in (ax1, ax2):
        ax.axvline(d["window_tokens"], color="gray", linestyle=":", label="window W")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ks, [f"{k:,}" for k in ks])
        ax.set_xlabel("k: tokens from the pass key to the question")
    ax1.set(ylabel="exact answers (%)", ylim=(-5, 105), title="pass key retrieved")
    ax2.axhline(-2.302585, color="black", linestyle="--", linewidth=0.8,
                label="uniform over 10 digits")
    ax2.set(ylabel="log p(key's first digit)", title="confidence in the right first digit")
    plotting.save(fig, [ax1, ax2], os.path.join(img_dir, IMAGE))
    return [IMAGE]
