"""peer_llamacpp.py: streamsink against llama.cpp's `llama-server` with context shift, on the same
machine, model and load (benchmarks/peer_llamacpp.py).

- peer_load: every system's load at every stream count, streamsink's tokens/s over llama.cpp's
  in the same run (each streamsink row over llama.cpp on the same weights, its "peer"; in runs
  from before streamsink's weights were chosen, its one row over every llama.cpp row), what a
  prompt longer than a slot gets from llama-server, what each system was prompted with, and one
  stream's every token time (the stall at a shift);
- peer_goals: the same-weights goals (GOALS_*) judged on the run's q4 rows against Q4_1;
- peer_ppl: the perplexity of one text every way each system can score it, and the agreement
  checks between modes that are the same computation;
- peer_headline: the README's one line.

A run may hold only its load part or only its perplexity part (--skip-ppl, --skip-load): the load
blocks read the newest run with a load, peer_ppl the newest with perplexities, so one page may
cite two runs (each block names its file). Smoke runs (--quick) are never chosen for the docs
(report.load_results)."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import types

import result_files

from . import plotting
from .base import (Doc, Result, div, image, integer, missing, ms, num, percent, ratio,
                   sci, source, table)

BENCHMARK = "peer_llamacpp"
# A run may hold only one part (--skip-load, --skip-ppl): each block reads the newest run that
# holds its part (report.load_results, through reports.PARTS).
LOAD = BENCHMARK + ":load"
PPL = BENCHMARK + ":ppl"
TRACE_IMAGE = "peer_llamacpp_trace.png"
PPL_IMAGE = "peer_llamacpp_ppl.png"
PAGE = "docs/peer_llamacpp.md"
PPL_WIDTH = 100  # tokens per point of the running perplexity
F32 = "llamacpp-f32"  # the llama.cpp system with the same numerics as streamsink's
Q4 = "llamacpp-q4_1"  # the shipped 4-bit GGUF: what a llama.cpp user would run
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# The goals for streamsink against llama.cpp on the same weights, judged on the streamsink rows
# with these weights (against their peer, Q4_1: what a llama.cpp user runs): tokens/s ÷ the
# peer's at least this, by stream count (the equal-work row too); ITL p50 at one stream ÷ the
# peer's at most this; the KV bytes a stream holds ÷ llama-server's a slot at most this.
GOAL_WEIGHTS = "q4"
GOALS_TOKENS_PER_S = {1: 0.9, 8: 1.0, 32: 1.0, 64: 1.0}
GOAL_ITL_P50 = 1.2
GOAL_KV = 1.0


# ------------------------------------------------------------------------------ the run's data

def _args(d: dict) -> dict:
    return d.get("args") or {}


def _slot(d: dict) -> int | None:
    a = _args(d)
    return a["sink"] + a["window"] if "sink" in a and "window" in a else None


def _system_names(d: dict) -> list[str]:
    """In the order the run declared them, then any other that ran."""
    names = [s["name"] for s in d.get("systems") or []]
    for r in (d.get("load") or {}).get("runs") or []:
        if r["system"] not in names:
            names.append(r["system"])
    for name in ((d.get("load") or {}).get("traces") or {}):
        if name not in names:
            names.append(name)
    return names


def _system(d: dict, name: str) -> dict:
    return next((s for s in d.get("systems") or [] if s["name"] == name), {})


def _is_streamsink(d: dict, name: str) -> bool:
    kind = _system(d, name).get("kind")
    return (kind or name) == "streamsink"


def _ours(d: dict) -> list[str]:
    return [n for n in _system_names(d) if _is_streamsink(d, n)]


def _is_cut(d: dict, name: str) -> bool:
    """A streamsink row given llama-server's cut prompts (equal prefill work)."""
    return _system(d, name).get("prompts") == "cut"


def _weights(system: dict) -> str:
    """q4 (bf16): the weight format, and the activations' dtype where the format's name does
    not say it."""
    dtype = DTYPE_SHORT.get(system.get("dtype"), system.get("dtype"))
    return system["weights"] if dtype in (None, system["weights"]) else \
        f"{system['weights']} ({dtype})"


def _gguf(name: str) -> str:
    return name[len("llamacpp-"):].upper()


def label(d: dict, name: str) -> str:
    """streamsink 4+1020 (its weight format, where the run chose one: "streamsink 4+1020, q4
    (bf16)", "..., cut prompts"); llama.cpp F32, f32 KV; llama.cpp Q4_1, default KV (f16)."""
    if _is_streamsink(d, name):
        a = _args(d)
        system = _system(d, name)
        out = f"streamsink {a['sink']}+{a['window']}" if "sink" in a else "streamsink"
        if "weights" in system:
            out += f", {_weights(system)}" + (", cut prompts" if _is_cut(d, name) else "")
        return out
    if name.startswith("llamacpp-"):
        kv = _system(d, name).get("kv_type")
        return f"llama.cpp {_gguf(name)}, " + (f"{kv} KV" if kv else "default KV (f16)")
    return name


def has_peers(d: dict) -> bool:
    """Whether the run's streamsink rows name the llama.cpp row on their weights, their peer
    (runs since streamsink's weights were chosen)."""
    return any(_system(d, n).get("peer") for n in _ours(d))


def pairs(d: dict) -> list[tuple[str, str]]:
    """(streamsink row, the llama.cpp row it is compared with): each with its peer; in a run
    from before the weights were chosen, its one streamsink row with every llama.cpp row."""
    if has_peers(d):
        return [(n, _system(d, n)["peer"]) for n in _ours(d) if _system(d, n).get("peer")]
    ours = (_ours(d) or ["streamsink"])[0]
    return [(ours, other) for other in _llama_names(d)]


def _runs(d: dict) -> list[dict]:
    return (d.get("load") or {}).get("runs") or []


def _run(d: dict, name: str, streams: int) -> dict | None:
    return next((r for r in _runs(d) if r["system"] == name and r["streams"] == streams), None)


def _ok(run: dict | None) -> bool:
    return bool(run and run.get("summary"))


def stream_counts(d: dict) -> list[int]:
    return sorted({r["streams"] for r in _runs(d)})


def _summary_ratio(d: dict, ours: str, other: str, streams: int, value) -> float | None:
    a, b = _run(d, ours, streams), _run(d, other, streams)
    if not (_ok(a) and _ok(b)):
        return None
    return div(value(a["summary"]), value(b["summary"]))


def tokens_per_s_ratio(d: dict, other: str, streams: int, ours: str | None = None):
    """streamsink's tokens/s (`ours`, else the run's first streamsink row) over `other`'s at
    this stream count, in this run; None when either has no load-test report."""
    ours = ours or (_ours(d) or ["streamsink"])[0]
    return _summary_ratio(d, ours, other, streams, lambda s: s["tokens_per_s"])


def itl_p50_ratio(d: dict, ours: str, other: str, streams: int = 1):
    """`ours`'s median inter-token latency over `other`'s (below 1: ours comes sooner)."""
    return _summary_ratio(d, ours, other, streams, lambda s: s["itl_ms"].get("p50"))


def kv_per_stream(d: dict, name: str) -> tuple[int | None, int | None]:
    """(tokens, bytes) of the KV cache one stream of this system holds at most, as the run
    recorded it (None: a run from before it did)."""
    for where in [_system(d, name)] + [r for r in _runs(d) if r["system"] == name]:
        if "kv_bytes_per_stream" in where:
            return where.get("kv_tokens_per_stream"), where["kv_bytes_per_stream"]
    return None, None


def _llama_names(d: dict) -> list[str]:
    return [n for n in _system_names(d) if not _is_streamsink(d, n)]


def has_load(d: dict) -> bool:
    return any(_ok(r) for r in _runs(d))


def _ppl_results(d: dict) -> dict:
    return (d.get("ppl") or {}).get("results") or {}


def has_ppl(d: dict) -> bool:
    return any("ppl" in r for r in _ppl_results(d).values())


def _error(body: str) -> tuple[str | None, str | None]:
    """(type, message) of an error answer's JSON body; (None, the text) when it is not one."""
    try:
        err = json.loads(body).get("error") or {}
        return err.get("type"), err.get("message")
    except (ValueError, AttributeError):
        return None, body


def _median_ms(values_s: list[float]):
    return statistics.median(values_s) * 1000 if values_s else None


def _duration(s) -> str:
    if missing(s):
        return "–"
    if s >= 5400:
        return f"{s:,.0f} s ({s / 3600:.1f} h)"
    if s >= 120:
        return f"{s:,.0f} s ({s / 60:.0f} min)"
    return f"{s:,.1f} s"


def _no_run() -> str:
    return "*No full run of `peer_llamacpp` recorded yet (smoke runs are not shown).*"


def _quick_note(result: Result) -> list[str]:
    if result_files.is_quick(result.path, result.data):
        return ["**A smoke run (`--quick`): it checks that the comparison runs; its numbers are "
                "not the comparison.**"]
    return []


# ------------------------------------------------------------------------------ peer_load

def _setup(d: dict) -> str:
    v, build, model = d.get("versions") or {}, d.get("llamacpp_build") or {}, d.get("model") or {}
    parts = []
    if v.get("llamacpp_commit"):
        parts.append(f"llama.cpp `{v['llamacpp_commit']}` (the llama-cpp-python "
                     f"{v.get('llama_cpp_python_sdist', '?')} sdist's), built once in "
                     f"{_duration(build.get('build_seconds'))} with {build.get('jobs', '?')} "
                     f"jobs ({build.get('compiler', 'compiler not recorded')})")
    weights = model.get("f32_gguf_vs_q4_dequantized") or {}
    if weights:
        parts.append(f"`{model.get('f32_gguf')}` against `{model.get('q4_gguf')}` dequantized: "
                     f"max |difference| {weights.get('max_abs_diff')} over "
                     f"{weights.get('tensors_compared')} tensors")
    if v.get("vllm"):
        parts.append(f"vLLM {v['vllm']}, torch {v.get('torch', '?')}")
    if "wall_s" in d:
        parts.append(f"the whole run took {_duration(d['wall_s'])}")
    return "This run: " + "; ".join(parts) + "." if parts else ""


def _mib(n_bytes) -> str:
    return num(div(n_bytes, 2 ** 20))


def _load_table(d: dict) -> str:
    with_kv = any("kv_bytes_per_stream" in r for r in _runs(d))
    rows = []
    for name in _system_names(d):
        for streams in stream_counts(d):
            r = _run(d, name, streams)
            if r is None:
                continue
            mem = r.get("memory") or {}
            peak = f"{integer(mem.get('peak_rss_mib'))} / {integer(mem.get('peak_pss_mib'))}"
            kv = ([f"{_mib(r.get('kv_bytes_per_stream'))} / "
                   f"{integer(r.get('kv_tokens_per_stream'))}"] if with_kv else [])
            s = r.get("summary")
            if not s:
                rows.append([label(d, name), str(streams),
                             f"no report (load test exit {r.get('loadtest_exit_code')})",
                             "–", "–", "–", peak] + kv)
                continue
            ttft, itl = s["ttft_ms"], s["itl_ms"]
            rows.append([label(d, name), str(streams), f"{s['ok']} / {s['requests']}",
                         num(s["tokens_per_s"]),
                         f"{ms(ttft.get('p50'))} / {ms(ttft.get('p99'))}",
                         f"{ms(itl.get('p50'))} / {ms(itl.get('p99'))} / {ms(itl.get('max'))}",
                         peak] + kv)
    return table(["system", "streams", "streams completed", "tokens/s",
                  "TTFT p50 / p99 (ms)", "ITL p50 / p99 / max (ms)",
                  "peak RSS / PSS (MiB)"]
                 + (["KV a stream holds (MiB / tokens)"] if with_kv else []), rows)


def _ratio_table(d: dict) -> str:
    compared = pairs(d)
    rows = [[str(n)] + [ratio(tokens_per_s_ratio(d, o, n, ours)) for ours, o in compared]
            for n in stream_counts(d)]
    return table(["streams"] + [f"tokens/s: {label(d, ours)} ÷ {label(d, o)}"
                                for ours, o in compared], rows)


def _itl_ratios(d: dict) -> str:
    """One stream's median inter-token latency, each streamsink row over its peer's."""
    cells = [f"{label(d, ours)} ÷ {label(d, o)} {ratio(itl_p50_ratio(d, ours, o))}"
             for ours, o in pairs(d) if not _is_cut(d, ours)]
    return ("ITL p50 at 1 stream, the same pairs (below 1: streamsink's tokens come sooner): "
            + "; ".join(cells) + ".") if cells else ""


def _prompts(d: dict) -> str:
    a, slot = _args(d), _slot(d)
    out = []
    for name in _system_names(d):
        prompts = sorted({r["prompt_tokens"] for r in _runs(d) if r["system"] == name})
        if not prompts:
            continue
        shown = " / ".join(f"{p:,}" for p in prompts)
        what = f"{label(d, name)}: {shown} prompt + {a.get('output_tokens', 0):,} generated tokens"
        if _is_cut(d, name):
            what += ", llama-server's cut prompts (the same prefill work as llama-server)"
        elif _is_streamsink(d, name):
            what += (", the whole prompt" + (f" (longer than its {slot:,}-token cache: "
                                             "streamed through it)"
                                             if slot and max(prompts) > slot else ""))
        else:
            probe = (d.get("long_prompt_probe") or {}).get(name) or {}
            reported = sorted({r.get("slot_ctx_reported") for r in _runs(d)
                               if r["system"] == name and r.get("slot_ctx_reported")})
            slot_shown = " / ".join(f"{x:,}" for x in reported) or (f"{slot:,}" if slot else "?")
            what += (f", the prompt cut to fit its slot of {slot_shown} tokens"
                     + (f" ({d['slot_margin']} left free for re-tokenization"
                        if "slot_margin" in d else "")
                     + (f"; llama-server made {probe['fitted_prompt_server_tokens']:,} tokens "
                        "of it" if probe.get("fitted_prompt_server_tokens") else "")
                     + (")" if "slot_margin" in d else ""))
        out.append(what)
    if not out:
        return ""
    cut = [label(d, n) for n in _ours(d) if _is_cut(d, n)]
    return ("Prompts per stream: " + "; ".join(out) + ". Prefill differs accordingly, so TTFT "
            + (f"is comparable only between {_join(cut)} and llama.cpp's rows"
               if cut else "is not comparable between the systems")
            + "; the tokens/s are all generated tokens over the whole load.")


def _probe(d: dict) -> str:
    lines = []
    slot = _slot(d)
    for name, p in sorted((d.get("long_prompt_probe") or {}).items()):
        answers = {}
        for key, how in (("plain", "not streamed"), ("streamed", "streamed")):
            a = p.get(key)
            if not a:
                continue
            if a.get("http_status") == 200:
                used = (a.get("usage") or {}).get("prompt_tokens")
                answer = "HTTP 200" + (f", answered from {used:,} prompt tokens" if used else "")
            else:
                kind, message = _error(a.get("body", ""))
                answer = (f"HTTP {a.get('http_status')}" + (f" `{kind}`" if kind else "")
                          + (f", “{message}”" if message else ""))
            answers.setdefault(answer, []).append(how)
        answers = [f"{' and '.join(hows)}: {answer}" if len(answers) > 1 else
                   f"{' and '.join(hows)} alike, {answer}" for answer, hows in answers.items()]
        count = p.get("server_token_count")
        lines.append(f"{label(d, name)}, a prompt of {p['prompt_tokens']:,} tokens"
                     + (f" ({count:,} by llama-server's count)" if count else "")
                     + (f" against a {slot:,}-token slot" if slot else "") + ": "
                     + "; ".join(answers) + ".")
    if not lines:
        return ""
    ss = [r for r in _runs(d) if _is_streamsink(d, r["system"]) and _ok(r)
          and slot and r["prompt_tokens"] > slot]
    served = sum(r["summary"]["ok"] for r in ss)
    longest = max((r["prompt_tokens"] for r in ss), default=0)
    if served:
        lines.append(f"streamsink, in the load above: {served} of "
                     f"{sum(r['summary']['requests'] for r in ss)} streams with "
                     f"{longest:,}-token prompts completed.")
    return "**A prompt longer than the slot.** " + " ".join(lines)


def _trace(d: dict, doc: Doc) -> str:
    traces = (d.get("load") or {}).get("traces") or {}
    if not traces:
        return "*No token trace in this run.*"
    first = next(iter(traces.values()))
    prompt = (first.get("usage") or {}).get("prompt_tokens") or first.get("prompt_tokens")
    out = [f"One stream alone, every token's arrival: the same {prompt:,}-token prompt (it fits "
           f"llama.cpp's slot) + {len(first['token_times_s']):,} generated tokens to every "
           "system. Inter-token latency (ms):"]
    rows = []
    for name in _system_names(d):
        tr = traces.get(name)
        if not tr:
            continue
        itl = tr["itl_s"]
        med = _median_ms(itl)
        shifts = tr.get("shift_before_token")
        at = tr.get("itl_at_shifts_ms") or []
        if shifts is None:
            shift_cell, stall = "no context shift", "–"
        else:
            shift_cell = ", ".join(f"{k:,}" for k in shifts) or "none"
            stall = ", ".join(f"{ms(x)} ({ratio(div(x, med))})" for x in at) or "–"
        rows.append([label(d, name), ms(med), ms(max(itl) * 1000 if itl else None),
                     shift_cell, stall])
    out.append(table(["system", "median", "max", "context shift before generated token",
                      "ITL at the shift (÷ median)"], rows))
    out.append(image(doc, TRACE_IMAGE, "inter-token latency of one stream, every token"))
    return "\n\n".join(out)


def _dashboards(result: Result, doc: Doc) -> str:
    d = result.data
    ok = [r for r in _runs(d) if (r.get("report") or {}).get("dashboard")]
    if not ok:
        return ""
    top = max(r["streams"] for r in ok)
    folder = os.path.dirname(result.path)
    links = []
    for r in ok:
        png = r["report"]["dashboard"]
        if r["streams"] == top and os.path.isfile(os.path.join(result_files.REPO, folder, png)):
            links.append(f"[{label(d, r['system'])}]({doc.base}{folder}/{png})")
    if not links:
        return ""
    return (f"Dashboards of the load at {top} streams (Prometheus, scraped every second): "
            + ", ".join(links) + ".")


def load_markdown(results: dict, doc: Doc) -> str:
    result = results.get(LOAD)
    if not result:
        return _no_run()
    d = result.data
    parts = _quick_note(result) + [_setup(d)]
    if has_load(d):
        failed = [r for r in _runs(d) if not _ok(r)]
        parts += [_prompts(d), _load_table(d)]
        if failed:
            parts.append("“No report”: the load test of that row ended without one (its exit "
                         "code is shown); the row has no figures.")
        if has_peers(d):
            parts += ["The same comparison as ratios, each streamsink row against llama.cpp on "
                      "the same weights in this run (above 1: streamsink generates faster):",
                      _ratio_table(d), _itl_ratios(d)]
        elif _llama_names(d):
            parts += ["The same comparison as ratios, both systems in this run (above 1: "
                      "streamsink generates faster):", _ratio_table(d)]
        parts.append(_dashboards(result, doc))
    else:
        parts.append("*No load result in this run*" + (
            " (every load test ended without a report)." if _runs(d) else "."))
    parts += [_probe(d), "### One stream, token by token", _trace(d, doc), source(result, doc)]
    return "\n\n".join(p for p in parts if p)


# ------------------------------------------------------------------------------ peer_goals

def verdict(value, bound: float, at_least: bool) -> str:
    """met / missed, and by how much (relative to the goal)."""
    if missing(value):
        return "not measured"
    gap = percent(abs(value / bound - 1), 1)
    if value >= bound if at_least else value <= bound:
        return f"met ({gap} to spare)"
    return f"missed by {gap}"


def goals(d: dict) -> list[dict]:
    """Each goal (GOALS_*) on the run's GOAL_WEIGHTS rows: what, which row, the measured
    ratio (None: not measured), the bound and whether it is a floor. Empty without such a row."""
    rows = {("cut" if _is_cut(d, n) else "full"): n for n in _ours(d)
            if _system(d, n).get("weights") == GOAL_WEIGHTS and _system(d, n).get("peer")}
    full = rows.get("full")
    out = []
    for streams, bound in GOALS_TOKENS_PER_S.items():
        out += [{"goal": f"tokens/s at {_streams(streams)}", "system": n,
                 "value": tokens_per_s_ratio(d, _system(d, n)["peer"], streams, n),
                 "bound": bound, "at_least": True}
                for n in (full, rows.get("cut")) if n]
    if full:
        peer = _system(d, full)["peer"]
        ours_kv, theirs_kv = kv_per_stream(d, full)[1], kv_per_stream(d, peer)[1]
        out += [{"goal": "ITL p50 at 1 stream", "system": full,
                 "value": itl_p50_ratio(d, full, peer), "bound": GOAL_ITL_P50,
                 "at_least": False},
                {"goal": "KV bytes a stream holds (llama-server: a slot)", "system": full,
                 "value": div(ours_kv, theirs_kv), "bound": GOAL_KV, "at_least": False,
                 "detail": f"{_mib(ours_kv)} ÷ {_mib(theirs_kv)} MiB"}]
    return out


def _goal_bounds() -> str:
    """The goals in words, from GOALS_* (shown whether or not the run is judged)."""
    by_bound: dict[float, list[int]] = {}
    for streams, bound in GOALS_TOKENS_PER_S.items():
        by_bound.setdefault(bound, []).append(streams)
    where = lambda counts: (_streams(counts[0]) if len(counts) == 1  # noqa: E731
                            else f"{_join([str(n) for n in counts])} streams")
    return ("The goals, streamsink ÷ llama.cpp on the same weights: tokens/s "
            + "; ".join(f"≥ {ratio(bound)} at {where(counts)}"
                        for bound, counts in by_bound.items())
            + f"; ITL p50 at 1 stream ≤ {ratio(GOAL_ITL_P50)}; KV bytes a stream holds ≤ "
            f"{ratio(GOAL_KV)} llama-server's a slot.")


def goals_markdown(results: dict, doc: Doc) -> str:
    result = results.get(LOAD)
    if not result:
        return "\n\n".join([_goal_bounds(), _no_run()])
    d = result.data
    judged = goals(d)
    if not judged:
        return "\n\n".join(_quick_note(result) + [
            _goal_bounds(),
            f"*This run has no streamsink {GOAL_WEIGHTS} row compared with llama.cpp on the "
            "same weights (runs before the weights were chosen have none): no goal is judged "
            "on it.*", source(result, doc)])
    full = judged[0]["system"]
    rows = [[g["goal"], label(d, g["system"]),
             ("≥ " if g["at_least"] else "≤ ") + ratio(g["bound"]),
             ratio(g["value"]) + (f" ({g['detail']})" if "detail" in g else ""),
             verdict(g["value"], g["bound"], g["at_least"])] for g in judged]
    return "\n\n".join(_quick_note(result) + [
        f"streamsink ÷ llama.cpp on the same weights: the {GOAL_WEIGHTS} rows against "
        f"{label(d, _system(d, full)['peer'])}, in this run (“to spare” and “missed by”: "
        "relative to the goal):",
        table(["goal", "streamsink row", "goal (÷ llama.cpp)", "measured", "verdict"], rows),
        source(result, doc)])


# ------------------------------------------------------------------------------ peer_ppl

# streamsink's weight formats other than fp32, as its perplexity rows name them.
WEIGHT_MEANING = {"q4": "the q4 checkpoint (4-bit weights re-quantized from the Q4_1 GGUF's, "
                        "bf16 activations and KV cache)"}


def meaning(mode: str, r: dict) -> str:
    """What a perplexity mode's number means, keyed by the mode's label in the result."""
    m = re.fullmatch(r"streamsink (?:(\S+) )?(\d+)\+(\d+)", mode)
    if m and m[1]:
        return (f"the same as the `streamsink {m[2]}+{m[3]}` row, with "
                + WEIGHT_MEANING.get(m[1], f"{m[1]} weights"))
    if m:
        return (f"every token scored with the {int(m[2]):,} first and the {int(m[3]):,} most "
                "recent tokens visible")
    if mode == "streamsink dense":
        return "every earlier token visible (the reference)"
    m = re.fullmatch(r"streamsink (\S+) dense", mode)
    if m:
        return ("the same as the `streamsink dense` row, with "
                + WEIGHT_MEANING.get(m[1], f"{m[1]} weights"))
    m = re.fullmatch(r"llama\.cpp (\S+) context shift keep (\d+), slot (\d+)", mode)
    if m and m[1] != "f32":
        return f"the same feed as the f32 row, with the {m[1].upper()} GGUF (its default KV type)"
    if m:
        keep, slot = int(m[2]), int(m[3])
        low = slot - (slot - 1 - keep) // 2 - keep  # recent tokens visible right after a shift
        shifts = r.get("shifts_at")
        return ("the text fed through one slot as if generated: each token is a request whose "
                "prompt is the slot's token list (cached, only the new token computed) and whose "
                "one generated token is forced to the text's next token by a logit bias; the "
                "token's probability is read from the raw logits (before sampling). When the "
                "slot is full the client drops tokens exactly as the server's context shift "
                "does, and the server's `--cache-reuse` moves the kept K/V with the same "
                "`seq_rm` + `seq_add` (K re-rotation) a shift uses. Once the slot has filled, "
                f"the visible window saw-tooths between {low:,} and {slot - 1 - keep:,} recent "
                f"tokens after the {keep} kept"
                + (f" ({len(shifts)} shifts)" if shifts is not None else ""))
    m = re.fullmatch(r"llama\.cpp (\S+) dense", mode)
    if m and m[1] != "f32":
        return (f"the same feed in a slot larger than the text, with the {m[1].upper()} GGUF (its "
                "default KV type): what its context shift row loses against")
    if m:
        return ("the same feed in a slot larger than the text: a check that both systems score "
                "the same tokens alike when nothing is evicted")
    m = re.fullmatch(r"llama-perplexity (\S+) ctx (\d+)", mode)
    if m and m[1] != "f32":
        return f"the same as the f32 row, with the {m[1].upper()} GGUF"
    if m:
        c = int(m[2])
        return (f"llama.cpp's own tool: non-overlapping {c:,}-token chunks, each from scratch, "
                f"scoring only the last {c - 1 - c // 2:,} tokens of each chunk (contexts of "
                f"{c // 2:,} to {c - 2:,} tokens). Not streaming, other tokens scored: not "
                "comparable to the rows above, shown because it is the number llama.cpp users "
                "quote")
    return r.get("what", "")


def _mode_order(mode: str) -> int:
    """streamsink's modes, then llama-server's, then llama-perplexity's (stable within each)."""
    for i, prefix in enumerate(("streamsink ", "llama.cpp ", "llama-perplexity ")):
        if mode.startswith(prefix):
            return i
    return 3


def _ppl_cell(r: dict) -> str:
    if "ppl" not in r:
        return "skipped" + (f": {r['skipped']}" if r.get("skipped") else "")
    return f"{r['ppl']:.2f}" + (f" ± {r['stderr']:.2f}" if "stderr" in r else "")


DENSE_PAIR = ("streamsink dense", "llama.cpp f32 dense")
GAP_SPAN = 1024  # tokens per row of the dense gap along the text


def dense_gap_by_position(nlls: dict) -> list[tuple[int, int, float, float, float]]:
    """(first, end, mean, median, max) of |ΔNLL| between the two dense modes, per GAP_SPAN
    tokens: whether the systems' arithmetic drifts apart with the position."""
    if not all(k in nlls for k in DENSE_PAIR):
        return []
    gaps = [abs(x - y) for x, y in zip(*(nlls[k] for k in DENSE_PAIR))]
    return [(lo, min(lo + GAP_SPAN, len(gaps)), statistics.fmean(g), statistics.median(g), max(g))
            for lo in range(0, len(gaps), GAP_SPAN) for g in [gaps[lo:lo + GAP_SPAN]]]


def ms_per_request(d: dict) -> dict[str, float]:
    """The token-at-a-time feed's time per request (one per scored token), by mode."""
    return {mode: r["seconds"] / r["tokens"] * 1000 for mode, r in _ppl_results(d).items()
            if mode.startswith("llama.cpp ") and r.get("tokens") and "seconds" in r}


def ppl_markdown(results: dict, doc: Doc) -> str:
    result = results.get(PPL)
    if not result:
        return _no_run()
    d = result.data
    if not has_ppl(d):
        return "\n\n".join(_quick_note(result) + ["*No perplexity result in this run.*",
                                                  source(result, doc)])
    p = d["ppl"]
    res = p["results"]
    dense = (res.get("streamsink dense") or {}).get("ppl")
    header = ["mode", "what each number means", "tokens scored", "perplexity"]
    if dense:
        header.append("÷ streamsink dense")
    rows = []
    for mode, r in sorted(res.items(), key=lambda kv: _mode_order(kv[0])):
        row = [f"`{mode}`", meaning(mode, r), integer(r.get("tokens")), _ppl_cell(r)]
        if dense:
            same_tokens = "ppl" in r and not mode.startswith("llama-perplexity")
            row.append(ratio(div(r["ppl"], dense), 3) if same_tokens else "–")
        rows.append(row)
    parts = _quick_note(result) + [
        f"The first {p.get('tokens_in', 0):,} tokens of `{p.get('text')}`, scored every way each "
        "system allows:", table(header, rows)]
    agree = p.get("agreement") or {}
    if agree:
        parts.append("Agreement checks, per-token NLL where two modes are the same computation:\n"
                     + "\n".join(f"- {mode}: max |ΔNLL| {sci(a.get('max_abs_diff'))}, mean "
                                 f"{sci(a.get('mean_abs_diff'))}, over {integer(a.get('tokens'))} "
                                 "tokens" for mode, a in agree.items()))
    else:
        parts.append("*No agreement check in this run.*")
    spans = dense_gap_by_position(p.get("nlls") or {})
    if spans:
        parts.append("The two dense modes along the text (|ΔNLL| per token, streamsink dense "
                     "against llama.cpp f32 dense):\n\n" + table(
                         ["tokens", "mean", "median", "max"],
                         [[f"{lo:,}–{hi - 1:,}", sci(mean), sci(median), sci(top)]
                          for lo, hi, mean, median, top in spans]))
    per_request = ms_per_request(d)
    if per_request:
        parts.append("The token-at-a-time feed through llama-server, one request a token: "
                     + "; ".join(f"`{mode}` {ms(v)} ms a token" for mode, v in per_request.items())
                     + ".")
    if any(len(v) >= PPL_WIDTH for v in (p.get("nlls") or {}).values()):
        parts.append(f"Running perplexity (of the last {PPL_WIDTH} tokens) along the text:\n\n"
                     + image(doc, PPL_IMAGE, "running perplexity along the text"))
    parts.append(source(result, doc))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------ peer_headline

def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _streams(n: int) -> str:
    return f"{n} stream" + ("" if n == 1 else "s")


def _same_weights_clauses(d: dict) -> list[str]:
    """Each streamsink row's tokens/s over its peer's at every stream count, and the first
    pair's peak memory at the most streams."""
    a = _args(d)
    counts = [n for n in stream_counts(d)
              if any(tokens_per_s_ratio(d, o, n, ours) is not None for ours, o in pairs(d))]
    if not counts:
        return []
    cells = []
    for ours, other in pairs(d):
        what = _weights(_system(d, ours)) + (" with llama-server's cut prompts (equal prefill "
                                             "work)" if _is_cut(d, ours) else "")
        cells.append(f"{what} ÷ {_gguf(other)} " + ", ".join(
            ratio(tokens_per_s_ratio(d, other, n, ours)) for n in counts))
    clauses = [f"tokens/s, streamsink ÷ llama.cpp on the same weights at "
               f"{_join([str(n) for n in counts])} streams "
               f"({a.get('output_tokens', 0):,} generated tokens a stream): " + "; ".join(cells)]
    top = max(counts)
    ours, other = pairs(d)[0]
    mem = [((_run(d, n, top) or {}).get("memory") or {}).get("peak_rss_mib")
           for n in (ours, other)]
    if not any(missing(m) for m in mem):
        clauses.append(f"peak server memory at {_streams(top)} {integer(mem[0])} MiB "
                       f"({_weights(_system(d, ours))}) against {integer(mem[1])} MiB "
                       f"({_gguf(other)}; RSS of the process tree)")
    return clauses


def _f32_clauses(d: dict) -> list[str]:
    """A run from before the weights were chosen: its one streamsink row over llama.cpp F32 (and
    over Q4_1), and their peak memory at the most streams."""
    a = _args(d)
    ss = label(d, (_ours(d) or ["streamsink"])[0])
    clauses = []
    counts = [n for n in stream_counts(d) if tokens_per_s_ratio(d, F32, n) is not None]
    if counts:
        r = {n: tokens_per_s_ratio(d, F32, n) for n in counts}
        ahead = [n for n in counts if r[n] < 1]
        behind = [n for n in counts if r[n] > 1]
        who = []
        for name, where in (("llama.cpp", ahead), ("streamsink", behind)):
            if where == counts:
                who.append(f"{name} faster at every stream count")
            elif where:
                who.append(f"{name} faster at {_join([_streams(n) for n in where])}")
        clauses.append(
            f"tokens/s, {ss} ÷ llama.cpp: "
            + _join([f"{ratio(r[n])} at {_streams(n)}" for n in counts])
            + f" ({a.get('output_tokens', 0):,} generated tokens a stream"
            + ("; " + ", ".join(who) if who else "") + ")")
        q4 = {n: tokens_per_s_ratio(d, Q4, n) for n in counts}
        if all(v is not None for v in q4.values()):
            faster = "llama.cpp" if all(v < 1 for v in q4.values()) else (
                "streamsink" if all(v > 1 for v in q4.values()) else None)
            clauses.append(f"with the shipped 4-bit file ({label(d, Q4)})"
                           + (f", {faster} is faster at every stream count" if faster else "")
                           + ": " + _join([f"{ratio(q4[n])} at {_streams(n)}" for n in counts]))
        top = max(counts)
        mem = [(_run(d, n, top).get("memory") or {}).get("peak_rss_mib")
               for n in (_ours(d)[0], F32)]
        if not any(missing(m) for m in mem):
            clauses.append(f"peak server memory at {_streams(top)} {integer(mem[0])} MiB "
                           f"against {integer(mem[1])} MiB (RSS of the process tree)")
    return clauses


def headline_markdown(results: dict, doc: Doc) -> str:
    result = results.get(LOAD)
    if not result:
        return (f"*The comparison with llama.cpp's context shift ([{PAGE}]({doc.base}{PAGE})) "
                "has no full run recorded yet.*")
    d = result.data
    model = (d.get("model") or {}).get("checkpoint", "the same model")
    clauses = _same_weights_clauses(d) if has_peers(d) else _f32_clauses(d)
    probe = (d.get("long_prompt_probe") or {}).get(F32) or {}
    refused = (probe.get("plain") or {}).get("http_status")
    if refused and refused >= 400 and _slot(d):
        ok = [x for x in _runs(d) if _is_streamsink(d, x["system"]) and _ok(x)
              and x["prompt_tokens"] > _slot(d)]
        clauses.append(f"llama-server refuses a prompt longer than its {_slot(d):,}-token slot "
                       f"(HTTP {refused})"
                       + (f", streamsink streamed {max(x['prompt_tokens'] for x in ok):,}-token "
                          "prompts through its cache" if ok else ""))
    # The perplexities from the newest run that has them (it may be another run than the load's).
    pd = results[PPL].data if PPL in results else d
    pa = _args(pd)
    res = _ppl_results(pd)
    streaming = f"{pa.get('sink')}+{pa.get('window')}"
    shift = f"context shift keep {pa.get('sink')}, slot {_slot(pd)}"
    mine, theirs = (res.get(f"streamsink {streaming}") or {},
                    res.get(f"llama.cpp f32 {shift}") or {})
    mine_q4, theirs_q4 = (res.get(f"streamsink q4 {streaming}") or {},
                          res.get(f"llama.cpp q4_1 {shift}") or {})
    if "ppl" in mine and "ppl" in theirs:
        text = os.path.splitext(str((pd.get("ppl") or {}).get("text", "the text")))[0]
        clauses.append(f"perplexity on {mine['tokens']:,} tokens of {text}: {mine['ppl']:.2f} "
                       f"against {theirs['ppl']:.2f} with llama.cpp's context shift"
                       + (f" (q4: {mine_q4['ppl']:.2f} against {theirs_q4['ppl']:.2f} with Q4_1)"
                          if "ppl" in mine_q4 and "ppl" in theirs_q4 else ""))
    if not clauses:
        return f"*No comparison in [`{result.path}`]({doc.base}{result.path}) yet.*"
    return (f"Against llama.cpp's `llama-server` with context shift, on the same CPU "
            + (f"({model}): " if has_peers(d) else f"({model}; {label(d, F32)}): ")
            + "; ".join(clauses)
            + f". [More]({doc.base}{PAGE})" + (" (a smoke run)" if _quick_note(result) else "")
            + ".")


# ------------------------------------------------------------------------------ images

def _running_ppl(nlls: list[float], width: int) -> tuple[list[int], list[float]]:
    step = max(1, width // 4)
    xs = list(range(width, len(nlls) + 1, step))
    return xs, [math.exp(sum(nlls[x - width:x]) / width) for x in xs]


def _plain_log_labels(ax) -> None:
    """Tick labels 30, 40, 60, 100 on a log axis instead of 3×10¹ (minor ones only where the
    axis spans little, as matplotlib decides)."""
    from matplotlib.ticker import LogFormatter

    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def trace_images(results: dict, img_dir: str) -> list[str]:
    result = results.get(LOAD)
    traces = ((result.data.get("load") or {}).get("traces") or {}) if result else {}
    if not traces:
        return []
    d = result.data
    fig, (ax,) = plotting.figure(size=(9, 4))
    shifts: set[int] = set()
    for name in _system_names(d):
        tr = traces.get(name)
        if not tr:
            continue
        itl = [g * 1000 for g in tr["itl_s"]]
        # itl_s[i] is the gap before generated token i + 2
        ax.plot(range(2, len(itl) + 2), itl, label=label(d, name), linewidth=0.8)
        shifts.update(tr.get("shift_before_token") or [])
    for k in sorted(shifts):
        ax.axvline(k + 1, color="grey", linestyle=":", linewidth=0.9)
    ax.set(yscale="log", xlabel="generated token (dotted: llama.cpp context shift)",
           ylabel="inter-token latency (ms)", title="one stream, every token")
    _plain_log_labels(ax)
    plotting.save(fig, [ax], os.path.join(img_dir, TRACE_IMAGE))
    return [TRACE_IMAGE]


def ppl_images(results: dict, img_dir: str) -> list[str]:
    result = results.get(PPL)
    nlls = ((result.data.get("ppl") or {}).get("nlls") or {}) if result else {}
    if not any(len(v) >= PPL_WIDTH for v in nlls.values()):
        return []
    d = result.data
    fig, (ax,) = plotting.figure(size=(8, 4))
    for mode, values in nlls.items():
        if len(values) >= PPL_WIDTH:
            ax.plot(*_running_ppl(values, PPL_WIDTH), label=mode, linewidth=1)
    slot = _slot(d)
    if slot:
        ax.axvline(slot, color="grey", linestyle=":", linewidth=0.9, label="slot / cache full")
    ax.set(yscale="log", xlabel="token position",
           ylabel=f"perplexity of the last {PPL_WIDTH} tokens",
           title="running perplexity along the text")
    _plain_log_labels(ax)
    plotting.save(fig, [ax], os.path.join(img_dir, PPL_IMAGE))
    return [PPL_IMAGE]


# One renderer per block (report.py's interface: NAMES, markdown, optional images).
peer_load = types.SimpleNamespace(NAMES=(LOAD,), markdown=load_markdown, images=trace_images)
peer_goals = types.SimpleNamespace(NAMES=(LOAD,), markdown=goals_markdown)
peer_ppl = types.SimpleNamespace(NAMES=(PPL,), markdown=ppl_markdown, images=ppl_images)
peer_headline = types.SimpleNamespace(NAMES=(LOAD, PPL), markdown=headline_markdown)
