"""load.py: many long streams through `streamsink loadtest --compare-stock`, one KV budget."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, div, image, integer, ms, no_result, num, ratio, source, table

NAMES = ("load",)
IMAGE = "load.png"
PANELS = (("running", "requests running"), ("waiting", "requests waiting"),
          ("gen_tokens_per_s", "generated tokens per second (server)"),
          ("held_blocks", "streamsink: KV blocks held by streams"),
          ("itl_p99_ms", "inter-token latency p99 (ms)"),
          ("kv_usage_pct", "KV cache usage (%)"))


def _peak(run: dict, key: str):
    values = [v for _t, v in run["series"].get(key) or []]
    return max(values) if values else None


def _pct(block: dict, q: str):
    return (block or {}).get(q)


def _tpot(client: dict, q: str):
    return ((client.get("vllm_bench") or {}).get("percentiles_tpot_ms") or {}).get(q)


def _pair(cells_of, fmt, ss: dict, stock: dict, compare: bool = True) -> list[str]:
    a, b = cells_of(ss), cells_of(stock)
    if isinstance(a, tuple):
        return [" / ".join(fmt(x) for x in a), " / ".join(fmt(x) for x in b),
                " / ".join(ratio(div(x, y)) for x, y in zip(a, b)) if compare else ""]
    return [fmt(a), fmt(b), ratio(div(a, b)) if compare else ""]


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("load")
    if not result:
        return no_result("load")
    d = result.data
    runs = {r["name"]: r for r in d["runs"]}
    ss, stock = runs["streamsink"], runs["stock"]
    b = d.get("benchmark") or {}
    c = d["config"]
    secs = lambda x: None if x is None else x / 1000  # noqa: E731
    rows = [
        ["requests ok / errors / aborted"] + [
            f"{r['client']['ok']} / {r['client']['errors']} / {r['client']['aborted']}"
            for r in (ss, stock)] + [""],
        ["wall time of the load, min"] + _pair(
            lambda r: (r["load_end"] - r["load_start"]) / 60, lambda x: num(x), ss, stock),
        ["tokens/s (client, whole run)"] + _pair(
            lambda r: r["client"]["tokens_per_s"], lambda x: num(x), ss, stock),
        ["peak generated tokens/s (server)"] + _pair(
            lambda r: _peak(r, "gen_tokens_per_s"), lambda x: num(x, 0), ss, stock),
        ["peak requests running"] + _pair(lambda r: _peak(r, "running"), integer, ss, stock,
                                          False),
        [f"goodput (TPOT ≤ {c['slo_tpot_ms']:g} ms), req/s"] + _pair(
            lambda r: r["client"].get("goodput_rps") or 0.0, lambda x: f"{x:.5f}", ss, stock,
            False),
        ["TPOT p50 / p99 ms"] + _pair(
            lambda r: (_tpot(r["client"], "50.0"), _tpot(r["client"], "99.0")), ms, ss, stock),
        ["ITL p50 / p99 ms"] + _pair(
            lambda r: (_pct(r["client"]["itl_ms"], "p50"), _pct(r["client"]["itl_ms"], "p99")),
            ms, ss, stock),
        ["TTFT p50 / p99 s"] + _pair(
            lambda r: (secs(_pct(r["client"]["ttft_ms"], "p50")),
                       secs(_pct(r["client"]["ttft_ms"], "p99"))), lambda x: num(x, 0), ss,
            stock),
        ["end-to-end p50 / p99 s"] + _pair(
            lambda r: (secs(_pct(r["client"]["e2el_ms"], "p50")),
                       secs(_pct(r["client"]["e2el_ms"], "p99"))), lambda x: num(x, 0), ss,
            stock),
        ["KV blocks held after the load", integer(ss.get("held_blocks_after")), "–", ""],
    ]
    head = (f"{c['requests']} streams of {c['prompt_tokens']:,} prompt + {c['output_tokens']:,} "
            f"generated tokens, all sent at once; streamsink {c['sink']}+{c['window']} against "
            f"stock on the same KV budget: {c['kv_cache_bytes'] / 2**30:.2f} GiB"
            + (f" ({b['kv_blocks']} blocks)" if b.get("kv_blocks") else "")
            + f"; {c['max_num_batched_tokens']:,}-token steps; "
            + ("both servers eager." if b.get("eager") else "both servers compiled."))
    return "\n\n".join([head, table(["", "streamsink", "stock", "streamsink / stock"], rows),
                        image(doc, IMAGE, "server-side series during the load"),
                        source(result, doc)])


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("load")
    if not result:
        return []
    colors = {"streamsink": "tab:orange", "stock": "tab:blue"}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 8), sharex=True)
    flat = [ax for row in axes for ax in row]
    for ax, (key, title) in zip(flat, PANELS):
        for run in result.data["runs"]:
            points = run["series"].get(key) or []
            if points:
                xs, ys = zip(*points)
                ax.plot([x / 60 for x in xs], ys, color=colors.get(run["name"]),
                        label=run["name"], linewidth=1.2)
            # dotted: the last request of this run finished
            ax.axvline((run["load_end"] - run["load_start"]) / 60,
                       color=colors.get(run["name"]), linestyle=":", linewidth=0.8)
        ax.set_title(title, fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("minutes since the load started (dotted: load done)")
    plotting.save(fig, flat, os.path.join(img_dir, IMAGE))
    return [IMAGE]
