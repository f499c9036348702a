"""dtype_cost.py: warm prompt log-probabilities in fp32 and bf16, stock and streamsink."""
from __future__ import annotations

from .base import Doc, no_result, ratio, seconds, source, table

NAMES = ("dtype_cost",)


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("dtype_cost")
    if not result:
        return no_result("dtype_cost")
    d = result.data
    sec, r = d["median_seconds"], d["ratios"]
    flags = d.get("cpu_bf16") or {}
    cpu = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in sorted(flags.items()))
    drift = d.get("max_abs_nll_bf16_vs_fp32") or {}
    return "\n\n".join([
        f"{d['tokens']:,} tokens, streamsink {d['sink_tokens']}+{d['window_tokens']}, median "
        f"of {d['rounds']} rounds" + (f"; torch sees {cpu}." if cpu else "."),
        table(["", "stock", "streamsink", "streamsink / stock"],
              [["fp32 seconds", seconds(sec["stock_float32"]), seconds(sec["streamsink_float32"]),
                ratio(r["streamsink_over_stock_float32"])],
               ["bf16 seconds", seconds(sec["stock_bfloat16"]),
                seconds(sec["streamsink_bfloat16"]), ratio(r["streamsink_over_stock_bfloat16"])],
               ["bf16 / fp32", ratio(r["stock_bfloat16_over_float32"]),
                ratio(sec["streamsink_bfloat16"] / sec["streamsink_float32"]), ""],
               ["max \\|NLL bf16 − NLL fp32\\| (nats)",
                f"{drift['stock']:.3f}" if "stock" in drift else "–",
                f"{drift['streamsink']:.3f}" if "streamsink" in drift else "–", ""]]),
        source(result, doc)])
