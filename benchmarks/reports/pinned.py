"""pinned_cost.py, pinned_chat.py, pinned_sharing.py: pinning a request's system prompt
(docs/pinned_prompt.md) — what a pinned range costs a decode step against sink shadows, whether
the model still follows its system prompt far past the window, and the memory of chats sharing
one pinned prompt."""
from __future__ import annotations

import os
from types import SimpleNamespace

from . import plotting
from .base import Doc, image, integer, ms, no_result, num, ratio, source, table

COST_IMAGE = "pinned_cost.png"
CHAT_IMAGE = "pinned_chat.png"
MIB = 2 ** 20


def _cost_markdown(results: dict, doc: Doc) -> str:
    result = results.get("pinned_cost")
    if not result:
        return no_result("pinned_cost")
    data = result.data
    rows = [[integer(r["pinned_tokens"]), integer(r["cache_tokens"]),
             ms(r["shadows_ms_per_step"]), ms(r["pinned_ms_per_step"]),
             ratio(r["pinned_over_shadows"], 3)] for r in data["rows"]]
    verdict = _cost_verdict(data["rows"])
    return "\n\n".join([
        f"Decode step past C, batch {data['batch']}, window {data['window_tokens']:,}, median "
        f"of {data['steps']} steps each, the two engines' steps alternating in one process.",
        table(["pinned tokens P", "C = P + W", "S = P (kernel + P shadows), ms/step",
               "pin_tokens = P (pinned range), ms/step", "pinned / shadows"], rows),
        verdict,
        image(doc, COST_IMAGE, "decode step time against pinned tokens"),
        source(result, doc)])


# Ratios within this of 1 count as a tie: step medians of one run vary by about that much.
TIE = 0.03


def _cost_verdict(rows: list[dict]) -> str:
    """Where each way is faster, from the measured ratios (pinned / shadows)."""
    def pins(group):
        return ", ".join(f"{r['pinned_tokens']:,}" for r in group)

    def span(group, digits=2):
        ratios = sorted(r["pinned_over_shadows"] for r in group)
        return ratio(ratios[0], digits) if len(ratios) == 1 else \
            f"{ratio(ratios[0], digits)}–{ratio(ratios[-1], digits)}"

    slower = [r for r in rows if r["pinned_over_shadows"] > 1 + TIE]
    tied = [r for r in rows if abs(r["pinned_over_shadows"] - 1) <= TIE]
    faster = [r for r in rows if r["pinned_over_shadows"] < 1 - TIE]
    said = []
    if slower:
        said.append(f"at P = {pins(slower)} the kernel with shadows is faster (the pinned range "
                    f"costs {span(slower)} its step)")
    if tied:
        said.append(f"at P = {pins(tied)} the two are within {TIE:.0%} ({span(tied, 3)})")
    if faster:
        said.append(f"at P = {pins(faster)} the pinned range is faster ({span(faster)})")
    return "Measured: " + "; ".join(said) + "."


def _cost_images(results: dict, img_dir: str) -> list[str]:
    result = results.get("pinned_cost")
    if not result:
        return []
    rows = result.data["rows"]
    pins = [r["pinned_tokens"] for r in rows]
    fig, (ax,) = plotting.figure()
    ax.plot(pins, [r["shadows_ms_per_step"] for r in rows], marker="o",
            label="engine S = P: kernel + P shadow copies a step")
    ax.plot(pins, [r["pinned_ms_per_step"] for r in rows], marker="o",
            label="request pin_tokens = P: pinned range merged by log-sum-exp")
    ax.set(xlabel="pinned tokens P", ylabel="ms per decode step",
           title=f"Decode step past C (batch {result.data['batch']}, "
                 f"W = {result.data['window_tokens']:,})")
    ax.set_xscale("symlog", linthresh=64)
    ax.set_xticks(pins, [str(p) for p in pins])
    ax.minorticks_off()
    plotting.save(fig, [ax], os.path.join(img_dir, COST_IMAGE))
    return [COST_IMAGE]


def _chat_markdown(results: dict, doc: Doc) -> str:
    result = results.get("pinned_chat")
    if not result:
        return no_result("pinned_chat")
    data = result.data
    rows = [[str(p["turns"]), integer(p["pin_system"]["prompt_tokens"]),
             num(p["pin_system"]["answer_logprob"], 2), num(p["no_pin"]["answer_logprob"], 2)]
            for p in data["points"]]
    answers = data["last_turn_answers"]
    last = data["points"][-1]["turns"]
    return "\n\n".join([
        f"System prompt ({data['pinned_tokens']} tokens as rendered, all pinned with "
        f"`\"pin\": \"system\"`): *{data['system_prompt']}* Then book passages of "
        f"~{data['passage_tokens']} tokens as user and assistant turns, and the question "
        f"*{data['question']}* Engine {data['sink_tokens']} + {data['window_tokens']:,}. "
        f"Log-probability (natural log) of the answer *{data['answer']}* "
        f"({data['answer_tokens']} tokens):",
        table(["turn", "prompt tokens", "log P(answer), pin: system",
               "log P(answer), no pin"], rows),
        f"Answers generated at turn {last} (greedy):\n\n"
        f"- `pin: system`: “{answers['pin_system'].strip()}”\n"
        f"- no pin: “{answers['no_pin'].strip()}”",
        image(doc, CHAT_IMAGE, "log-probability of the rule-following answer by turn"),
        source(result, doc)])


def _chat_images(results: dict, img_dir: str) -> list[str]:
    result = results.get("pinned_chat")
    if not result:
        return []
    points = result.data["points"]
    turns = [p["turns"] for p in points]
    fig, (ax,) = plotting.figure()
    for way, label in (("pin_system", "\"pin\": \"system\""), ("no_pin", "no pin (4 sinks)")):
        ax.plot(turns, [p[way]["answer_logprob"] for p in points], marker="o", label=label)
    ax.set(xlabel="turn", ylabel="log P(rule-following answer)",
           title=f"\"{result.data['answer']}\" after t turns "
                 f"(cache {result.data['sink_tokens'] + result.data['window_tokens']:,})")
    plotting.save(fig, [ax], os.path.join(img_dir, CHAT_IMAGE))
    return [CHAT_IMAGE]


def _sharing_markdown(results: dict, doc: Doc) -> str:
    result = results.get("pinned_sharing")
    if not result:
        return no_result("pinned_sharing")
    data = result.data
    runs = data["runs"]
    rows = []
    for label, what in (("shared", "prefix caching on: pinned blocks shared"),
                        ("not_shared", "prefix caching off: a copy per chat")):
        run = runs[label]
        rows.append([what, integer(run["peak_used_blocks"]),
                     integer(round(run["peak_used_blocks"] * run["block_bytes"] / MIB)),
                     num(run["peak_used_blocks"] / data["chats"], 1),
                     integer(run["pinned_blocks_at_peak"]),
                     integer(run["pinned_block_refs_at_peak"])])
    saved = runs["not_shared"]["peak_used_blocks"] / runs["shared"]["peak_used_blocks"]
    return "\n\n".join([
        f"{data['chats']} chats pinning the same {data['system_prompt_tokens']:,}-token system "
        f"prompt, each with a {data['user_tokens']}-token user turn of its own and "
        f"{data['new_tokens']} generated tokens, streaming together; KV blocks used at the peak "
        "(read from the block pool after every step; a shared block counts once):",
        table(["run", "peak blocks used", "MiB", "blocks a chat", "distinct pinned blocks",
               "pinned blocks summed over chats"], rows),
        f"Without sharing the same chats take {ratio(saved, 2)} the memory.",
        source(result, doc)])


# One renderer object a block (reports/__init__.py).
pinned_cost = SimpleNamespace(NAMES=("pinned_cost",), markdown=_cost_markdown,
                              images=_cost_images)
pinned_chat = SimpleNamespace(NAMES=("pinned_chat",), markdown=_chat_markdown,
                              images=_chat_images)
pinned_sharing = SimpleNamespace(NAMES=("pinned_sharing",), markdown=_sharing_markdown)
