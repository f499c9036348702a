"""chat_session.py: a long chat through `streamsink serve`, prefix caching on and off."""
from __future__ import annotations

import os

from . import plotting
from .base import Doc, div, image, integer, no_result, percent, ratio, sci, source, table

NAMES = ("chat_session",)
IMAGE = "chat_session.png"


def shown_turns(count: int) -> list[int]:
    return sorted({t for t in (1, 5, 10, *range(20, count + 1, 10), count) if t <= count})


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("chat_session")
    if not result:
        return no_result("chat_session")
    d = result.data
    s, turns = d["summary"], d["per_turn"]
    by = {t["turn"]: t for t in turns}
    cols = shown_turns(len(turns))
    has_off = all("seconds_off" in t for t in turns)
    on_total = sum(t["seconds"] for t in turns)
    off_total = sum(t["seconds_off"] for t in turns) if has_off else None
    rows = [["prompt tokens"] + [integer(by[t]["prompt_tokens"]) for t in cols] + [""],
            ["cached tokens (caching on)"] + [integer(by[t]["cached_tokens"]) for t in cols]
            + [""],
            ["seconds, caching on"] + [f"{by[t]['seconds']:.1f}" for t in cols]
            + [f"{on_total:,.0f}"]]
    if has_off:
        rows.append(["seconds, caching off"] + [f"{by[t]['seconds_off']:.1f}" for t in cols]
                    + [f"{off_total:,.0f}"])
    later = [t["seconds"] for t in turns[1:]]
    share = [t["cached_share"] for t in turns]
    from_90 = next((t["turn"] for t in turns
                    if all(x["cached_share"] >= 0.9 for x in turns[t["turn"] - 1:])), None)
    facts = [f"turns 2–{len(turns)} with caching on: {min(later):.1f}–{max(later):.1f} s "
             f"(turn {len(turns)} / turn 5: {ratio(s.get('last_over_turn_5'))})",
             f"all turns, caching on / caching off: {ratio(div(on_total, off_total))}"
             if has_off else None,
             f"cached share of the prompt ≥ 90% from turn {from_90} on; lowest from turn 3: "
             f"{percent(min(share[2:]))}" if from_90 else None,
             f"answers equal with caching off: {s['answers_equal_off']}/{len(turns)} "
             f"(max \\|Δ log-probability\\| {sci(s.get('max_abs_dlogprob_off'))})"
             if "answers_equal_off" in s else None,
             f"re-scored token by token by an offline caching-off engine: max \\|Δ "
             f"log-probability\\| {sci(s['max_abs_dlogprob_rescored'])} "
             f"({s['sequences_rescored']} sequences)"
             if "max_abs_dlogprob_rescored" in s else None]
    return "\n\n".join([
        f"{s['turns']} turns of ~{s['user_tokens']} user tokens and {s['answer_tokens']} "
        f"generated tokens, streamsink {s['sink']}+{s['window']}.",
        table(["turn"] + [str(t) for t in cols] + [f"all {len(turns)} turns"], rows),
        "\n".join(f"- {f}" for f in facts if f),
        image(doc, IMAGE, "seconds per turn and cached share of the prompt"),
        source(result, doc)])


def images(results: dict, img_dir: str) -> list[str]:
    result = results.get("chat_session")
    if not result:
        return []
    d = result.data
    turns = d["per_turn"]
    xs = [t["turn"] for t in turns]
    fig, (left, right) = plotting.figure(2, size=(11, 4))
    left.plot(xs, [t["seconds"] for t in turns], "o-", label="prefix caching on")
    if all("seconds_off" in t for t in turns):
        left.plot(xs, [t["seconds_off"] for t in turns], "s-", label="prefix caching off")
    left.set(xlabel="turn", ylabel="seconds per turn (request wall time)",
             title=f"{len(turns)}-turn chat, {d['summary']['sink']}+{d['summary']['window']}")
    right.plot(xs, [100 * t["cached_share"] for t in turns], "o-",
               label="cached share of the prompt (caching on)")
    right.axhline(90, linestyle=":", color="gray", label="90%")
    right.set(xlabel="turn", ylabel="% of the prompt's tokens from the cache")
    plotting.save(fig, [left, right], os.path.join(img_dir, IMAGE))
    return [IMAGE]
