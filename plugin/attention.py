"""The streaming attention path: vLLM's CPU attention backend, extended with sinks + window.

Registered over CPU_ATTN (vLLM's own override hook, register_backend), so every attention layer
on CPU goes through these classes; for an engine without a streamsink config they are exactly the
stock classes. With one:

- the KV write is stock (keys rotated at their absolute positions, stock cache layout);
- every layer runs vLLM's C++ kernel with a sliding window of C = S+W when the step allows it
  (dense requests, and decodes past C after writing the S sink "shadows": DESIGN.md §3 option 4,
  O(S) writes per decode per layer, see step_plan.py);
- otherwise (prefill chunks past C) each layer reads the sink and window blocks the step plan
  lists and computes the logits in PyTorch: window keys as stored, sink keys against the query
  re-rotated to its in-cache slot (option 2: O(S) extra work per query, none per window key).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from streamsink.config import StreamsinkConfig, config_from_additional
from streamsink.kv_policy import StreamingSinkSpec
from streamsink.rope import RopeSpec, rope_spec_from_hf_config, rotate
from streamsink.row_window import row_offsets
from streamsink.step_plan import AttentionGroup, ShadowWrites, StepPlan, plan_step

# The streamsink config of the engine whose model this process built last. vLLM asks the backend
# to customize KV specs (customize_spec) without passing the config; one process builds one
# engine's model at a time, right before it asks.
_engine_config: StreamsinkConfig | None = None


@dataclass
class StreamsinkMetadata(CPUAttentionMetadata):
    streamsink: StepPlan | None = None


class StreamsinkMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.streamsink = config_from_additional(vllm_config.additional_config)
        self.rope = (rope_spec_from_hf_config(vllm_config.model_config.hf_text_config)
                     if self.streamsink else None)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.streamsink is None:
            return md  # stock engine: stock metadata, nothing added per step
        out = StreamsinkMetadata(**vars(md))
        cm = common_attn_metadata
        out.streamsink = plan_step(
            self.streamsink, self.rope, self.block_size,
            seq_lens=cm.seq_lens[:cm.num_reqs].tolist(),
            query_start=cm.query_start_loc_cpu[:cm.num_reqs + 1].tolist(),
            block_table=cm.block_table_tensor[:cm.num_reqs],
            positions=cm.positions, dtype=self.dtype, kv_heads=self.num_kv_heads,
            offsets=row_offsets(cm.num_reqs).tolist())
        return out


def _split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the stock CPU ("vec" ISA) layout: per block and KV head, keys are stored as
    [head_dim, block_size] (column-major) and values as [block_size, head_dim]."""
    num_blocks, kv_heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    pages = kv_cache.view(num_blocks, kv_heads, 2, block_size * d)
    keys = pages[:, :, 0].unflatten(-1, (d, block_size))
    values = pages[:, :, 1].unflatten(-1, (block_size, d))
    return keys, values


def attend_group(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 g: AttentionGroup, scale: float, rotary_dim: int) -> torch.Tensor:
    """Sink + window attention of one group. query [R, T, Hq, D] -> [R, Hkv, T*G, D] (by KV head).

    Works block by block on the gathered blocks ([R, NB, Hkv, D, B] keys as the cache stores them),
    so no gathered tensor is permuted; the softmax spans the (block, offset) dims together.
    """
    R, T, Hq, D = query.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv

    def by_kv_head(q):  # [R, T, Hq, D] -> [R, 1, Hkv, T*G, D], scaled
        return (q.view(R, T, Hkv, G, D).transpose(1, 2).reshape(R, 1, Hkv, T * G, D) * scale)

    k = keys[g.block_ids]                                    # [R, NB, Hkv, D, B]
    logits = torch.matmul(by_kv_head(query), k)              # [R, NB, Hkv, T*G, B]
    if g.sink_rotation is not None:
        sb = g.sink_blocks
        sink_query = rotate(query, g.sink_rotation[:, :, None, :], rotary_dim)
        sink_logits = torch.matmul(by_kv_head(sink_query), k[:, :sb])
        logits[:, :sb] = torch.where(g.sink_col_mask, sink_logits, logits[:, :sb])
    NB, B = logits.shape[1], logits.shape[-1]
    biased = logits.view(R, NB, Hkv, T, G, B).add_(g.bias).view(R, NB, Hkv, T * G, B)
    biased.sub_(biased.amax(dim=(1, 4), keepdim=True)).exp_()
    denominator = biased.sum(dim=(1, 4), keepdim=True)[:, 0]  # [R, Hkv, T*G, 1]
    v = values[g.block_ids]                                  # [R, NB, Hkv, B, D]
    return torch.matmul(biased, v).sum(dim=1).div_(denominator)


class StreamsinkAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        global _engine_config
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.streamsink = config_from_additional(vllm_config.additional_config)
        _engine_config = self.streamsink
        self.rope: RopeSpec | None = None
        if self.streamsink is not None:
            self.rope = rope_spec_from_hf_config(vllm_config.model_config.hf_text_config)
            # The kernel's left window; the metadata builder picks it up from the layers.
            self.sliding_window = self.streamsink.cache_tokens

    def _write_shadows(self, layer, kv_cache: torch.Tensor, shadows: ShadowWrites) -> None:
        """Sink j's K/V, rotated from position j to i-C+1+j, into the slots the window left.
        Four ops per layer: two gathers, vLLM's in-place RoPE op, vLLM's KV write."""
        flat = kv_cache.view(-1)
        width = self.num_kv_heads * self.head_size
        k = flat[shadows.key_index].view(-1, width)  # the RoPE op wants [tokens, heads*dim]
        v = flat[shadows.value_index].view(-1, self.num_kv_heads, self.head_size)
        ops.rotary_embedding(shadows.rotation_index, k, None, self.head_size, shadows.rotation,
                             True)
        super().do_kv_cache_update(layer, k.view_as(v), v, kv_cache, shadows.slots)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "streamsink", None)
        if plan is None or plan.kernel:
            if plan is not None and plan.shadows is not None:
                self._write_shadows(layer, kv_cache, plan.shadows)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        keys, values = _split_kv_cache(kv_cache)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        q_all = query.view(query.shape[0], self.num_heads, self.head_size)
        kv_heads = keys.shape[1]
        group = self.num_heads // kv_heads
        for g in plan.groups:
            R, T = g.token_idx.shape
            res = attend_group(q_all[g.token_idx], keys, values, g, self.scale,
                               self.rope.rotary_dim)        # [R, Hkv, T*G, D]
            res = res.view(R, kv_heads, T, group, self.head_size).transpose(1, 2)
            out[g.token_idx.flatten()] = res.reshape(R * T, self.num_heads,
                                                     self.head_size).to(out.dtype)
        return output


class StreamsinkAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with the streaming path; get_name() stays "CPU_ATTN" as vLLM requires."""

    @staticmethod
    def get_impl_cls():
        return StreamsinkAttentionImpl

    @staticmethod
    def get_builder_cls():
        return StreamsinkMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        cfg = _engine_config
        if cfg is None or type(spec) is not FullAttentionSpec or spec.non_causal:
            return spec
        own = {"sliding_window", "sink_tokens", "extra_retained_tokens"}
        fields = {f: getattr(spec, f) for f in StreamingSinkSpec.__dataclass_fields__
                  if f in spec.__dataclass_fields__ and f not in own}
        return StreamingSinkSpec(**fields, sliding_window=cfg.window_tokens,
                                 sink_tokens=cfg.sink_tokens)


def register_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN,
                     f"{StreamsinkAttentionBackend.__module__}.StreamsinkAttentionBackend")
