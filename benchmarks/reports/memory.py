"""memory.py: KV blocks held and process memory against stream length (one stream)."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, image, integer, no_result, num, source, table

NAMES = ("memory",)


def _row(label: str, samples: list[dict], info: dict) -> list[str]:
    settled = samples[len(samples) // 10:] or samples  # after the first tenth (start-up)
    rss = [s["rss_mib"] for s in settled]
    seconds = samples[-1].get("seconds")
    return [label, integer(info.get("stream_tokens")), integer(samples[-1]["tokens"]),
            integer(samples[0]["blocks_held"]),
            integer(max(s["blocks_held"] for s in samples)),
            integer(samples[-1]["blocks_held"]),
            f"{samples[0]['rss_mib']:,.0f} / {samples[-1]['rss_mib']:,.0f}",
            f"{min(rss):,.0f}–{max(rss):,.0f}",
            integer(info.get("max_model_len")),
            num(samples[-1]["tokens"] / seconds, 0) if seconds else "–"]


def render_markdown(result, doc: Doc, img: str) -> str:
    d = result.data
    rows = [_row(label, samples, d["summary"].get(label, {}))
            for label, samples in sorted(d["samples"].items())]
    bound = d.get("streaming_block_bound")
    text = d.get("text") or "synthetic"
    prompt = ("a synthetic token pattern" if text == "synthetic"
              else f"the tokens of {text}, repeated")
    head = (f"Prompt: {prompt}, prefilled in {d['chunk_tokens']:,}-token chunks, then generated "
            f"tokens; KV block bound of a 4+1020 stream at this chunk size: "
            f"{bound if bound else 'not recorded'} (ceil(S/B) + ceil((S+W−1+Q)/B) + 1, "
            "B = 128).")
    return "\n\n".join([head, table(
        ["engine", "stream tokens", "tokens at the last sample", "KV blocks, first sample",
         "peak KV blocks", "KV blocks, last sample", "RSS MiB first / last", "RSS MiB range after the first "
         "tenth", "max_model_len", "tokens/s"], rows),
        image(doc, img, "KV blocks held and RSS against stream length"), source(result, doc)])


def render_image(result, path: str) -> None:
    from matplotlib.ticker import FuncFormatter

    fig, (ax1, ax2) = plotting.figure(2, size=(11, 4))
    for label, rows in sorted(result.data["samples"].items()):
        xs = [r["tokens"] for r in rows]
        ax1.plot(xs, [r["blocks_held"] for r in rows], label=label)
        ax2.plot(xs, [r["rss_mib"] for r in rows], label=label)
    thousands = FuncFormatter(lambda x, _: f"{x / 1000:g}k")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(thousands)
    # from zero: what matters is how flat the lines are, not their wiggle
    ax1.set(xlabel="tokens in the stream", ylabel="KV blocks held", title="KV cache",
            ylim=(0, None))
    ax2.set(xlabel="tokens in the stream", ylabel="process RSS (MiB)", title="process memory",
            ylim=(0, None))
    plotting.save(fig, [ax1, ax2], path)


def markdown(results: dict, doc: Doc, name: str = "memory") -> str:
    result = results.get(name)
    return render_markdown(result, doc, f"{name}.png") if result else no_result(name)


def images(results: dict, img_dir: str, name: str = "memory") -> list[str]:
    result = results.get(name)
    if not result:
        return []
    render_image(result, os.path.join(img_dir, f"{name}.png"))
    return [f"{name}.png"]
