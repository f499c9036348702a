"""The engine's per-token log-probabilities against the literal reference (reference/)."""
import gc

import pytest
from conftest import References, compute_references, prompt_nlls, random_tokens, tiny_engine

# fp32 engine vs float64 reference (stock vLLM fp32 itself differs from it by a few 1e-4).
TOLERANCE = 1e-3

# (S, W, chunk, length): sinks 0/1/4/8, windows on and off block boundaries (block size 128),
# chunk sizes 1, 7, one block, large; texts several times S+W.
LLAMA_CASES = [
    (4, 60, 2048, 360),
    (0, 100, 2048, 420),
    (1, 37, 7, 240),
    (8, 250, 128, 900),
    (4, 28, 1, 120),
    (4, 1, 64, 200),
]
NEOX_CASES = [(4, 60, 2048, 400), (1, 100, 7, 300)]
MIXED = (4, 60, [30, 64, 65, 333, 500])
# Past the model's position table (the same tiny weights with a 512-position table, so the
# one-token-at-a-time reference stays short): (S, W, length, max_model_len, chunk). The stream
# outgrows both the table and its worker row, which is rebased with its cached keys re-rotated.
LONG = (4, 60, 1300, 512, 128)
SHORT_TABLE = 512
# Decode past C (the kernel with sink shadows), batched, prompts shorter and longer than C:
# (family, S, W, prompt lengths, generated tokens, compiled). The GPT-NeoX case runs compiled
# (vLLM's default CPU mode; its RoPE is Hugging Face code inside the graph); the compiled Llama
# path is covered by test_unbounded_streams.
DECODE_CASES = [("llama", 4, 60, [50, 57, 200], 200, False),
                ("llama", 8, 37, [20, 90], 150, False), ("llama", 0, 50, [10], 120, False),
                ("neox", 1, 100, [30, 150], 150, True)]


def greedy_decode(model, sink, window, prompts, new_tokens, compiled=False):
    """Generated tokens and their NLLs (sampled-token log-probabilities) per prompt."""
    from vllm import SamplingParams

    llm = tiny_engine(model, {"sink_tokens": sink, "window_tokens": window},
                      max_num_seqs=len(prompts), enforce_eager=not compiled)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, logprobs=0, detokenize=False,
                            ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    gc.collect()
    result = []
    for o in outs:
        tokens = list(o.outputs[0].token_ids)
        result.append((tokens, [-lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, tokens)]))
    return result


@pytest.fixture(scope="module")
def decoded(tiny_llama, tiny_gpt_neox):
    """Decode every DECODE_CASES case, then compute all their references in one subprocess."""
    models = {"llama": tiny_llama, "neox": tiny_gpt_neox}
    cases, jobs = [], []
    for family, sink, window, lengths, new, compiled in DECODE_CASES:
        prompts = [random_tokens(n, seed=n) for n in lengths]
        for prompt, (tokens, nlls) in zip(prompts, greedy_decode(models[family], sink, window,
                                                                  prompts, new, compiled)):
            cases.append((family, sink, window, len(prompt), nlls))
            jobs.append((models[family], prompt + tokens, sink, window))
    return [(case, ref) for case, ref in zip(cases, compute_references(jobs))]


@pytest.fixture(scope="module")
def short_table_models(tmp_path_factory):
    """The tiny models' weights (same seeds) with a SHORT_TABLE-position RoPE table."""
    from tiny_models import make_tiny_gpt_neox, make_tiny_llama

    return {"llama": make_tiny_llama(tmp_path_factory.mktemp("llama_short_table"),
                                     max_positions=SHORT_TABLE),
            "neox": make_tiny_gpt_neox(tmp_path_factory.mktemp("neox_short_table"),
                                       max_positions=SHORT_TABLE)}


@pytest.fixture(scope="module")
def references(tiny_llama, tiny_gpt_neox, short_table_models):
    jobs, keys = [], []
    for s, w, chunk, n in LLAMA_CASES:
        keys.append(("llama", s, w, chunk, n))
        jobs.append((tiny_llama, random_tokens(n), s, w))
    # Sensitivity controls: dense attention and a window without sinks.
    keys += [("dense",), ("no-sink",)]
    jobs += [(tiny_llama, random_tokens(360), 4, 10_000), (tiny_llama, random_tokens(360), 0, 64)]
    s, w, lengths = MIXED
    for n in lengths:
        keys.append(("mixed", n))
        jobs.append((tiny_llama, random_tokens(n, seed=n), s, w))
    for s, w, chunk, n in NEOX_CASES:
        keys.append(("neox", s, w, chunk, n))
        jobs.append((tiny_gpt_neox, random_tokens(n, seed=3), s, w))
    s, w, n, _, _ = LONG
    for family, model in short_table_models.items():
        keys.append(("long", family))
        jobs.append((model, random_tokens(n, seed=5), s, w))
    # In test order, in the background: the engines run while the reference works.
    return References(jobs).keyed(keys)


def max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def run_engine(model, tokens, sink, window, chunk, **extra):
    # max_num_batched_tokens is the prefill chunk (one request at a time for chunks < 8).
    llm = tiny_engine(model, {"sink_tokens": sink, "window_tokens": window},
                      max_num_batched_tokens=chunk, max_num_seqs=min(8, chunk), **extra)
    got = prompt_nlls(llm, tokens)
    del llm
    gc.collect()
    return got


@pytest.mark.parametrize("sink,window,chunk,length", LLAMA_CASES)
def test_llama_matches_reference(tiny_llama, references, sink, window, chunk, length):
    got = run_engine(tiny_llama, [random_tokens(length)], sink, window, chunk)[0]
    assert max_diff(got, references[("llama", sink, window, chunk, length)]) < TOLERANCE


def test_reference_is_sensitive_to_positions(references):
    """The comparison means something: on this model streaming differs clearly from dense
    attention and from a window without sinks, so a position or eviction error would show."""
    streaming = references[("llama", *LLAMA_CASES[0])]
    assert max_diff(streaming, references[("dense",)]) > 0.05
    assert max_diff(streaming, references[("no-sink",)]) > 0.05


def test_mixed_batch_short_and_long_llama(tiny_llama, references):
    """One batch with requests shorter than S+W (dense) and far longer (streaming)."""
    sink, window, lengths = MIXED
    prompts = [random_tokens(n, seed=n) for n in lengths]
    got = run_engine(tiny_llama, prompts, sink, window, 256)
    for n, nlls in zip(lengths, got):
        assert max_diff(nlls, references[("mixed", n)]) < TOLERANCE


@pytest.mark.parametrize("sink,window,chunk,length", NEOX_CASES)
def test_gpt_neox_matches_reference(tiny_gpt_neox, references, sink, window, chunk, length):
    got = run_engine(tiny_gpt_neox, [random_tokens(length, seed=3)], sink, window, chunk)[0]
    assert max_diff(got, references[("neox", sink, window, chunk, length)]) < TOLERANCE


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_positions_past_the_model_table(short_table_models, references, family):
    sink, window, length, max_model_len, chunk = LONG
    assert length > max_model_len >= SHORT_TABLE
    got = run_engine(short_table_models[family], [random_tokens(length, seed=5)], sink, window,
                     chunk, max_model_len=max_model_len)[0]
    assert max_diff(got, references[("long", family)]) < TOLERANCE


def test_decode_past_cache_matches_reference(decoded):
    """Greedy decode far past S+W, batched: every generated token's log-probability matches
    the reference run over prompt + generated tokens."""
    for (family, sink, window, prompt_len, nlls), ref in decoded:
        expected = ref[prompt_len - 1:]
        assert max_diff(nlls, expected) < TOLERANCE, (family, sink, window, prompt_len)
