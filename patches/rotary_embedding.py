"""Patch: RoPE at exact float64 angles for streaming engines.

Why: vLLM's RotaryEmbedding looks positions up in a cos/sin table of max_position_embeddings rows
built from fp32 angles. A stream runs past that table (out-of-range index, or a silent
out-of-bounds read in the C++ op), and fp32 angles at position 10^6 are off by ~0.1 rad.
How: RotaryEmbedding.forward (which only dispatches to forward_native/forward_cpu) is wrapped; when
the step's attention metadata carries a streamsink plan, the rotation uses the plan's table, built
once per step from float64 angles for exactly the step's positions, through vLLM's own
in-place CPU RoPE op (the one stock eager mode uses), with row indices into that table.
Other engines take the original path untouched.
Delete when: vLLM computes RoPE angles on the fly (or in float64) for positions past the table, or
offers a hook to supply per-step cos/sin.
"""
from __future__ import annotations

from streamsink.patches import PatchTargetMoved

_original_forward = None


def current_plan():
    """The streamsink StepPlan of the step being executed, if any (cheap: runs per layer)."""
    if not _is_forward_context_available():
        return None
    metadata = _get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else None
    if not metadata:
        return None
    return getattr(next(iter(metadata.values())), "streamsink", None)


def _streaming_forward(self, positions, query, key=None):
    # Runs per layer per step: imports are resolved once, in apply().
    plan = current_plan()
    if plan is None:
        return _original_forward(self, positions, query, key)
    if plan.rope_cos_sin.shape[0] != positions.shape[0]:
        raise RuntimeError("streamsink: RoPE table does not match the step's positions")
    # vLLM's own in-place CPU RoPE op, fed the step's table and row indices into it.
    _ops.rotary_embedding(plan.rope_index, query, key, self.head_size, plan.rope_cos_sin,
                         self.is_neox_style)
    return query, key


_ops = _get_forward_context = _is_forward_context_available = None


def apply() -> None:
    global _original_forward, _ops, _get_forward_context, _is_forward_context_available
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    if _original_forward is not None:
        return
    import inspect

    from vllm import _custom_ops as ops
    from vllm.model_executor.custom_op import CustomOp

    op_params = list(inspect.signature(ops.rotary_embedding).parameters)
    if RotaryEmbedding.forward is not CustomOp.forward or \
            op_params[:6] != ["positions", "query", "key", "head_size", "cos_sin_cache",
                              "is_neox"]:
        raise PatchTargetMoved("RotaryEmbedding changed: expected CustomOp.forward and "
                               "ops.rotary_embedding(positions, query, key, head_size, "
                               "cos_sin_cache, is_neox)")
    from vllm.forward_context import get_forward_context, is_forward_context_available

    _ops, _get_forward_context = ops, get_forward_context
    _is_forward_context_available = is_forward_context_available
    _original_forward = RotaryEmbedding.forward
    RotaryEmbedding.forward = _streaming_forward
