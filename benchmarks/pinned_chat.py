"""Does the model still follow its system prompt far past the window? A chat whose system prompt
gives the assistant a name, continued with book passages for up to 40 turns (the history soon
several times the 1,024-token cache), then asked "What is your name?".

Measured on the default model (4 + 1,020, vllm.LLM.chat, the same requests with and without
{"streamsink": {"pin": "system"}}):
- the log-probability of the rule-following answer ("My name is <name>.") after t turns,
  t = 1, 5, ..., 40: the answer's tokens scored as the end of the prompt (prompt
  log-probabilities), so each point is the exact streaming computation of that conversation;
- the answer the model generates at the last turn (greedy), both ways.
Without a pin the system prompt leaves the cache after ~10 turns and only the 4 sinks stay; with
"pin": "system" every token of it stays visible, at in-cache positions 0..P-1.

    .venv/bin/python benchmarks/pinned_chat.py [--turns 40] [--quick]
"""
from __future__ import annotations

import argparse
import time

import common

NAME = "Zorblax"
SYSTEM = (f"You are {NAME}, the lighthouse keeper's assistant. Your name is {NAME}. Whenever "
          f"anyone asks for your name, you answer exactly: My name is {NAME}.")
QUESTION = "Before we go on: what is your name?"
ANSWER = f"My name is {NAME}."
PASSAGE_TOKENS = 90


def passages(tokenizer, count: int) -> list[str]:
    """Consecutive passages of a book (a synthetic story without ../shared/data)."""
    ids = common.book_ids(tokenizer, "katrine-14263.txt", 20_000,
                          "Sentence {i} of a story about a lighthouse keeper and the sea.",
                          count * PASSAGE_TOKENS)
    return [tokenizer.decode(ids[t * PASSAGE_TOKENS:(t + 1) * PASSAGE_TOKENS]).strip()
            for t in range(count)]


def conversation(story: list[str], turns: int) -> list[dict]:
    """System prompt, turns-1 exchanges about the story, then the question."""
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turns - 1):
        messages.append({"role": "user", "content": "Read on: " + story[2 * t]})
        messages.append({"role": "assistant", "content": story[2 * t + 1]})
    messages.append({"role": "user", "content": QUESTION})
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="smoke run: turns 1 and 6")
    args = parser.parse_args()
    checkpoints = [1, 6] if args.quick else sorted({1, *range(5, args.turns + 1, 5), args.turns})
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from streamsink.model_store import resolve_model
    from streamsink.request_options import common_prefix
    from streamsink.serving.engine import make_llm

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    story = passages(tokenizer, 2 * max(checkpoints))
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    llm = make_llm(args.model, streamsink={"sink_tokens": 4, "window_tokens": 1020,
                                           "max_pinned_tokens": 256},
                   enable_prefix_caching=False, max_num_seqs=4, enforce_eager=True)
    ways = {"pin_system": {"pin": "system"}, "no_pin": None}
    points = []
    for turns in checkpoints:
        messages = conversation(story, turns)
        scored = messages + [{"role": "assistant", "content": ANSWER}]
        row = {"turns": turns}
        for way, options in ways.items():
            extra = {"streamsink": options} if options else None
            start = time.perf_counter()
            out = llm.chat(scored, SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                  extra_args=extra),
                           continue_final_message=True, add_generation_prompt=False,
                           use_tqdm=False)[0]
            prompt = list(out.prompt_token_ids)
            # The answer's tokens end the prompt (continue_final_message: no end-of-turn).
            assert prompt[-len(answer_ids):] == answer_ids, "answer tokenized differently"
            first = len(prompt) - len(answer_ids)
            logprob = sum(out.prompt_logprobs[t][prompt[t]].logprob
                          for t in range(first, len(prompt)))
            row[way] = {"answer_logprob": logprob, "prompt_tokens": len(prompt),
                        "seconds": time.perf_counter() - start}
        print(f"turn {turns:>3}: {row['pin_system']['prompt_tokens']:>5} tokens, log P(answer) "
              f"pinned {row['pin_system']['answer_logprob']:.2f}, unpinned "
              f"{row['no_pin']['answer_logprob']:.2f}", flush=True)
        points.append(row)
    last = conversation(story, checkpoints[-1])
    answers = {}
    for way, options in ways.items():
        extra = {"streamsink": options} if options else None
        out = llm.chat(last, SamplingParams(max_tokens=24, temperature=0, extra_args=extra),
                       use_tqdm=False)[0]
        answers[way] = out.outputs[0].text
        print(f"{way}: {answers[way]!r}")
    # What "pin": "system" pins (request_options.resolve_options): the system rendering's
    # common prefix with the prompt.
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}],
                                             tokenize=True)
    system_ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    full = tokenizer.apply_chat_template(last, tokenize=True, add_generation_prompt=True)
    pinned = common_prefix(system_ids, full["input_ids"] if hasattr(full, "keys") else full)
    path = common.save("pinned_chat", {
        "system_prompt": SYSTEM, "question": QUESTION, "answer": ANSWER,
        "answer_tokens": len(answer_ids), "sink_tokens": 4, "window_tokens": 1020,
        "passage_tokens": PASSAGE_TOKENS, "points": points, "last_turn_answers": answers,
        "pinned_tokens": pinned,
        "method": "vllm.LLM.chat on one streaming engine (4 + 1020, eager), each checkpoint "
                  "a fresh request of the whole conversation (prefix caching off): the "
                  "answer's log-probability from prompt log-probabilities, with and without "
                  "{'streamsink': {'pin': 'system'}}; the last turn's answer generated greedily"},
        args)
    print("wrote", path)


if __name__ == "__main__":
    main()
