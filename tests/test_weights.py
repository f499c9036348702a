"""--weights and checkpoint formats, without an engine: what each name resolves to, which
quantized layouts a streaming engine accepts, the dtype a checkpoint gets, the worker's thread
binding, and the default model's quantized checkpoints prepared from the dense one."""
import json

import pytest

from streamsink import model_store, weights
from streamsink.errors import UsageError
from streamsink.serving import engine_args
from streamsink.serving.engine_args import choose_model


def test_auto_follows_the_cpu():
    assert weights.resolve_weights("auto", native_bf16=True).name == weights.AUTO_BY_CPU[True]
    assert weights.resolve_weights(None, native_bf16=False).name == weights.AUTO_BY_CPU[False]
    # Without native bf16 every 16-bit format is several times slower than fp32.
    assert weights.resolve_weights("auto", native_bf16=False).activation_dtype(False) == \
        "float32"


def test_q8_takes_bf16_only_where_the_cpu_has_it():
    q8 = weights.FORMATS["q8"]
    assert q8.activation_dtype(native_bf16=True) == "bfloat16"
    assert q8.activation_dtype(native_bf16=False) == "float32"
    assert weights.FORMATS["q4"].activation_dtype(native_bf16=False) == "bfloat16"


def test_unknown_format_is_one_line():
    with pytest.raises(UsageError, match="--weights q3: unknown"):
        weights.resolve_weights("q3")


CT_W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
    "group_0": {"targets": ["Linear"], "input_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                            "strategy": "group", "group_size": 32}}}}
CT_W8A8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
    "group_0": {"targets": ["Linear"],
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                      "dynamic": True, "strategy": "token"},
                "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                            "strategy": "channel"}}}}


def _with_activations(config: dict, **changes) -> dict:
    config = json.loads(json.dumps(config))
    config["config_groups"]["group_0"]["input_activations"].update(changes)
    return config


@pytest.mark.parametrize("qconfig,dtype,refused", [
    (None, "float32", None),
    (CT_W4A16, "bfloat16", None),
    (CT_W4A16, "float16", None),
    (CT_W4A16, "float32", "needs 16-bit activations"),
    (CT_W8A8, "float32", None),
    (CT_W8A8, "bfloat16", None),
    (_with_activations(CT_W8A8, symmetric=False), "float32", None),
    (_with_activations(CT_W8A8, symmetric=False), "bfloat16", "decodes wrong in bfloat16"),
    (_with_activations(CT_W8A8, dynamic=False), "float32", "does not run"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32}, "bfloat16", None),
    ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "bfloat16", "does not run GPTQ 8-bit"),
    ({"quant_method": "awq", "bits": 4}, "float32", "needs 16-bit activations"),
    ({"quant_method": "fp8"}, "bfloat16", "does not run fp8-quantized"),
    ({"quant_method": "bitsandbytes"}, "bfloat16", "does not run bitsandbytes-quantized"),
])
def test_which_layouts_a_streaming_engine_runs(qconfig, dtype, refused):
    reason = weights.quantization_refusal(qconfig, dtype)
    if refused is None:
        assert reason is None
    else:
        assert refused in reason and "\n" not in reason


def _checkpoint(path, qconfig=None):
    path.mkdir()
    config = {"architectures": ["LlamaForCausalLM"]}
    if qconfig:
        config["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_a_checkpoint_chooses_its_own_dtype(tmp_path):
    assert choose_model(_checkpoint(tmp_path / "dense")).dtype == "float32"
    assert choose_model(_checkpoint(tmp_path / "q4", CT_W4A16)).dtype == "bfloat16"
    assert choose_model(_checkpoint(tmp_path / "q8", CT_W8A8)).dtype == "float32"
    # "auto" is the command line's default: with --model it gives way to the checkpoint.
    assert choose_model(str(tmp_path / "q4"), "auto").weights is None
    with pytest.raises(UsageError, match="--weights q4 chooses the default model's format"):
        choose_model(str(tmp_path / "dense"), "q4")


def test_the_default_model_by_format(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMSINK_CACHE", str(tmp_path))
    monkeypatch.setattr(model_store, "_dequantize_gguf",
                        lambda gguf, out: (out / "config.json").write_text("{}"))
    written = []

    def quantize(source, out_dir, checkpoint):
        written.append((source.name, checkpoint))
        (out_dir / "config.json").write_text(json.dumps({"quantization_config": CT_W4A16}))

    monkeypatch.setattr(model_store, "_quantize", quantize)
    q4 = choose_model(None, "q4")
    assert q4.path.endswith("SmolLM2-135M-Instruct-q4") and q4.dtype == "bfloat16"
    assert written == [("SmolLM2-135M-Instruct", "q4")]
    assert choose_model(None, "q4").path == q4.path and len(written) == 1  # prepared once
    fp32, bf16 = choose_model(None, "fp32"), choose_model(None, "bf16")
    assert fp32.path == bf16.path and (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    # The Python tools default to the dense fp32 checkpoint (exact against the reference).
    assert choose_model(None).weights == "fp32"


def test_an_interrupted_quantization_leaves_nothing_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMSINK_CACHE", str(tmp_path))
    monkeypatch.setattr(model_store, "_dequantize_gguf",
                        lambda gguf, out: (out / "config.json").write_text("{}"))

    def dies(source, out_dir, checkpoint):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_store, "_quantize", dies)
    with pytest.raises(KeyboardInterrupt):
        model_store.prepare_default_model(progress=False, checkpoint="q8")
    assert not model_store.default_model_dir("q8").exists()
    assert model_store.default_model_dir().exists()   # the dense one it came from stays


def test_worker_threads_take_a_small_machine(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(engine_args.os, "sched_getaffinity", lambda pid: {0, 1})
    assert engine_args.worker_threads_environment() == {"VLLM_CPU_OMP_THREADS_BIND": "0,1"}
    monkeypatch.setattr(engine_args.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert engine_args.worker_threads_environment() == {}   # vLLM's own binding
    monkeypatch.setattr(engine_args.os, "sched_getaffinity", lambda pid: {2, 3})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "3")
    assert engine_args.worker_threads_environment() == {}   # the user's choice stays


def test_a_changed_recipe_is_prepared_again(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("STREAMSINK_CACHE", str(tmp_path))
    monkeypatch.setattr(model_store, "_dequantize_gguf",
                        lambda gguf, out: (out / "config.json").write_text("{}"))
    written = []
    monkeypatch.setattr(model_store, "_quantize", lambda source, out_dir, checkpoint: (
        written.append(checkpoint), (out_dir / "config.json").write_text("{}")))
    model_store.prepare_default_model(progress=False, checkpoint="q4")
    model_store.prepare_default_model(progress=False, checkpoint="q4")
    assert written == ["q4"]
    changed = dataclasses.replace(model_store.RECIPES["q4"], group_size=64)
    monkeypatch.setitem(model_store.RECIPES, "q4", changed)
    model_store.prepare_default_model(progress=False, checkpoint="q4")
    assert written == ["q4", "q4"]
