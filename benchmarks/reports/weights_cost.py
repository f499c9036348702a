"""weights_cost.py: the default model's weight formats side by side (decode, prefill,
perplexity, KV bytes), and the `--weights auto` choice the run supports."""
from __future__ import annotations

from .base import Doc, image, integer, ms, no_result, num, percent, ratio, seconds, source, table

NAMES = ("weights_cost",)
# The rule weights.AUTO_BY_CPU follows: the fastest format whose perplexity is within this of
# fp32's on every text.
PPL_BUDGET = 0.01


def _decode(d: dict) -> dict:
    return {(r["weights"], r["batch"]): r for r in d["decode"]}


def auto_choice(d: dict) -> tuple[str, str]:
    """(format, why): the fastest at the largest batch measured among those within PPL_BUDGET
    of fp32 on every text, from this run."""
    decode = _decode(d)
    batches = sorted({b for _, b in decode})
    fit = [name for name, by_text in d["perplexity"].items()
           if all(q["ppl"] <= (1 + PPL_BUDGET) * d["perplexity"]["fp32"][t]["ppl"]
                  for t, q in by_text.items())]
    best = min(fit, key=lambda n: sum(decode[(n, b)]["median_seconds_per_step"]
                                      for b in batches))
    return best, (f"within {percent(PPL_BUDGET)} of fp32's perplexity on every text: "
                  f"{', '.join(sorted(fit))}; of these, {best} takes the least decode time "
                  f"summed over the batches measured")


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("weights_cost")
    if not result:
        return no_result("weights_cost")
    d = result.data
    decode = _decode(d)
    formats = list(d["formats"])
    batches = sorted({b for _, b in decode})
    texts = list(d["perplexity"][formats[0]])
    head = ["", *formats]
    rows = [["checkpoint, activations", *[f"`{d['formats'][f]['checkpoint']}`, "
                                          f"{d['formats'][f]['dtype']}" for f in formats]]]
    for b in batches:
        rows.append([f"decode, {b} stream{'s' if b > 1 else ''}: ms/step (tokens/s)",
                     *[f"{ms(1000 * decode[(f, b)]['median_seconds_per_step'])} "
                       f"({num(decode[(f, b)]['tokens_per_s'])})" for f in formats]])
        if "fp32" in formats:
            rows.append([f"… ÷ fp32", *[ratio(decode[(f, b)]["median_seconds_per_step"]
                                              / decode[("fp32", b)]["median_seconds_per_step"])
                                        for f in formats]])
    rows.append([f"prefill of {integer(d['prefill_tokens'])} tokens (s)",
                 *[seconds(d["prefill_seconds"][f]) for f in formats]])
    for t in texts:
        base = d["perplexity"].get("fp32", {}).get(t, {}).get("ppl")
        rows.append([f"perplexity, {t.removesuffix('.txt')} ({integer(d['perplexity'][formats[0]][t]['tokens'])} tokens)",
                     *[f"{num(d['perplexity'][f][t]['ppl'], 2)}"
                       + (f" ({'+' if d['perplexity'][f][t]['ppl'] >= base else '−'}"
                          f"{percent(abs(d['perplexity'][f][t]['ppl'] / base - 1), 1)})"
                          if base and f != "fp32" else "") for f in formats]])
    rows.append(["KV cache: bytes per token, MiB per stream (4+1020)",
                 *[f"{integer(d['memory'][f]['kv_bytes_per_token'])}, "
                   f"{num(d['memory'][f]['kv_bytes_per_stream'] / 2 ** 20)}" for f in formats]])
    parts = [f"Streaming {d['sink_tokens']}+{d['window_tokens']}, every stream past C; decode "
             f"steps of the four engines alternate in one process; the CPU "
             f"{'computes' if d.get('native_bf16') else 'does not compute'} bfloat16 natively.",
             table(head, rows)]
    if "fp32" in formats:
        best, why = auto_choice(d)
        parts.append(f"**`--weights auto` on a CPU like this one: {best}** ({why}).")
    parts.append(image(doc, "weights_cost.png", "decode tokens/s by weight format and streams"))
    parts.append(source(result, doc))
    return "\n\n".join(parts)


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("weights_cost")
    if not result:
        return []
    import os

    from .plotting import figure, save

    d = result.data
    decode = _decode(d)
    formats = list(d["formats"])
    batches = sorted({b for _, b in decode})
    fig, (ax,) = figure(size=(7, 3.6))
    width = 0.8 / len(formats)
    for i, f in enumerate(formats):
        xs = [j + (i - (len(formats) - 1) / 2) * width for j in range(len(batches))]
        ax.bar(xs, [decode[(f, b)]["tokens_per_s"] for b in batches], width, label=f)
    ax.set_xticks(range(len(batches)), [f"{b} stream{'s' if b > 1 else ''}" for b in batches])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode throughput by weight format, streaming "
                 f"{d['sink_tokens']}+{d['window_tokens']}")
    save(fig, [ax], os.path.join(img_dir, "weights_cost.png"))
    return ["weights_cost.png"]
