"""The README's headline: one table of what streamsink buys and costs, each row from the latest
result of the benchmark that measures it."""
from __future__ import annotations

from . import decode_latency
from .base import Doc, cpu, div, ms, num, ratio, table, when

NAMES = ("memory_1000k", "memory", "load", "chat_session", "decode_latency", "perplexity",
         "passkey")


class Sources:
    """Numbers the rows by the result files they cite, in order of first use."""

    def __init__(self) -> None:
        self.results: list = []

    def ref(self, result) -> str:
        if result not in self.results:
            self.results.append(result)
        return f"[{self.results.index(result) + 1}]"

    def markdown(self, doc: Doc) -> str:
        lines = []
        for i, r in enumerate(self.results, 1):
            cores = r.prov.get("cores")
            lines.append(f"<sub>[{i}] [`{r.path}`]({doc.base}{r.path}): {when(r.prov)}, CPU "
                         f"{cpu(r.prov)}" + (f", {cores} cores" if cores else "") + "</sub>")
        return "<br>\n".join(lines)


def _memory_rows(results: dict, src: Sources) -> list[list[str]]:
    long, short = results.get("memory_1000k"), results.get("memory")
    if not long:
        return []
    label = sorted(long.data["samples"])[0]
    samples = long.data["samples"][label]
    settled = samples[1:]
    tokens = long.data["summary"].get(label, {}).get("stream_tokens") or samples[-1]["tokens"]
    blocks = sorted({s["blocks_held"] for s in settled})
    stock_cell, refs = "–", src.ref(long)
    if short and "stock vLLM" in short.data["samples"]:
        stock = short.data["samples"]["stock vLLM"]
        stock_cell = (f"{stock[-1]['blocks_held']} blocks at {stock[-1]['tokens']:,} tokens, "
                      "its limit (max_model_len)")
        refs += " " + src.ref(short)
    held = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}–{blocks[-1]}"
    return [[f"KV memory of one stream, {tokens:,} tokens",
             f"{held} blocks at every sample after the first chunk; RSS "
             f"{samples[0]['rss_mib']:,.0f} → {samples[-1]['rss_mib']:,.0f} MiB",
             stock_cell, "", refs]]


def _load_rows(results: dict, src: Sources) -> list[list[str]]:
    load = results.get("load")
    if not load:
        return []
    runs = {r["name"]: r["client"] for r in load.data["runs"]}
    ss, stock = runs["streamsink"], runs["stock"]
    c = load.data["config"]
    ref = src.ref(load)
    what = (f"{c['requests']} streams of {c['prompt_tokens']:,} + {c['output_tokens']:,} "
            f"tokens on one KV budget ({c['kv_cache_bytes'] / 2**30:.1f} GiB)")
    sec = lambda x: x / 1000  # noqa: E731
    return [
        [f"{what}: tokens/s", num(ss["tokens_per_s"]), num(stock["tokens_per_s"]),
         ratio(div(ss["tokens_per_s"], stock["tokens_per_s"])), ref],
        ["same load: inter-token latency p99, end-to-end p50",
         f"{ms(ss['itl_ms']['p99'])} ms, {num(sec(ss['e2el_ms']['p50']), 0)} s",
         f"{ms(stock['itl_ms']['p99'])} ms, {num(sec(stock['e2el_ms']['p50']), 0)} s",
         f"{ratio(div(ss['itl_ms']['p99'], stock['itl_ms']['p99']))}, "
         f"{ratio(div(ss['e2el_ms']['p50'], stock['e2el_ms']['p50']))}", ref]]


def _chat_rows(results: dict, src: Sources) -> list[list[str]]:
    chat = results.get("chat_session")
    if not chat:
        return []
    turns = chat.data["per_turn"]
    if len(turns) < 5 or "seconds_off" not in turns[-1]:
        return []
    last = turns[-1]
    on = sum(t["seconds"] for t in turns)
    off = sum(t["seconds_off"] for t in turns)
    return [[f"{len(turns)}-turn chat through the OpenAI endpoint: seconds per turn, turn 5 → "
             f"turn {last['turn']} (all turns)",
             f"{turns[4]['seconds']:.1f} → {last['seconds']:.1f} s ({on:,.0f} s), prefix "
             "caching on",
             f"{turns[4]['seconds_off']:.1f} → {last['seconds_off']:.1f} s ({off:,.0f} s), "
             "caching off", ratio(div(on, off)), src.ref(chat)]]


def _decode_rows(results: dict, src: Sources) -> list[list[str]]:
    dec = results.get("decode_latency")
    if not dec:
        return []
    d = dec.data
    batches = sorted({r["batch"] for r in d["results"]})
    step = {(e, b): decode_latency.step_ms(d, e, b) for e in ("stock", "streamsink")
            for b in batches}
    return [[f"decode step at {d['cache_tokens']:,} attended tokens, batch "
             f"{' / '.join(map(str, batches))} (ms)",
             " / ".join(ms(step[("streamsink", b)]) for b in batches),
             " / ".join(ms(step[("stock", b)]) for b in batches) + " (compiled)",
             " / ".join(ratio(d["ratio_streamsink_over_stock"][f"batch_{b}"], 3)
                        for b in batches), src.ref(dec)]]


def _perplexity_rows(results: dict, src: Sources) -> list[list[str]]:
    ppl = results.get("perplexity")
    if not ppl:
        return []
    rows = []
    cache = max(r["cache"] for r in ppl.data["table"])
    for r in sorted((r for r in ppl.data["table"] if r["cache"] == cache),
                    key=lambda r: r["book"]):
        key = f"4+{cache - 4}_subset"
        if key not in r:
            continue
        rows.append([f"perplexity, {r['book'].rsplit('.', 1)[0]}, C = {cache:,} (4 sinks) "
                     "against re-computing the window for every token",
                     f"{r[key]:.2f}", f"{r['recompute_subset']:.2f} (re-computation)",
                     ratio(div(r[key], r["recompute_subset"]), 3), src.ref(ppl)])
    return rows


def _passkey_rows(results: dict, src: Sources) -> list[list[str]]:
    """The limit: a key further back than the window is gone from a stream's cache."""
    pk = results.get("passkey")
    if not pk:
        return []
    d = pk.data
    beyond = [r for r in d["rows"] if r["distance"] > d["window_tokens"]]
    if not beyond:
        return []

    def exact(engine_is_stock: bool) -> str:
        mine = [r for r in beyond if (r["engine"] == "stock") == engine_is_stock]
        hits = sum(round(r["exact_match_rate"] * r["trials"]) for r in mine)
        return f"{hits} of {sum(r['trials'] for r in mine)} keys"

    ks = sorted(r["distance"] for r in beyond if r["engine"] == "stock")
    return [[f"pass key {ks[0]:,}–{ks[-1]:,} tokens back, beyond the "
             f"{d['window_tokens']:,}-token window: answered exactly", exact(False), exact(True) + " (dense attention)", "",
             src.ref(pk)]]


def markdown(results: dict, doc: Doc) -> str:
    src = Sources()
    rows = (_memory_rows(results, src) + _load_rows(results, src) + _chat_rows(results, src)
            + _decode_rows(results, src) + _perplexity_rows(results, src)
            + _passkey_rows(results, src))
    if not rows:
        return "*No results recorded yet.*"
    return "\n\n".join([
        table(["", "streamsink", "stock vLLM / baseline", "streamsink ÷ baseline", "run"],
              rows),
        src.markdown(doc)])
