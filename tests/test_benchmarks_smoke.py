"""Every benchmark's --quick mode runs and records ratios, not only absolute times (results go
to a temporary folder; the committed results stay as measured). The scripts run on a tiny random
Llama that speaks the default model's tokenizer: what is checked here is that they work and
record, not the numbers, which are measured on the default model."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
BOOK = os.path.join(ROOT, "..", "shared", "data", "katrine-14263.txt")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import make_tiny_llama_with_tokenizer

    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_tok_llama"), sharp=False)


def run_quick(script, out_dir, model, *extra):
    env = dict(os.environ, STREAMSINK_BENCH_RESULTS=str(out_dir),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick", "--model", model,
                           *extra],
                          capture_output=True, text=True, timeout=600, env=env, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-3000:]
    name = script[:-3] + "_quick"
    with open(os.path.join(out_dir, name + ".json")) as f:
        result = json.load(f)
    assert result["machine"]["vllm"] == "0.32.0"
    return result, out_dir / (name + ".png")


# --eager: compiling every engine would add minutes to the suite; the scripts' default (compiled)
# mode is what the published numbers use.
def test_decode_latency_quick(tmp_path, model):
    result, _ = run_quick("decode_latency.py", tmp_path, model, "--eager")
    assert set(result["ratio_streamsink_over_stock"]) == {"batch_1", "batch_4"}
    assert all(r > 0 for r in result["ratio_streamsink_over_stock"].values())
    assert set(result["ratio_stock_eager_over_stock"]) == {"batch_1", "batch_4"}
    # The streaming engine built and used the native shadow op (a compiler is on every machine
    # that runs vLLM compiled).
    assert result["sink_shadows"] == "native op"
    # ... at each step's first layer, for every layer of the tiny model at once.
    from transformers import AutoConfig
    assert result["shadow_layers_per_call"] == AutoConfig.from_pretrained(model).num_hidden_layers


def test_latency_vs_cache_quick(tmp_path, model):
    result, png = run_quick("latency_vs_cache.py", tmp_path, model, "--eager")
    assert [r["cache"] for r in result["rows"]] == [256, 512]
    assert all(r["speedup_vs_recompute"] > 0 for r in result["rows"])
    assert all(r["ratio_vs_stock_dense"] > 0 for r in result["rows"])
    assert png.exists()


def test_memory_quick(tmp_path, model):
    result, png = run_quick("memory.py", tmp_path, model)
    ours = result["summary"]["streamsink 4+1020"]
    assert ours["max_tokens"] > 10_000
    # Flat KV: 4+1020 at block size 128 holds at most ceil(4/128)+ceil(3071/128)+1 = 26 blocks.
    assert ours["peak_blocks_held"] <= 26
    assert png.exists()


@pytest.mark.skipif(not os.path.exists(BOOK), reason="shared book data not present")
def test_perplexity_quick(tmp_path, model):
    result, png = run_quick("perplexity.py", tmp_path, model)
    (row,) = result["table"]
    assert {"0+256_all", "4+252_all", "dense_all", "recompute_subset"} <= set(row)
    assert png.exists()


@pytest.mark.skipif(not os.path.exists(BOOK), reason="shared book data not present")
def test_ppl_speed_quick(tmp_path, model):
    result, _ = run_quick("ppl_speed.py", tmp_path, model)
    assert result["ppl_relative_difference"] < 1e-4
    assert result["speedup"] > 0


def test_many_streams_quick(tmp_path, model):
    result, png = run_quick("many_streams.py", tmp_path, model, "--eager")
    assert set(result["throughput_ratio_streamsink_over_stock"]) == {"1", "8"}
    assert all(r["generated_tokens"] == r["streams"] * 256 for r in result["rows"])
    assert png.exists()
