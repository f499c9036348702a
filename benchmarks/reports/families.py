"""families.py: the supported-models table — every family of the plugin's registry, how it
encodes positions, and the largest |dNLL| the engine showed against the reference."""
from __future__ import annotations

from streamsink.model_families import FAMILIES

from .base import Doc, no_result, source, table

NAMES = ("families",)


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("families")
    if not result:
        return no_result("families")
    variants = result.data["variants"].values()
    rows = []
    for family in FAMILIES:
        runs = [v for v in variants if v["family"] == family.name]
        if runs:
            worst = max(v["max_abs_dnll"] for v in runs)
            kinds = ", ".join(dict.fromkeys(v["positions"] for v in runs))
            measured = f"{worst:.1e} ({kinds})"
        else:
            measured = "not measured"
        rows.append([family.name, ", ".join(family.architectures), family.positions(),
                     measured])
    shape = result.data.get("shape", {})
    note = ("Streaming NLL from the engine against the float64 reference, tiny random models of "
            "each family (fp32), through chunked prefill, decode, mixed steps, row rebases and a "
            "prefix-cache hit")
    if shape:
        note += (f"; S={shape.get('sink', '?')}, W={shape.get('window', '?')}, block size "
                 f"{shape.get('block', '?')}, streams up to "
                 f"{max(shape.get('prompts', [0])) + shape.get('generated', 0):,} tokens")
    return "\n\n".join([note + ".", table(["Family", "Architectures", "Positions",
                                           "max \\|ΔNLL\\| measured"], rows),
                        source(result, doc)])
