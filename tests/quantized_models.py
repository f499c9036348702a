"""Quantized copies of tiny random checkpoints, in every layout vLLM 0.32 reads on CPU, made by
the tests themselves: compressed-tensors through streamsink's own writer (quantize.py, the one
that prepares the default model), GPTQ and AWQ packed with vLLM's own helpers
(vllm.model_executor.layers.quantization.utils.quant_utils, what vLLM's kernel tests use).

Each writer returns (quantized directory, dequantized directory): the second is a dense checkpoint
holding the values the quantized one stands for (scale × (q − zero point), with the scales as the
checkpoint stores them), what the reference runs on."""
from __future__ import annotations

import json
import os
import shutil

import torch

GROUP = 32


def _linear_weights(dense_dir: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(dense_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(dense_dir, name)))
    with open(os.path.join(dense_dir, "config.json")) as f:
        config = json.load(f)
    return tensors, config


def _is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    # The decoder layers' projections; embeddings, norms and the output head stay dense.
    return (tensor.dim() == 2 and ".layers." in name and name.endswith(".weight")
            and "norm" not in name)


def _copy_side_files(dense_dir: str, out_dir: str) -> None:
    for name in os.listdir(dense_dir):
        if not name.endswith(".safetensors") and name != "config.json" and \
                os.path.isfile(os.path.join(dense_dir, name)):
            shutil.copy(os.path.join(dense_dir, name), out_dir)


def _save(out_dir: str, tensors: dict, config: dict, qconfig: dict | None,
          dense_dir: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if qconfig is not None:
        config = dict(config, quantization_config=qconfig)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    _copy_side_files(dense_dir, out_dir)
    return out_dir


def _dequantized_dir(out_dir: str) -> str:
    return out_dir.rstrip("/") + "-dequantized"


def _write_4bit(dense_dir: str, out_dir: str, qconfig: dict, quantize_linear) -> tuple[str, str]:
    """A checkpoint whose linear layers quantize_linear(w) turns into (tensors by suffix, the
    weight they stand for), the rest kept dense; and its dequantized copy."""
    tensors, config = _linear_weights(dense_dir)
    out, dequantized = {}, dict(tensors)
    for name, w in tensors.items():
        if not _is_quantized_linear(name, w):
            out[name] = w
            continue
        prefix = name[:-len(".weight")]
        parts, dequantized[name] = quantize_linear(w)
        out.update({f"{prefix}.{suffix}": t for suffix, t in parts.items()})
    return (_save(out_dir, out, config, qconfig, dense_dir),
            _save(_dequantized_dir(out_dir), dequantized, config, None, dense_dir))


def _dequantize(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """[K, N] integers (zero point already taken off) times [K/group, N] scales."""
    return q.float() * scales.float().repeat_interleave(group, dim=0)


def write_gptq(dense_dir: str, out_dir: str, group: int = GROUP) -> tuple[str, str]:
    """GPTQ 4-bit, symmetric (the only GPTQ type vLLM's CPU kernel takes), desc_act off."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        gptq_pack,
        pack_cols,
        quantize_weights,
    )
    from vllm.scalar_type import scalar_types

    def quantize_linear(w):
        k, n = w.shape[1], w.shape[0]
        _, q, scales, _ = quantize_weights(w.t().float(), scalar_types.uint4b8, group)
        scales = scales.to(torch.float16)
        # Symmetric: the zero point is the type's bias (8), stored minus one (GPTQ v1 format).
        zeros = torch.full((k // group, n), 7, dtype=torch.int32)
        return ({"qweight": gptq_pack(q, 4, k, n), "scales": scales,
                 "qzeros": pack_cols(zeros, 4, k // group, n),
                 "g_idx": torch.arange(k, dtype=torch.int32) // group},
                _dequantize(q - 8, scales, group).t())

    return _write_4bit(dense_dir, out_dir, {"quant_method": "gptq", "bits": 4,
                                            "group_size": group, "desc_act": False,
                                            "sym": True}, quantize_linear)


def write_awq(dense_dir: str, out_dir: str, group: int = GROUP) -> tuple[str, str]:
    """AWQ 4-bit GEMM layout: asymmetric, integer zero points, columns interleaved."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        awq_pack,
        quantize_weights,
    )
    from vllm.scalar_type import scalar_types

    def quantize_linear(w):
        k, n = w.shape[1], w.shape[0]
        _, q, scales, zeros = quantize_weights(w.t().float(), scalar_types.uint4, group,
                                               zero_points=True)
        scales = scales.to(torch.float16)
        return ({"qweight": awq_pack(q, 4, k, n), "qzeros": awq_pack(zeros, 4, k // group, n),
                 "scales": scales},
                _dequantize(q - zeros.repeat_interleave(group, dim=0), scales, group).t())

    return _write_4bit(dense_dir, out_dir, {"quant_method": "awq", "bits": 4,
                                            "group_size": group, "zero_point": True,
                                            "version": "gemm"}, quantize_linear)


def write_compressed_tensors(dense_dir: str, out_dir: str, recipe: str) -> tuple[str, str]:
    """compressed-tensors, through the writer that prepares the default model (quantize.py),
    with one of its RECIPES. The dequantized copy is what Hugging Face's own
    compressed-tensors loader decompresses the checkpoint to."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from streamsink.quantize import write_quantized

    write_quantized(dense_dir, out_dir, recipe)
    model = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False))
    tensors = {name: p.detach().clone() for name, p in model.state_dict().items()
               if not name.endswith(("_scale", "_zero_point", "weight_shape", "weight_packed"))}
    _, config = _linear_weights(dense_dir)
    return out_dir, _save(_dequantized_dir(out_dir), tensors, config, None, dense_dir)
