"""The KV memory of 64 chats that pin the same ~1,000-token system prompt
({"streamsink": {"pin": "system"}}), with the pinned blocks shared through prefix caching and
without (prefix caching off: each chat its own copy), measured from the engine's block pool.

Each chat: the system prompt, a ~300-token user turn of its own, 64 generated tokens (greedy).
As on a server whose system prompt is already cached, one chat runs first until its system
prompt is processed; then the other 63 join and all 64 stream together. After every engine step
the pool's used blocks (held by any request; a shared block once) and the pinned-block gauges
are read; the peak is reported.

    .venv/bin/python benchmarks/pinned_sharing.py [--chats 64] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import time

import common

USER_TOKENS, NEW_TOKENS = 300, 64


def book_text(tokenizer, start: int, tokens: int) -> str:
    """Tokens start..start+tokens of a book (a synthetic text without ../shared/data)."""
    ids = common.book_ids(tokenizer, "log-school-house-14881.txt", 10_000,
                          "Rule {i}: keep the school house tidy and the stove lit.",
                          start + tokens)
    return tokenizer.decode(ids[start:start + tokens]).strip()


def run(llm, conversations: list[list[dict]]) -> dict:
    from vllm import SamplingParams

    from streamsink.serving.engine import scheduler_of

    engine = llm.llm_engine
    manager = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers[0]
    pool = manager.block_pool
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                            detokenize=False, extra_args={"streamsink": {"pin": "system"}})
    # vllm.LLM.chat's own path (its "pin": "system" carries the system messages), queued
    # without running: the first chat alone, then the rest.
    used, pinned, refs = [], [], []
    start = time.perf_counter()

    def step():
        engine.step()
        used.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        pinned.append(len(manager.cache.pin_holders))
        refs.append(sum(len(h) for h in manager.cache.pin_holders.values()))

    llm.enqueue_chat(conversations[:1], params, use_tqdm=False)
    system_blocks = 0
    while engine.has_unfinished_requests() and not system_blocks:
        step()
        system_blocks = max((manager.num_cached_block.get(r, 0)
                             for r in manager.req_to_blocks), default=0) >= 7
    llm.enqueue_chat(conversations[1:], params, use_tqdm=False)
    while engine.has_unfinished_requests():
        step()
    peak = max(range(len(used)), key=used.__getitem__)
    return {"peak_used_blocks": used[peak], "pinned_blocks_at_peak": pinned[peak],
            "pinned_block_refs_at_peak": refs[peak], "seconds": time.perf_counter() - start,
            "used_blocks_by_step": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 chats")
    args = parser.parse_args()
    chats = 4 if args.quick else args.chats
    from transformers import AutoTokenizer

    from streamsink.kv_budget import block_bytes
    from streamsink.model_store import resolve_model
    from streamsink.request_options import common_prefix
    from streamsink.serving.engine import make_llm

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    system = ("You are the school house assistant. Follow these rules in every answer.\n\n"
              + book_text(tokenizer, 0, args.system_tokens - 20))
    conversations = [[{"role": "system", "content": system},
                      {"role": "user", "content": book_text(tokenizer, 5000 + 400 * i,
                                                            USER_TOKENS)}]
                     for i in range(chats)]
    rendered = tokenizer.apply_chat_template(conversations[0][:1], tokenize=True)
    system_ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    full = tokenizer.apply_chat_template(conversations[0], tokenize=True,
                                         add_generation_prompt=True)
    pinned_tokens = common_prefix(system_ids, full["input_ids"] if hasattr(full, "keys")
                                  else full)
    runs = {}
    for label, caching in (("shared", True), ("not_shared", False)):
        llm = make_llm(args.model, streamsink={"sink_tokens": 4, "window_tokens": 1020,
                                               "max_pinned_tokens": 1024},
                       in_process=True, max_num_seqs=chats, enable_prefix_caching=caching,
                       kv_cache_memory_bytes=6 << 30, enforce_eager=True)
        runs[label] = run(llm, conversations)
        runs[label]["block_bytes"] = block_bytes(llm.llm_engine.vllm_config)
        runs[label]["prefix_caching"] = caching
        print(f"{label}: peak {runs[label]['peak_used_blocks']} blocks "
              f"({runs[label]['peak_used_blocks'] * runs[label]['block_bytes'] / 2**20:.0f} "
              f"MiB), {runs[label]['seconds']:.0f} s", flush=True)
        del llm
        gc.collect()
    path = common.save("pinned_sharing", {
        "chats": chats, "system_prompt_tokens": pinned_tokens, "user_tokens": USER_TOKENS,
        "new_tokens": NEW_TOKENS, "sink_tokens": 4, "window_tokens": 1020, "runs": runs,
        "method": "vllm.LLM (in process, eager), chats queued with enqueue_chat and "
                  "{'streamsink': {'pin': 'system'}}; one chat first until its system prompt "
                  "is processed, then the rest; pool used blocks (ref count > 0) read after "
                  "every step; prefix caching on (shared) and off (each chat its own copy)"},
        args)
    print("wrote", path)


if __name__ == "__main__":
    main()
