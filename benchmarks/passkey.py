"""Passkey retrieval: what a stream forgets. A 5-digit pass key is stated k tokens before the end
of a long filler text, and the prompt ends by asking for it ("What is the pass key? The pass key
is"); greedy decoding. streamsink (S sinks + W window) against stock vLLM with dense attention
over the same prompt, for k inside and beyond the window, a few keys per k.

A stream keeps only its sinks and its last W tokens, so once k > W the key is no longer in its
cache: the method cannot retrieve it (StreamingLLM extends how long a model runs, not how far
back it remembers). Dense attention can, if the model is able to; a small model may fail at long
range even densely. Recorded per prompt: the greedy answer, whether it is the key (exact match of
the five digits), and the log-probability of the key's first digit at the first answer step.

    .venv/bin/python benchmarks/passkey.py [--quick] [--distances K ...] [--trials N] [--model M]
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time

import common

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will ask you about it at the end.\n")
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
DIGITS = "0123456789"


class PromptBuilder:
    """Token-level prompts: INTRO, `lead` filler tokens, the needle, filler, the question, then
    the space that precedes a number (this tokenizer writes " 12345" as a space token and one
    token per digit, so the first answer token is the key's first digit)."""

    def __init__(self, tokenizer, filler: str, lead: int) -> None:
        self.tok = tokenizer
        self.lead = lead
        self.intro = self._ids(INTRO)
        self.question = self._ids(QUESTION)
        *space, self.first_digit_probe = self._ids(" 1")
        self.space = space
        self.digit_ids = [self._ids(d)[0] for d in DIGITS]
        for d, i in zip(DIGITS, self.digit_ids):
            if self._ids(" 9" + d)[-1] != i or len(self._ids(d)) != 1:
                raise SystemExit("passkey.py needs a tokenizer that writes one token per digit")
        self.filler = filler

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _filler(self, n: int) -> list[int]:
        if n <= 0:
            return []
        unit = self._ids(self.filler)
        return (unit * (n // len(unit) + 1))[:n]

    def build(self, key: str, distance: int) -> tuple[list[int], int]:
        """(prompt ids, needle distance): the needle's first token sits `distance` tokens
        before the prompt's end."""
        needle = self._ids(NEEDLE.format(key=key))
        tail = self.question + self.space
        between = distance - len(needle) - len(tail)
        if between < 0:
            raise SystemExit(f"distance {distance} is shorter than the needle and the question")
        ids = self.intro + self._filler(self.lead) + needle + self._filler(between) + tail
        return ids, len(ids) - (len(self.intro) + self.lead)


def book_filler(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return " " + " ".join(f.read()[20_000:200_000].split())


def run_engine(llm, prompts: list[dict], digit_ids: list[int], answer_tokens: int) -> tuple:
    """Greedy answers of every prompt, with the ten digits' log-probabilities at every answer
    step. Returns (per-prompt outputs, seconds)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=answer_tokens, temperature=0.0, detokenize=False,
                            logprob_token_ids=digit_ids)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p["ids"]} for p in prompts], params,
                        use_tqdm=False)
    return outs, time.perf_counter() - start


def score(prompt: dict, out, builder: PromptBuilder) -> dict:
    key = prompt["key"]
    gen = list(out.outputs[0].token_ids)
    digit_of = {i: d for d, i in zip(DIGITS, builder.digit_ids)}
    answer = "".join(digit_of.get(t, "?") for t in gen[:len(key)])
    steps = out.outputs[0].logprobs or []
    first = steps[0] if steps else {}
    want = builder.digit_ids[DIGITS.index(key[0])]
    digit_lp = {d: first[i].logprob for d, i in zip(DIGITS, builder.digit_ids) if i in first}
    ranked = sorted(digit_lp, key=lambda d: -digit_lp[d])
    return {"distance": prompt["distance"], "trial": prompt["trial"], "key": key,
            "prompt_tokens": len(prompt["ids"]), "generated_token_ids": gen,
            "generated_text": builder.tok.decode(gen), "answer_digits": answer,
            "exact_match": answer == key,
            "first_digit_logprob": first[want].logprob if want in first else None,
            "first_digit_rank_among_digits": ranked.index(key[0]) + 1 if digit_lp else None,
            "first_step_digit_logprobs": digit_lp,
            "first_step_token": gen[0] if gen else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--distances", type=int, nargs="+",
                        default=[200, 500, 900, 1500, 3000, 6000],
                        help="tokens from the needle to the end of the prompt")
    parser.add_argument("--trials", type=int, default=5, help="keys per distance")
    parser.add_argument("--lead", type=int, default=100, help="filler tokens before the needle")
    parser.add_argument("--filler", choices=("repeat", "book"), default="repeat",
                        help="repeated sentences (the usual passkey filler) or a book's text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", action="store_true",
                        help="both engines eager (quick start-up; outputs do not depend on it)")
    parser.add_argument("--quick", action="store_true",
                        help="distances 100 and 400, 2 keys each, 4+252 (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.distances, args.trials, args.window, args.lead = [100, 400], 2, 252, 20
    from transformers import AutoTokenizer

    from streamsink.model_store import resolve_model
    from streamsink.serving.engine import make_llm

    model = resolve_model(args.model)
    filler = (book_filler(os.path.join(common.SHARED_DATA, "katrine-14263.txt"))
              if args.filler == "book" else FILLER)
    builder = PromptBuilder(AutoTokenizer.from_pretrained(model), filler, args.lead)
    rng = random.Random(args.seed)
    prompts = []
    for distance in args.distances:
        for trial in range(args.trials):
            key = str(rng.randint(10_000, 99_999))
            ids, actual = builder.build(key, distance)
            prompts.append({"distance": actual, "trial": trial, "key": key, "ids": ids})
    longest = max(len(p["ids"]) for p in prompts)
    answer_tokens = 6
    engines = {
        # Dense attention over the whole prompt needs max_model_len >= its length.
        "stock": dict(streamsink=None, max_model_len=longest + answer_tokens + 16),
        f"streamsink {args.sink}+{args.window}": dict(
            streamsink={"sink_tokens": args.sink, "window_tokens": args.window}),
    }
    samples, seconds = [], {}
    for label, kwargs in engines.items():  # one engine at a time
        llm = make_llm(model, in_process=True, enable_prefix_caching=False,
                       **({"enforce_eager": True} if args.eager else {}), **kwargs)
        outs, seconds[label] = run_engine(llm, prompts, builder.digit_ids, answer_tokens)
        for prompt, out in zip(prompts, outs):
            samples.append({"engine": label, **score(prompt, out, builder)})
        print(f"{label}: {seconds[label]:.0f} s", flush=True)
        del llm
        gc.collect()

    rows = []
    for label in engines:
        for distance in args.distances:
            mine = [s for s in samples if s["engine"] == label and s["distance"] == distance]
            lps = [s["first_digit_logprob"] for s in mine if s["first_digit_logprob"] is not None]
            rows.append({"engine": label, "distance": distance, "trials": len(mine),
                         "exact_match_rate": sum(s["exact_match"] for s in mine) / len(mine),
                         "first_digit_logprob_mean": statistics.fmean(lps) if lps else None,
                         "first_digit_logprob_median": statistics.median(lps) if lps else None,
                         "in_window": distance <= args.window,
                         "prompt_tokens": max(s["prompt_tokens"] for s in mine)})
            print(f"{label:>22} k={distance:>5}: exact {rows[-1]['exact_match_rate']:.2f}, "
                  f"first digit log p {rows[-1]['first_digit_logprob_mean']:.2f}", flush=True)
    name = "passkey" + ("_quick" if args.quick else "")
    print("wrote", common.save(name, {
        "sink_tokens": args.sink, "window_tokens": args.window, "distances": args.distances,
        "trials": args.trials, "filler": args.filler, "lead_tokens": args.lead,
        "answer_tokens": answer_tokens, "seconds": seconds, "rows": rows, "samples": samples,
        "method": "greedy; distance = tokens from the needle's first token to the prompt's end; "
                  "both engines on the same prompts, one after the other"}, args))


if __name__ == "__main__":
    main()
