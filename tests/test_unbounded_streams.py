"""Streams past max_model_len: the length caps are lifted for streaming engines only, the worker's
bounded batch rows are rebased as streams grow (their cached keys re-rotated), and the outputs
stay exact — with the model compiled, as vLLM runs it by default on CPU."""
import gc

import pytest
from conftest import compute_references, random_tokens, tiny_engine

SINK, WINDOW = 8, 37
MAX_MODEL_LEN = 512   # row width: each stream below is rebased several times
CHUNK = 128
PROMPTS = [1000, 50]  # one prompt past max_model_len, one short
NEW_TOKENS = 480      # both streams end past max_model_len


@pytest.fixture(scope="module")
def streaming(tiny_llama):
    # enforce_eager=False: vLLM's default CPU compilation (torch.compile + inductor).
    llm = tiny_engine(tiny_llama, {"sink_tokens": SINK, "window_tokens": WINDOW},
                      max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=CHUNK,
                      max_num_seqs=4, enforce_eager=False)
    yield llm
    del llm
    gc.collect()


def test_streams_past_max_model_len_match_reference(streaming, tiny_llama):
    """Prompt and generated tokens past max_model_len: every prompt and sampled token's
    log-probability matches the literal reference run over the whole stream."""
    from vllm import SamplingParams

    prompts = [random_tokens(n, seed=n) for n in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0, prompt_logprobs=0,
                            detokenize=False, ignore_eos=True)
    outs = streaming.generate([{"prompt_token_ids": p} for p in prompts], params,
                              use_tqdm=False)
    jobs, got = [], []
    for prompt, out in zip(prompts, outs):
        tokens = list(out.outputs[0].token_ids)
        assert len(tokens) == NEW_TOKENS and out.outputs[0].finish_reason == "length"
        assert len(prompt) + len(tokens) > MAX_MODEL_LEN
        nlls = [-out.prompt_logprobs[t][prompt[t]].logprob for t in range(1, len(prompt))]
        nlls += [-lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
        got.append(nlls)
        jobs.append((tiny_llama, prompt + tokens, SINK, WINDOW))
    for nlls, ref in zip(got, compute_references(jobs)):
        assert len(nlls) == len(ref)
        assert max(abs(a - b) for a, b in zip(nlls, ref)) < 1e-3


def test_the_streaming_engine_runs_compiled(streaming):
    from vllm.config import CompilationMode

    config = streaming.llm_engine.vllm_config
    assert config.compilation_config.mode != CompilationMode.NONE
    assert not config.model_config.enforce_eager


def test_worker_rows_were_rebased(streaming):
    """The run above really went through rebased rows (not a wide row in disguise)."""
    from streamsink.row_window import rows_of

    runner = streaming.llm_engine.model_executor.driver_worker.worker.model_runner
    rows = rows_of(runner.input_batch)
    assert rows.width <= MAX_MODEL_LEN
    assert rows.rebases >= 2


def test_unset_max_tokens_means_one_context_of_new_tokens(streaming):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=None, detokenize=False, ignore_eos=True)
    out = streaming.generate([{"prompt_token_ids": random_tokens(600)}], params,
                             use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_MODEL_LEN


def test_stock_engine_keeps_its_limits(tiny_llama):
    """Without a streamsink config the same plugin-loaded vLLM refuses a prompt past
    max_model_len and stops generation at it."""
    from vllm import SamplingParams

    llm = tiny_engine(tiny_llama, None, max_model_len=MAX_MODEL_LEN,
                      max_num_batched_tokens=CHUNK)
    with pytest.raises(Exception, match="maximum (model|context) length"):
        llm.generate([{"prompt_token_ids": random_tokens(MAX_MODEL_LEN + 50)}],
                     SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": random_tokens(400)}],
                       SamplingParams(max_tokens=NEW_TOKENS, detokenize=False, ignore_eos=True),
                       use_tqdm=False)[0]
    assert 400 + len(out.outputs[0].token_ids) == MAX_MODEL_LEN
    del llm
    gc.collect()
