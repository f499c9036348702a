"""Every model family and RoPE/ALiBi variant the engine accepts (plugin/model_families.py),
streamed by the engine against the literal reference, and what it refuses.

One streaming engine per family (tests/family_streams.py): three streams in one generate call
(chunked prefill past C, decodes with sink shadows, the decode right after C, steps mixing
decodes with prefill chunks, row rebases past max_model_len), then a fourth continuing the
longest one from the prefix cache; every prompt and generated token's NLL against the reference
over the same tokens. And stock vLLM (no streamsink) on the first C+1 tokens of the same stream,
where streaming is dense: stock equals the reference too, so the reference is right about each
family as vLLM runs it. Plain Llama and GPT-NeoX are in test_streaming_exactness.py.

The reference runs in a background process while the next family's engines work.
"""
from __future__ import annotations

import pytest
from family_streams import (
    FAMILY_MODELS,
    StreamShape,
    build_model,
    max_difference,
    measure_families,
)

TOLERANCE = 1e-3  # fp32 engine vs float64 reference
FAMILIES = [name for name in FAMILY_MODELS if name not in ("llama", "gpt_neox")]
SHAPE = StreamShape()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("families"))
    return {name: build_model(name, directory) for name in FAMILIES}


@pytest.fixture(scope="module")
def measured(models):
    """family -> (FamilyRun, [reference NLLs per sequence], stock NLLs of the dense prefix)."""
    return {name: (m.run, m.references, m.stock)
            for name, m in measure_families(models, SHAPE).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_reference(measured, family):
    run, references, _ = measured[family]
    for seq, reference in zip(run.sequences, references):
        assert len(reference) == len(seq.tokens) - 1
        assert max_difference(seq.nlls, reference) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_every_streaming_path_ran(measured, family):
    """The comparison above went through each path: kernel steps with sink shadows, PyTorch
    tiles, steps mixing both, row rebases, and a continuation from the prefix cache; its
    streams ran well past C."""
    run, _, _ = measured[family]
    assert run.paths["kernel_shadows"] and run.paths["pytorch"] and run.paths["mixed"]
    assert run.rebases >= 1
    assert run.cached_tokens >= SHAPE.cache_tokens
    assert len(run.sequences[0].tokens) > 4 * SHAPE.cache_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_vllm_equals_reference_while_dense(measured, family):
    run, references, stock = measured[family]
    assert len(stock) == SHAPE.cache_tokens   # every variant's threshold is past C here
    assert max(abs(a - b) for a, b in zip(stock, references[0])) < TOLERANCE


# ---- refusals: one line each, naming what is not supported ---------------------------------

def _config(kind: str, **overrides):
    from transformers import (
        BloomConfig,
        FalconConfig,
        Gemma2Config,
        GPTNeoXConfig,
        LlamaConfig,
        Phi3Config,
    )

    from tiny_models import llama_rope_variant

    llama = dict(hidden_size=256, num_attention_heads=4, head_dim=64)
    make = {
        "llama": lambda: LlamaConfig(**llama, **overrides),
        "dynamic": lambda: LlamaConfig(**llama, max_position_embeddings=64,
                                       rope_parameters=llama_rope_variant("dynamic")),
        "longrope": lambda: Phi3Config(
            hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
            original_max_position_embeddings=64,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0] * 32, "long_factor": [4.0] * 32,
                             **overrides}),
        "neox_linear": lambda: GPTNeoXConfig(
            hidden_size=128, num_attention_heads=2,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "gemma2": lambda: Gemma2Config(),
        "falcon_alibi": lambda: FalconConfig(alibi=True),
        "bloom": lambda: BloomConfig(),
    }
    return make[kind]()


@pytest.mark.parametrize("arch,kind,cache,message", [
    ("GPT2LMHeadModel", "llama", 1024, "does not support GPT2LMHeadModel (supported: "),
    ("Gemma2ForCausalLM", "gemma2", 1024, "does not support Gemma2ForCausalLM: it alternates "
                                          "sliding-window and global attention layers"),
    ("LlamaForCausalLM", "dynamic", 65, "rope_type 'dynamic' only while S+W stays within "
                                        "max_position_embeddings (64)"),
    ("Phi3ForCausalLM", "longrope", 65, "rope_type 'longrope' only while S+W stays within "
                                        "original_max_position_embeddings (64)"),
    ("GPTNeoXForCausalLM", "neox_linear", 64, "rope_type 'linear' for GPTNeoXForCausalLM"),
    ("LlamaForCausalLM", "llama", 64, "rope_type 'ntk'"),
    # Hugging Face applies a configured attention_factor, vLLM ignores it.
    ("Phi3ForCausalLM", "longrope", 64, "vLLM's attention factor (1.1"),
])
def test_refusals_are_one_line_naming_the_reason(arch, kind, cache, message):
    from streamsink.engine_setup import model_refusal

    overrides = {}
    if message == "rope_type 'ntk'":
        overrides = {"rope_parameters": {"rope_type": "ntk", "rope_theta": 1e4, "factor": 2.0}}
    elif kind == "longrope" and cache == 64:
        overrides = {"attention_factor": 2.0}
    reason = model_refusal(arch, _config(kind, **overrides), cache)
    assert reason is not None and message in reason and "\n" not in reason


@pytest.mark.parametrize("arch,kind,cache", [
    ("LlamaForCausalLM", "dynamic", 64), ("Phi3ForCausalLM", "longrope", 64),
    ("FalconForCausalLM", "falcon_alibi", 4096), ("BloomForCausalLM", "bloom", 4096)])
def test_accepted_at_their_limits(arch, kind, cache):
    from streamsink.engine_setup import model_refusal

    assert model_refusal(arch, _config(kind), cache) is None


def test_an_engine_refuses_at_start_up_with_that_line(tmp_path):
    """The refusal reaches whoever starts the engine, before any weights load: a dynamic-NTK
    model whose threshold (16) is below the default S+W."""
    from vllm.engine.arg_utils import EngineArgs

    from tiny_models import make_tiny_llama_scaled

    path = make_tiny_llama_scaled(tmp_path / "dynamic", "dynamic", layers=1)
    args = EngineArgs(model=path, skip_tokenizer_init=True, dtype="float32", max_model_len=64,
                      additional_config={"streamsink": {}})
    with pytest.raises(Exception, match="only while S\\+W stays within max_position_embeddings "
                                        "\\(16\\)"):
        args.create_engine_config()


# ---- the engine's RoPE is the reference's, variant by variant -------------------------------

def test_the_registry_lists_every_variant_rope_defines():
    from streamsink.model_families import LENGTH_DEPENDENT, ROPE_VARIANTS
    from streamsink.rope import ROPE_TYPES

    assert set(ROPE_VARIANTS) == set(ROPE_TYPES) and set(LENGTH_DEPENDENT) <= set(ROPE_TYPES)


@pytest.mark.parametrize("family", [f for f in FAMILIES if "alibi" not in f and f != "bloom"])
def test_rope_spec_equals_the_reference_frequencies(models, family):
    """The engine's frequencies and attention factor (plugin/rope.py) against the reference's
    own definitions (reference/streaming_llm.py, checked against Hugging Face) at an in-cache
    length within every variant's limit."""
    import torch
    from transformers import AutoConfig

    from reference.streaming_llm import rope_frequencies
    from streamsink.rope import rope_spec_from_hf_config

    config = AutoConfig.from_pretrained(models[family])
    spec = rope_spec_from_hf_config(config)
    params = {"rope_type": "default", "rope_theta": 10000.0}
    if config.model_type != "gptj":
        params = dict(config.rope_parameters)
    inv_freq, factor = rope_frequencies(params, spec.rotary_dim, SHAPE.cache_tokens,
                                        config.max_position_embeddings
                                        if hasattr(config, "max_position_embeddings")
                                        else config.n_positions)
    assert torch.allclose(spec.inv_freq(), inv_freq, rtol=1e-12, atol=0)
    assert abs(spec.attention_factor - factor) < 1e-12


def test_supported_models_table_has_a_row_per_family(monkeypatch):
    """The supported-models table (benchmarks/reports/families.py, rendered into README.md by
    `make docs`) has one row per registry family: its architectures, position variants and the
    largest |dNLL| over the variants measured (or that none was)."""
    import importlib
    import os

    from conftest import ROOT
    from streamsink.model_families import FAMILIES as REGISTRY

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    reports = importlib.import_module("reports.families")
    base = importlib.import_module("reports.base")
    data = {"variants": {
        "a": {"family": "Falcon", "positions": "RoPE default", "max_abs_dnll": 2e-6},
        "b": {"family": "Falcon", "positions": "ALiBi", "max_abs_dnll": 5e-6},
        "c": {"family": "Falcon", "positions": "RoPE default", "max_abs_dnll": 1e-6}}}
    result = base.Result("families", "benchmarks/results/families/x.json", data, {})
    text = reports.markdown({"families": result}, base.Doc(base="", img="docs/img/"))
    rows = [r for r in text.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) == len(REGISTRY)
    falcon = next(r for r in rows if r.startswith("| Falcon |"))
    assert "FalconForCausalLM" in falcon and "5.0e-06 (RoPE default, ALiBi)" in falcon
    assert sum("not measured" in r for r in rows) == len(REGISTRY) - 1
