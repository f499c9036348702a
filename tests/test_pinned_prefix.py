"""Per-request pinned prefixes and windows (request_options.py) in a real engine: a mixed batch
of requests with different pins and windows streams exactly (against the reference with S = P,
W = W_r), requests pinning the same prefix hold one copy of it, bad options are refused, and
each output tells its stream state (streamsink.stream_state)."""
import gc

import pytest
from conftest import compute_references, random_tokens, tiny_engine

SINK, WINDOW, MAX_PINNED, CHUNK = 4, 60, 300, 64
TOLERANCE = 1e-3  # fp32 engine vs float64 reference (test_streaming_exactness.py)

# (name, options or None, prompt length): in one generate call, chunked by CHUNK, so steps mix
# requests of every shape; lengths several times each request's P + W_r.
PROMPT_CASES = [
    ("engine", None, 400),
    ("dense", None, 50),                        # a stock-shaped request, dense throughout
    ("pin150", {"pin_tokens": 150}, 520),         # pinned across a block boundary (B = 128)
    ("pin40w20", {"pin_tokens": 40, "window_tokens": 20}, 300),
    ("pin0w50", {"pin_tokens": 0, "window_tokens": 50}, 260),   # a plain window
    ("pin256w1", {"pin_tokens": 256, "window_tokens": 1}, 330),  # whole blocks, no history
    ("w30", {"window_tokens": 30}, 200),         # the engine's sinks, a narrower window
]
# Decoding past each request's own C (pinned requests: the PyTorch path, beside the kernel's
# shadowed decodes of the engine-shaped one): (name, options, prompt length).
DECODE_CASES = [("engine", None, 150), ("pin100w40", {"pin_tokens": 100, "window_tokens": 40}, 160),
                ("pin10", {"pin_tokens": 10}, 90)]
NEW_TOKENS = 120


def shape_of(options):
    options = options or {}
    return options.get("pin_tokens", SINK), options.get("window_tokens", WINDOW)


def params_for(options, **kwargs):
    from vllm import SamplingParams

    extra = {"streamsink": options} if options is not None else None
    return SamplingParams(extra_args=extra, detokenize=False, **kwargs)


def internal(manager, name: str) -> str | None:
    """The scheduler's id of request `name` (vLLM may suffix the ids it is given)."""
    return next((r for r in manager.req_to_blocks if r == name or r.startswith(name + "-")),
                None)


def kv_internals(llm):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return manager, scheduler.kv_cache_manager.block_pool


@pytest.fixture(scope="module")
def engine(tiny_llama):
    llm = tiny_engine(tiny_llama, {"sink_tokens": SINK, "window_tokens": WINDOW,
                                   "max_pinned_tokens": MAX_PINNED},
                      max_num_batched_tokens=CHUNK, max_model_len=1024)
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def prompts_and_decodes(engine, tiny_llama):
    """Both mixed batches, and the references of all their streams (computed meanwhile)."""
    prompts = [random_tokens(n, seed=i) for i, (_, _, n) in enumerate(PROMPT_CASES)]
    outs = engine.generate([{"prompt_token_ids": p} for p in prompts],
                           [params_for(o, max_tokens=1, prompt_logprobs=0)
                            for _, o, _ in PROMPT_CASES], use_tqdm=False)
    got = [[-o.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
           for o, ids in zip(outs, prompts)]
    decode_prompts = [random_tokens(n, seed=50 + i) for i, (_, _, n) in enumerate(DECODE_CASES)]
    outs = engine.generate([{"prompt_token_ids": p} for p in decode_prompts],
                           [params_for(o, max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
                                       ignore_eos=True) for _, o, _ in DECODE_CASES],
                           use_tqdm=False)
    decoded = []
    for o in outs:
        tokens = list(o.outputs[0].token_ids)
        decoded.append((tokens, [-lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                   tokens)]))
    jobs = [(tiny_llama, p, *shape_of(o)) for p, (_, o, _) in zip(prompts, PROMPT_CASES)]
    jobs += [(tiny_llama, p + tokens, *shape_of(o))
             for p, (tokens, _), (_, o, _) in zip(decode_prompts, decoded, DECODE_CASES)]
    refs = compute_references(jobs)
    return got, refs[:len(PROMPT_CASES)], decoded, decode_prompts, refs[len(PROMPT_CASES):]


@pytest.mark.parametrize("case", range(len(PROMPT_CASES)), ids=[c[0] for c in PROMPT_CASES])
def test_mixed_batch_prompts_are_exact(prompts_and_decodes, case):
    got, refs, *_ = prompts_and_decodes
    assert len(got[case]) == len(refs[case])
    worst = max(abs(a - b) for a, b in zip(got[case], refs[case]))
    assert worst < TOLERANCE, (PROMPT_CASES[case], worst)


@pytest.mark.parametrize("case", range(len(DECODE_CASES)), ids=[c[0] for c in DECODE_CASES])
def test_mixed_batch_decodes_are_exact(prompts_and_decodes, case):
    _, _, decoded, prompts, refs = prompts_and_decodes
    tokens, nlls = decoded[case]
    assert len(tokens) == NEW_TOKENS
    ref = refs[case][len(prompts[case]) - 1:]
    worst = max(abs(a - b) for a, b in zip(nlls, ref))
    assert worst < TOLERANCE, (DECODE_CASES[case], worst)


def test_sharers_hold_one_copy_and_an_abort_leaves_the_others(engine, tiny_llama):
    """Eight requests pinning the same 280-token prefix: its two full blocks are one physical
    copy held by all eight (not copied), the pool holds them once, an aborted sharer leaves the
    others streaming exactly, and the last one to finish gives them back."""
    from streamsink import metrics

    manager, pool = kv_internals(engine)
    llm = engine.llm_engine
    free_before = pool.get_num_free_blocks()
    copies_before = manager.cache.adopt_copies_total
    prefix = random_tokens(280, seed=99)
    prompts = {f"share{i}": prefix + random_tokens(40 + 10 * i, seed=100 + i) for i in range(8)}
    options = {"pin_tokens": len(prefix), "window_tokens": 40}
    params = params_for(options, max_tokens=150, temperature=0, logprobs=0, ignore_eos=True)
    first, *others = prompts
    llm.add_request(first, {"prompt_token_ids": prompts[first]}, params)
    while manager.num_cached_block.get(internal(manager, first), 0) < 2:
        llm.step()   # until its pinned blocks are processed and hashed
    for name in others:
        llm.add_request(name, {"prompt_token_ids": prompts[name]}, params)
    outputs, checked = {}, False
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                outputs[out.request_id] = out
        ids = [internal(manager, n) for n in prompts]
        if not checked and all(len(manager.req_to_blocks.get(r, ())) > 3 for r in ids):
            checked = True
            pinned = [tuple(b.block_id for b in manager.req_to_blocks[r][:2]) for r in ids]
            assert len(set(pinned)) == 1, pinned                 # the same two blocks for all
            assert all(len(manager.cache.pin_holders[b]) == 8 for b in pinned[0])
            assert manager.cache.adopt_copies_total == copies_before   # shared, not copied
            manager.publish(force=True)
            totals = metrics.read_totals()
            # The third pinned block (tokens 256..279 and each request's own) is per request.
            assert totals["pinned_streams"] == 8
            assert totals["pinned_blocks"] == 2 + 8
            assert totals["pinned_block_refs"] == 2 * 8 + 8
            used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
            assert totals["pool_used_blocks"] == used
            assert used == manager.held_blocks_all() - 2 * 7     # shared blocks counted once
            llm.abort_request(["share3"])
    assert checked
    assert set(outputs) == set(prompts) - {"share3"}     # the aborted one reports nothing
    assert all(len(o.outputs[0].token_ids) == 150 for o in outputs.values())
    assert not manager.req_to_blocks and not manager.cache.pin_holders and not manager.shapes
    assert pool.get_num_free_blocks() == free_before
    survivors = ["share0", "share5"]
    jobs = [(tiny_llama, prompts[n] + list(outputs[n].outputs[0].token_ids), len(prefix), 40)
            for n in survivors]
    for name, ref in zip(survivors, compute_references(jobs)):
        out = outputs[name].outputs[0]
        nlls = [-lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
        assert len(nlls) == 150
        worst = max(abs(a - b) for a, b in zip(nlls, ref[len(prompts[name]) - 1:]))
        assert worst < TOLERANCE, (name, worst)


@pytest.mark.parametrize("options, want", [
    (None, (SINK, 0, WINDOW)),
    ({"pin_tokens": 40, "window_tokens": 20}, (0, 40, 20)),
    ({"pin_tokens": 0, "window_tokens": 50}, (0, 0, 50)),
    ({"window_tokens": 30}, (SINK, 0, 30)),     # a narrower window keeps the engine's sinks
])
def test_outputs_tell_their_stream_state(engine, options, want):
    """streamsink.stream_state(output): what usage["streamsink"] says over HTTP; n = 2 streams
    add up their evictions."""
    import streamsink

    sinks, pinned, window = want
    prompt, new = 100, 6
    (out,) = engine.generate([{"prompt_token_ids": random_tokens(prompt)}],
                             params_for(options, max_tokens=new, ignore_eos=True, n=2),
                             use_tqdm=False)
    assert [len(c.token_ids) for c in out.outputs] == [new, new]
    cache = sinks + pinned + window
    assert streamsink.stream_state(out) == {
        "evicted_tokens": 2 * max(0, prompt + new - cache), "sink_tokens": sinks,
        "pinned_tokens": pinned, "window_tokens": window, "prompt_outgrew_cache": prompt > cache}


@pytest.mark.parametrize("options, message", [
    ({"pin_tokens": MAX_PINNED + 1}, "max_pinned_tokens=300"),
    ({"window_tokens": WINDOW + 1}, "exceeds the engine's window_tokens=60"),
    ({"pin_tokens": 500}, "exceeds the prompt's 400 tokens"),
    ({"pin": "system"}, "needs a chat request"),
    ({"pin_tokens": -1}, "must be an integer >= 0"),
    ({"pin_tokens": 4, "sinks": 2}, "unknown streamsink request option"),
    ("system", "must be a JSON object"),
])
def test_bad_options_are_refused_with_one_line(engine, options, message):
    with pytest.raises(ValueError, match=message) as caught:
        engine.generate([{"prompt_token_ids": random_tokens(400)}],
                        params_for(options, max_tokens=1), use_tqdm=False)
    assert "\n" not in str(caught.value)


def test_options_need_a_streaming_engine():
    from streamsink.request_options import RequestOptionError, resolve_options

    with pytest.raises(RequestOptionError, match="need a streaming engine"):
        resolve_options(None, {"pin_tokens": 4}, [1, 2, 3, 4, 5])


def test_system_pin_counts_the_rendered_system_messages():
    """The common prefix of the system rendering and the prompt (tokens shared at the seam)."""
    from streamsink.config import parse_config
    from streamsink.request_options import resolve_options

    cfg = parse_config({"max_pinned_tokens": 16})
    assert resolve_options(cfg, {"pin": "system"}, [5, 6, 7, 8, 9, 10], [5, 6, 7, 11]) == \
        {"pin_tokens": 3, "window_tokens": cfg.window_tokens}


def test_chat_pins_exactly_the_system_prompt(tmp_path):
    """vllm.LLM.chat with "pin": "system": the request's pinned count is the tokens the chat
    template renders for the system message (here a prefix of every conversation's rendering),
    and a request without options on the same engine keeps the engine's sinks; its output tells
    the same (streamsink.stream_state)."""
    from tiny_models import make_tiny_llama_with_tokenizer
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    import streamsink
    from streamsink.stream_rule import StreamShape

    model = make_tiny_llama_with_tokenizer(tmp_path / "llama")
    system = [{"role": "system", "content": "You are Zorblax, keeper of the lighthouse. " * 4}]
    messages = system + [{"role": "user", "content": "What is your name?"}]
    tokenizer = AutoTokenizer.from_pretrained(model)
    rendered = tokenizer.apply_chat_template(system, tokenize=True)
    system_ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    full = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    full_ids = full["input_ids"] if hasattr(full, "keys") else full
    assert full_ids[:len(system_ids)] == system_ids and len(full_ids) > len(system_ids)
    llm = tiny_engine(model, {"sink_tokens": SINK, "window_tokens": WINDOW,
                              "max_pinned_tokens": MAX_PINNED}, skip_tokenizer_init=False)
    try:
        manager, _ = kv_internals(llm)
        for options, want in (({"pin": "system", "window_tokens": 30},
                               StreamShape(len(system_ids), 30, writes_shadows=False)),
                              (None, None)):
            llm.enqueue_chat(messages, params_for(options, max_tokens=4), use_tqdm=False)
            finished = [o for o in llm.llm_engine.step() if o.finished]
            (request_id,) = manager.req_to_blocks
            assert manager.shapes.get(request_id) == want
            while llm.llm_engine.has_unfinished_requests():
                finished += [o for o in llm.llm_engine.step() if o.finished]
            # The client is told the same: the system prompt pinned, or the engine's sinks.
            (out,) = finished
            told = streamsink.stream_state(out)
            front = (told["pinned_tokens"], told["sink_tokens"], told["window_tokens"])
            assert front == ((len(system_ids), 0, 30) if options else (0, SINK, WINDOW))
    finally:
        del llm
        gc.collect()
