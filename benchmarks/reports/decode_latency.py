"""decode_latency.py: median decode step of stock (compiled, eager) and streamsink, alternating."""
from __future__ import annotations

import statistics

from .base import Doc, Result, ms, no_result, ratio, source, table

NAMES = ("decode_latency", "decode_latency_stock_op_shadows")
ENGINES = ("stock", "stock_eager", "streamsink")


def step_ms(data: dict, engine: str, batch: int) -> float:
    """The median over the rounds of each round's median step (ms)."""
    return statistics.median(1000 * r["median_seconds_per_step"] for r in data["results"]
                             if r["engine"] == engine and r["batch"] == batch)


def _rows(data: dict) -> list[list[str]]:
    by_round = data.get("ratio_streamsink_over_stock_by_round") or {}
    rows = []
    for batch in sorted({r["batch"] for r in data["results"]}):
        step = {e: step_ms(data, e, batch) for e in ENGINES}
        key = f"batch_{batch}"
        rounds = by_round.get(key) or []
        rows.append([str(batch), ms(step["stock"]), ms(step["stock_eager"]),
                     ms(step["streamsink"]),
                     ratio(data["ratio_streamsink_over_stock"][key], 3),
                     " / ".join(f"{r:.3f}" for r in rounds) if len(rounds) > 1 else "–",
                     ratio(data["ratio_stock_eager_over_stock"][key])])
    return rows


def _table(result: Result, doc: Doc) -> str:
    data = result.data
    rounds = data.get("rounds", 1)
    head = (f"C = {data['cache_tokens']} ({data['sink_tokens']} sinks), {data['steps']} steps "
            f"a round, {rounds} round{'s' if rounds != 1 else ''}; sink shadows: "
            f"{data.get('sink_shadows', 'stock ops')}.")
    return "\n\n".join([head, table(
        ["batch", "stock (compiled) ms/step", "stock eager ms/step",
         "streamsink (compiled) ms/step", "streamsink / stock", "rounds", "stock eager / stock"],
        _rows(data)), source(result, doc)])


def markdown(results: dict, doc: Doc) -> str:
    parts = []
    main, fallback = (results.get(n) for n in NAMES)
    parts.append(_table(main, doc) if main else no_result(NAMES[0]))
    if fallback:
        parts.append("The same measurement with the sink shadows written by stock ops "
                     "(`STREAMSINK_NATIVE_SHADOWS=0`, the path without a C++ compiler):")
        parts.append(_table(fallback, doc))
    return "\n\n".join(parts)

