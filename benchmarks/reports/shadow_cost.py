"""shadow_cost.py: what the sink shadows cost inside a batch-16 decode step (a diagnostic)."""
from __future__ import annotations

from .base import Doc, ms, no_result, ratio, source, table

NAMES = ("shadow_cost",)


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("shadow_cost")
    if not result:
        return no_result("shadow_cost")
    data = result.data
    rows = [[f"`{v['variant']}`", v["what"], ms(v["median_ms_per_step"]),
             ratio(v["ratio_over_stock"], 3), f"{v['median_shadow_ms_per_step']:.2f}"]
            for v in data["variants"]]
    return "\n\n".join([
        f"Batch {data['batch']}, C = {data['cache_tokens']}, {data['steps_per_variant']} steps "
        f"a variant; stock (compiled): {ms(data['stock_median_ms_per_step'])} ms/step.",
        table(["variant", "what it writes", "streamsink ms/step", "over stock",
               "shadow ms/step"], rows),
        source(result, doc)])
