"""Streaming prefix caching in a real engine: multi-turn conversations continue from cached
blocks and give the same log-probabilities as a caching-off engine and the literal reference.

One caching-on engine runs every scenario, then one caching-off engine replays the same prompts.
Block size 32 with W = 60 (C = 64), rows of 512 tokens and steps of 128: the conversations run
past C and past max_model_len (rows rebase), decodes shadow cached blocks (the sink block too in
the first turns), a request continues another's history while that one still runs, a preempted
stream resumes from its own cached blocks, and the pool is small enough that sessions running
side by side evict each other's cached blocks.
"""
import gc
import math

import pytest
from conftest import compute_references, random_tokens, tiny_engine

SINK, WINDOW, BLOCK = 4, 60, 32
MAX_MODEL_LEN, CHUNK = 512, 128
PAGE = 2 * 2 * 2 * BLOCK * 64 * 4    # layers x (K, V) x KV heads x block x head_dim x fp32
POOL_BLOCKS = 32
TURNS, USER, GEN = 7, 50, 24         # history 7 x 74 = 518 tokens > max_model_len
SESSIONS, SESSION_TURNS = 6, 3
TOLERANCE = 1e-3


def engine(tiny_llama, caching: bool):
    return tiny_engine(tiny_llama, {"sink_tokens": SINK, "window_tokens": WINDOW},
                       block_size=BLOCK, max_model_len=MAX_MODEL_LEN,
                       max_num_batched_tokens=CHUNK, kv_cache_memory_bytes=POOL_BLOCKS * PAGE,
                       enable_prefix_caching=caching)


def params(max_tokens=GEN):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, detokenize=False,
                          ignore_eos=True)


def result(out):
    tokens = list(out.outputs[0].token_ids)
    return tokens, [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]


def generate(llm, prompts, max_tokens=None):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params(n) for n in (max_tokens or [GEN] * len(prompts))],
                        use_tqdm=False)
    return [result(o) for o in outs], [o.num_cached_tokens for o in outs]


def internals(llm):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return scheduler, manager, scheduler.kv_cache_manager.block_pool


def chat(llm, turns=TURNS, seed=100):
    """One session, turn by turn; returns the prompts, (tokens, logprobs) and cached counts."""
    history, prompts, results, cached = [], [], [], []
    for t in range(turns):
        prompt = history + random_tokens(USER, seed=seed + t)
        (res,), (hit,) = generate(llm, [prompt])
        prompts.append(prompt)
        results.append(res)
        cached.append(hit)
        history = prompt + res[0]
    return prompts, results, cached


def concurrent(llm):
    """A decodes; B arrives with A's processed history while A keeps decoding (and shadowing)
    over it; later A is preempted and resumes from its own cached blocks. Returns the prompts,
    their max_tokens and results, B's cached tokens and the hit A resumed with."""
    import time

    engine_ = llm.llm_engine
    scheduler, _, _ = internals(llm)
    a_prompt = random_tokens(150, seed=7)
    engine_.add_request("A", {"prompt_token_ids": a_prompt}, params(80))
    finished, b_prompt, resumed_hit = {}, None, []
    lookup = scheduler.kv_cache_manager.get_computed_blocks

    def spy(request):
        blocks, hit, boundary = lookup(request)
        if request.num_preemptions:
            resumed_hit.append(hit)
        return blocks, hit, boundary

    scheduler.kv_cache_manager.get_computed_blocks = spy
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            generated = len(out.outputs[0].token_ids)
            if out.request_id == "A" and b_prompt is None and generated >= 20:
                b_prompt = a_prompt + list(out.outputs[0].token_ids) + random_tokens(30, seed=8)
                engine_.add_request("B", {"prompt_token_ids": b_prompt}, params(40))
            if out.request_id == "A" and generated == 50:
                # What the scheduler does when the pool runs dry (it picks the victim).
                victim = next(r for r in scheduler.running if r.request_id.startswith("A"))
                scheduler.running.remove(victim)
                scheduler._preempt_request(victim, time.monotonic())
            if out.finished:
                finished[out.request_id] = (result(out), out.num_cached_tokens)
    scheduler.kv_cache_manager.get_computed_blocks = lookup
    return ([a_prompt, b_prompt], [80, 40], [finished["A"][0], finished["B"][0]],
            finished["B"][1], resumed_hit)


def sessions(llm):
    """SESSIONS conversations side by side (one step loop): each turn of every session is
    submitted when that session's previous turn finished."""
    engine_ = llm.llm_engine
    _, manager, _ = internals(llm)
    history = {s: [] for s in range(SESSIONS)}
    turn = {s: 0 for s in range(SESSIONS)}
    prompts, results, cached, max_held = {}, {}, {}, 0

    def submit(s):
        prompt = history[s] + random_tokens(USER, seed=1000 + 10 * s + turn[s])
        prompts[(s, turn[s])] = prompt
        engine_.add_request(f"s{s}t{turn[s]}", {"prompt_token_ids": prompt}, params())

    for s in range(SESSIONS):
        submit(s)
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            if not out.finished:
                continue
            s, t = (int(x) for x in out.request_id[1:].split("t"))
            results[(s, t)] = result(out)
            cached[(s, t)] = out.num_cached_tokens
            history[s] = prompts[(s, t)] + results[(s, t)][0]
            turn[s] += 1
            if turn[s] < SESSION_TURNS:
                submit(s)
        for req_id in list(manager.req_to_blocks):
            max_held = max(max_held, manager.held_blocks(req_id))
    return prompts, results, cached, max_held


@pytest.fixture(scope="module")
def runs(tiny_llama):
    from streamsink.prefix_cache import StreamingPrefixCache
    from streamsink.row_window import rows_of

    on = engine(tiny_llama, caching=True)
    scheduler, manager, pool = internals(on)
    got = {"pool_blocks": pool.num_gpu_blocks}
    counts = {}

    def count(name, before):
        counts[name] = {k: getattr(manager.cache, k) - v for k, v in before.items()}

    totals = ("shadow_copies_total", "adopt_copies_total", "unhashed_total")
    snap = {k: getattr(manager.cache, k) for k in totals}
    got["chat"] = chat(on)
    count("chat", snap)
    runner = on.llm_engine.model_executor.driver_worker.worker.model_runner
    got["rebases"] = rows_of(runner.input_batch).rebases

    # Prompt log-probabilities read on top of the cache (prompt_logprobs alone skips it).
    from vllm import SamplingParams

    prompts, results, _ = got["chat"]
    probe = prompts[-1] + results[-1][0] + random_tokens(40, seed=9)
    out = on.generate([{"prompt_token_ids": probe}],
                      SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                     skip_reading_prefix_cache=False), use_tqdm=False)[0]
    got["probe"] = (probe, out.num_cached_tokens,
                    {t: out.prompt_logprobs[t][probe[t]].logprob
                     for t in range(out.num_cached_tokens + 1, len(probe))})

    snap = {k: getattr(manager.cache, k) for k in totals}
    got["concurrent"] = concurrent(on)
    count("concurrent", snap)

    got["sessions"] = sessions(on)

    got["pool_after"] = dict(
        free=pool.get_num_free_blocks(),
        referenced=[b.block_id for b in pool.blocks if not b.is_null and b.ref_cnt],
        held=manager.held_blocks_all(), requests=len(manager.req_to_blocks),
        cached=len(pool.cached_block_hash_to_block),
        pending=len(manager._pending_cow_copies) + len(manager.cache._scheduled))

    # Negative control: the same prompts with the copy-before-shadow turned off.
    assert on.reset_prefix_cache()
    protect = StreamingPrefixCache.protect_from_shadows
    StreamingPrefixCache.protect_from_shadows = lambda self: self._scheduled.clear()
    try:
        got["unprotected"] = [generate(on, [p])[0][0] for p in prompts[:4]]
    finally:
        StreamingPrefixCache.protect_from_shadows = protect
    got["counts"] = counts
    del on
    gc.collect()

    off = engine(tiny_llama, caching=False)
    assert not internals(off)[0].kv_cache_manager.enable_caching
    got["off_chat"] = generate(off, prompts)[0]
    got["off_concurrent"] = generate(off, *got["concurrent"][:2])[0]
    s_prompts = got["sessions"][0]
    keys = sorted(s_prompts)
    got["off_sessions"] = dict(zip(keys, generate(off, [s_prompts[k] for k in keys])[0]))
    del off
    gc.collect()
    got["reference"] = compute_references([(tiny_llama, probe, SINK, WINDOW)])[0]
    return got


def max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_every_turn_matches_caching_off_and_the_reference(runs):
    prompts, results, _ = runs["chat"]
    nll = runs["reference"]                     # NLL of token t+1 given tokens <= t
    for t, ((tokens, logprobs), off) in enumerate(zip(results, runs["off_chat"])):
        assert tokens == off[0], t
        assert max_diff(logprobs, off[1]) < TOLERANCE, t
        start = len(prompts[t])
        assert runs["probe"][0][start:start + GEN] == tokens
        want = [-x for x in nll[start - 1:start - 1 + GEN]]
        assert max_diff(logprobs, want) < TOLERANCE, t
    assert len(prompts[-1]) + GEN > MAX_MODEL_LEN and runs["rebases"] >= 1


def test_a_turn_prefills_only_its_new_tokens(runs):
    prompts, _, cached = runs["chat"]
    assert cached[0] == 0
    for t in range(1, TURNS):
        processed = len(prompts[t - 1]) + GEN - 1        # the last sampled token: not computed
        assert cached[t] == processed // BLOCK * BLOCK, (t, cached)
        assert len(prompts[t]) - cached[t] <= USER + BLOCK
    # The previous turns' decodes shadowed cached blocks (the sink block in the first turns):
    # the cache kept clean copies, which these turns read.
    assert runs["counts"]["chat"]["shadow_copies_total"] > 0


def test_prompt_logprobs_read_on_top_of_the_cache(runs):
    probe, hit, logprobs = runs["probe"]
    assert hit >= len(probe) - 40 - BLOCK
    nll = runs["reference"]
    assert len(logprobs) == len(probe) - hit - 1
    assert max(abs(-lp - nll[t - 1]) for t, lp in logprobs.items()) < TOLERANCE


def test_continuing_a_running_requests_history_copies_its_blocks(runs):
    (a_prompt, _), _, results, b_cached, _ = runs["concurrent"]
    assert b_cached >= len(a_prompt) + 20 - BLOCK - 1
    assert runs["counts"]["concurrent"]["adopt_copies_total"] > 0
    for (tokens, logprobs), off in zip(results, runs["off_concurrent"]):
        assert tokens == off[0]
        assert max_diff(logprobs, off[1]) < TOLERANCE


def test_a_preempted_stream_resumes_from_its_cached_blocks(runs):
    (a_prompt, _), _, _, _, resumed_hit = runs["concurrent"]
    # Preempted after 50 generated tokens: everything processed was hashed when it was freed.
    assert resumed_hit and resumed_hit[0] >= len(a_prompt) + 49 - BLOCK


def test_sessions_side_by_side_under_pool_pressure(runs):
    prompts, results, cached, max_held = runs["sessions"]
    assert len(results) == SESSIONS * SESSION_TURNS
    for key, (tokens, logprobs) in results.items():
        off = runs["off_sessions"][key]
        assert tokens == off[0], key
        assert max_diff(logprobs, off[1]) < TOLERANCE, key
    later = [(s, t) for s in range(SESSIONS) for t in range(1, SESSION_TURNS)]
    assert any(cached[k] > 0 for k in later)
    # The pool recycled cached blocks: some turns found less than their processed history.
    full = {(s, t): (len(prompts[(s, t - 1)]) + GEN - 1) // BLOCK * BLOCK for s, t in later}
    assert any(cached[k] < full[k] for k in later)
    # The per-stream bound (docs/architecture.md §2), hits included.
    bound = math.ceil(SINK / BLOCK) + math.ceil((SINK + WINDOW - 1 + CHUNK) / BLOCK) + 1
    assert max_held <= bound


def test_pool_accounting_with_cached_blocks(runs):
    after = runs["pool_after"]
    assert after["free"] == runs["pool_blocks"] - 1      # cached blocks count as free
    assert after["referenced"] == [] and after["held"] == 0 and after["requests"] == 0
    assert after["cached"] > 0 and after["pending"] == 0


def test_sharing_a_shadowed_block_would_change_the_outputs(runs):
    """Negative control: with the copy before the first shadow turned off, later turns read
    the previous turn's shadows, and the outputs leave the caching-off engine's."""
    worst = 0.0
    for (tokens, logprobs), off in zip(runs["unprotected"], runs["off_chat"]):
        if tokens != off[0]:
            worst = math.inf
            break
        worst = max(worst, max_diff(logprobs, off[1]))
    assert worst > TOLERANCE
