"""Every benchmark's --quick mode runs and records ratios, not only absolute times (results go
to a temporary folder; the committed results stay as measured), in the results layout (one new
file per run under <name>/, with its provenance), and the docs' renderer draws each quick result.
The scripts run on a tiny random Llama that speaks the default model's tokenizer: what is checked
here is that they work and record, not the numbers, which are measured on the default model."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
BOOK = os.path.join(ROOT, "..", "shared", "data", "katrine-14263.txt")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


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
    import result_files

    name = script[:-3] + "_quick"
    (path,) = result_files.result_files(name, str(out_dir))  # one run, one new file
    assert result_files.latest(name, str(out_dir)) == path
    result = result_files.load(path)
    prov = result["provenance"]
    assert prov["versions"]["vllm"] == "0.32.0"
    assert prov["options"]["quick"] is True and "--quick" in prov["argv"]
    assert prov["machine"]["cores"] >= 1 and "avx2" in prov["machine"]["cpu_flags"]
    assert os.path.basename(path).startswith(prov["time_utc"][:10])
    # no machine paths in a result: the checkpoint is named by its folder only
    assert prov["options"]["model"] == os.path.basename(model)
    return result, path


def renders(path, block: str, tmp_path) -> None:
    """The docs' renderer for `block` draws this result and writes its table."""
    from reports import BLOCKS
    from reports.base import Doc, Result

    module = BLOCKS[block]
    results = {module.NAMES[0]: Result.from_file(module.NAMES[0], str(path))}
    markdown = module.markdown(results, Doc(base="", img="img/"))
    assert "|---|" in markdown and os.path.basename(str(path)) in markdown
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    for file in getattr(module, "images", lambda *_: [])(results, str(img)):
        assert (img / file).stat().st_size > 0


# --eager: compiling every engine would add minutes to the suite; the scripts' default (compiled)
# mode is what the published numbers use.
def test_decode_latency_quick(tmp_path, model):
    result, path = run_quick("decode_latency.py", tmp_path, model, "--eager")
    assert set(result["ratio_streamsink_over_stock"]) == {"batch_1", "batch_4"}
    assert all(r > 0 for r in result["ratio_streamsink_over_stock"].values())
    assert set(result["ratio_stock_eager_over_stock"]) == {"batch_1", "batch_4"}
    # The streaming engine built and used the native shadow op (a compiler is on every machine
    # that runs vLLM compiled).
    assert result["sink_shadows"] == "native op"
    # ... at each step's first layer, for every layer of the tiny model at once.
    from transformers import AutoConfig
    assert result["shadow_layers_per_call"] == AutoConfig.from_pretrained(model).num_hidden_layers
    # raw samples: every alternating step of every engine
    assert all(len(r["step_seconds"]) == result["steps"] for r in result["results"])
    renders(path, "decode_latency", tmp_path)


def test_latency_vs_cache_quick(tmp_path, model):
    result, path = run_quick("latency_vs_cache.py", tmp_path, model, "--eager")
    assert [r["cache"] for r in result["rows"]] == [256, 512]
    assert all(r["speedup_vs_recompute"] > 0 for r in result["rows"])
    assert all(r["ratio_vs_stock_dense"] > 0 for r in result["rows"])
    assert all(len(r["step_seconds"]["streamsink"]) == 8 for r in result["rows"])
    renders(path, "latency_vs_cache", tmp_path)


def test_memory_quick(tmp_path, model):
    result, path = run_quick("memory.py", tmp_path, model)
    ours = result["summary"]["streamsink 4+1020"]
    assert ours["max_tokens"] > 10_000
    # Flat KV: 4+1020 at block size 128 holds at most ceil(4/128)+ceil(3071/128)+1 = 26 blocks.
    assert ours["peak_blocks_held"] <= 26
    renders(path, "memory", tmp_path)


@pytest.mark.skipif(not os.path.exists(BOOK), reason="shared book data not present")
def test_perplexity_quick(tmp_path, model):
    result, path = run_quick("perplexity.py", tmp_path, model)
    (row,) = result["table"]
    assert {"0+256_all", "4+252_all", "dense_all", "recompute_subset"} <= set(row)
    # every per-token NLL: dense and both streaming variants over the whole text
    dense = [s for s in result["samples"] if s["method"] == "dense"]
    assert len(dense) == 1 and len(dense[0]["nlls"]) == result["tokens"] - 1
    renders(path, "perplexity", tmp_path)
    assert (tmp_path / "img" / "perplexity_running.png").exists()


@pytest.mark.skipif(not os.path.exists(BOOK), reason="shared book data not present")
def test_ppl_speed_quick(tmp_path, model):
    result, path = run_quick("ppl_speed.py", tmp_path, model)
    assert result["ppl_relative_difference"] < 1e-4
    assert result["speedup"] > 0
    assert all(len(run["nlls"]) == run["tokens"] for run in result["runs"].values())
    renders(path, "ppl_speed", tmp_path)


def test_many_streams_quick(tmp_path, model):
    result, path = run_quick("many_streams.py", tmp_path, model, "--eager")
    assert set(result["throughput_ratio_streamsink_over_stock"]) == {"1", "8"}
    assert all(r["generated_tokens"] == r["streams"] * 256 for r in result["rows"])
    # raw samples: each step's time and tokens add up to the run's
    assert all(sum(r["step_tokens"]) == r["generated_tokens"] for r in result["rows"])
    renders(path, "many_streams", tmp_path)


def test_passkey_quick(tmp_path, model):
    result, path = run_quick("passkey.py", tmp_path, model, "--eager")
    engines = {r["engine"] for r in result["rows"]}
    assert engines == {"stock", "streamsink 4+252"}
    # every (engine, distance, key) answered, with the key's first digit scored
    assert len(result["samples"]) == 2 * 2 * 2
    assert all(s["first_digit_logprob"] is not None and s["first_digit_logprob"] <= 0
               for s in result["samples"])
    # the needle sits where the distance says: the prompt ends `distance` tokens after it
    assert {s["distance"] for s in result["samples"]} == {100, 400}
    renders(path, "passkey", tmp_path)
