"""What every benchmark's renderer shares: the result it renders (data, path, provenance), fixed
number formats, markdown tables and the line that names a table's source.

Rendering is a pure function of the result files: same files, same markdown (fixed float
formats, no clock, no dict order that depends on anything but the files)."""
from __future__ import annotations

import dataclasses
import math
import os

import result_files  # benchmarks/ is on sys.path (report.py lives there)

NOT_RECORDED = result_files.NOT_RECORDED
DASH = "–"


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    path: str  # relative to the repository, '/'-separated
    data: dict
    prov: dict

    @classmethod
    def from_file(cls, name: str, path: str) -> "Result":
        data = result_files.load(path)
        rel = os.path.relpath(os.path.abspath(path), result_files.REPO).replace(os.sep, "/")
        return cls(name, rel, data, result_files.provenance(data, path))


@dataclasses.dataclass(frozen=True)
class Doc:
    """Where a block goes: links from it to repository files start with `base`."""
    base: str  # "" from the repository root (README.md), "../" from docs/
    img: str   # how the document refers to docs/img/


# ------------------------------------------------------------------------------ numbers

def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x, digits: int = 1) -> str:
    """Fixed decimals, thousands separated: 1,326.0."""
    return DASH if missing(x) else f"{x:,.{digits}f}"


def integer(x) -> str:
    return DASH if missing(x) else f"{round(x):,}"


def ms(x) -> str:
    """Milliseconds: one decimal below 100, none above."""
    if missing(x):
        return DASH
    return f"{x:,.1f}" if abs(x) < 100 else f"{x:,.0f}"


def seconds(x) -> str:
    if missing(x):
        return DASH
    return f"{x:,.2f}" if abs(x) < 10 else f"{x:,.1f}" if abs(x) < 100 else f"{x:,.0f}"


def ratio(x, digits: int = 2) -> str:
    return DASH if missing(x) else f"{x:.{digits}f}×"


def percent(x, digits: int = 0) -> str:
    return DASH if missing(x) else f"{100 * x:.{digits}f}%"


def sci(x) -> str:
    return DASH if missing(x) else f"{x:.1e}"


def div(a, b):
    return None if missing(a) or missing(b) or not b else a / b


# ------------------------------------------------------------------------------ markdown

def table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"
    return "\n".join([line(headers), "|" + "---|" * len(headers)] + [line(r) for r in rows])


def cpu(prov: dict) -> str:
    if prov.get("cpu_model") and prov["cpu_model"] != NOT_RECORDED:
        flags = prov.get("cpu_flags")
        shown = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_tile",
                                           "amx_bf16")] if flags else []
        return prov["cpu_model"] + (f" ({', '.join(shown)})" if shown else "")
    cap = prov.get("cpu_capability")
    return f"{NOT_RECORDED} (torch CPU capability {cap})" if cap else NOT_RECORDED


def when(prov: dict) -> str:
    t = prov.get("time_utc") or NOT_RECORDED
    return t if t == NOT_RECORDED else t[:16].replace("T", " ") + " UTC"


def source(result: Result, doc: Doc) -> str:
    prov = result.prov
    cores = prov.get("cores")
    commit = prov.get("commit") or NOT_RECORDED
    if prov.get("dirty"):
        commit += " with uncommitted changes"
    return (f"<sub>Source: [`{result.path}`]({doc.base}{result.path}); run {when(prov)}, "
            f"commit {commit}; CPU: {cpu(prov)}"
            + (f", {cores} cores" if cores else "") + ".</sub>")


def image(doc: Doc, file: str, alt: str) -> str:
    return f"![{alt}]({doc.img}{file})"


def no_result(name: str) -> str:
    return f"*No result recorded for `{name}` yet.*"
