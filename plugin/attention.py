"""The streaming attention path: vLLM's CPU attention backend, extended with sinks + window.

Registered over CPU_ATTN (vLLM's own override hook, register_backend), so every attention layer
on CPU goes through these classes; for an engine without a streamsink config they are exactly the
stock classes. With one:

- the KV write is stock (keys rotated at their row positions, stock cache layout); the layers'
  KV spec becomes the streaming one in the model runner (patches/kv_cache_spec.py);
- vLLM's C++ kernel with a sliding window of C = S+W computes every request it can (dense
  requests, and decodes past C after writing the S sink "shadows": docs/architecture.md §4,
  option 4; O(S) writes per decode per layer, see step_plan.py) — the whole step in one call
  when all can;
- the other requests (prefill chunks past C) read the window and sink blocks the step plan lists:
  window keys as stored, through PyTorch's fused CPU attention, and sink keys against the query
  re-rotated to its in-cache slot (option 2: O(S) extra work per query, none per window key),
  merged by log-sum-exp.

ALiBi models (BLOOM, Falcon-RW) store nothing positional in a key: a shadow is a plain copy, and
vLLM's kernel biases by the difference of logical slots, which shadows make the in-cache
distance; the PyTorch path adds each head's bias by in-cache distance (attend_tile).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm import envs
from vllm.config import get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from streamsink import shadow_op
from streamsink.config import streaming_config
from streamsink.kv_cache_layout import split_kv_cache
from streamsink.rope import RopeSpec, rope_spec_from_hf_config, rotate
from streamsink.row_window import rows_of_config
from streamsink.step_plan import DecodeBatch, QueryTile, ShadowWrites, StepPlan, plan_step
from streamsink.vllm_internals import custom_ops as ops


@dataclass
class StreamsinkMetadata(CPUAttentionMetadata):
    step_plan: StepPlan | None = None   # what every layer of a streaming engine's step needs


class StreamsinkMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.streamsink = streaming_config(vllm_config)
        self.rope = (rope_spec_from_hf_config(vllm_config.model_config.hf_text_config)
                     if self.streamsink else None)
        self._layer_caches: list[torch.Tensor] | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.streamsink is None:
            return md  # stock engine: stock metadata, nothing added per step
        out = StreamsinkMetadata(**vars(md))
        cm = common_attn_metadata
        seq_lens = cm.seq_lens[:cm.num_reqs].tolist()
        query_start = cm.query_start_loc_cpu[:cm.num_reqs + 1].tolist()
        rows = rows_of_config(self.vllm_config)
        shapes = rows.step_shapes if rows is not None else None
        out.step_plan = plan = plan_step(
            self.streamsink, self.rope, self.block_size, seq_lens=seq_lens,
            query_start=query_start, block_table=cm.block_table_tensor[:cm.num_reqs],
            dtype=self.dtype, kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            shapes=shapes if shapes is not None and len(shapes) == cm.num_reqs else None)
        if plan.shadows is not None:
            plan.shadows.layer_caches = self.layer_caches()
        if plan.kernel_reqs:
            self._kernel_part(plan, md, seq_lens, query_start)
        return out

    def layer_caches(self) -> list[torch.Tensor] | None:
        """The KV cache of each layer this metadata serves (one per distinct tensor), once vLLM
        has bound them all with one shape and dtype; None until then."""
        if self._layer_caches is None:
            layers = get_layers_from_vllm_config(self.vllm_config, Attention, self.layer_names)
            caches = [getattr(layer, "kv_cache", None) for layer in layers.values()]
            if caches and all(isinstance(c, torch.Tensor) and c.dim() == 4 for c in caches):
                distinct = list({c.data_ptr(): c for c in caches}.values())
                if len({(c.shape, c.dtype) for c in distinct}) == 1:
                    self._layer_caches = distinct
        return self._layer_caches

    def _kernel_part(self, plan: StepPlan, md: CPUAttentionMetadata, seq_lens: list[int],
                     query_start: list[int]) -> None:
        """The kernel's metadata for the kernel requests of a mixed step (what super().build
        makes for a whole decoder step, restricted to those rows)."""
        reqs = plan.kernel_reqs
        lens = [query_start[r + 1] - query_start[r] for r in reqs]
        sub_start = torch.tensor([0] + lens, dtype=md.query_start_loc.dtype).cumsum(0).to(
            md.query_start_loc.dtype)
        sub_seq_lens = md.seq_lens[reqs]
        ranges = [(query_start[r], query_start[r + 1]) for r in reqs]
        if all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])):
            plan.kernel_tokens = slice(ranges[0][0], ranges[-1][1])
        else:
            plan.kernel_tokens = torch.cat([torch.arange(a, b) for a, b in ranges])
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(reqs), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=sub_seq_lens, dtype=self.dtype,
            query_start_loc=sub_start, causal=True, sliding_window_size=self.window_size,
            isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype)
        plan.kernel_metadata = CPUAttentionMetadata(
            num_actual_tokens=sum(lens), max_query_len=max(lens), query_start_loc=sub_start,
            max_seq_len=max(seq_lens[r] for r in reqs), seq_lens=sub_seq_lens,
            block_table=md.block_table[reqs], slot_mapping=md.slot_mapping,
            scheduler_metadata=scheduler_metadata, causal=True)


def attend_tile(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tile: QueryTile,
                scale: float, rope: RopeSpec | None,
                alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Sink + window attention of one tile. query [T, Hq, D] -> [T, Hq, D].

    The window part runs in PyTorch's fused CPU attention (flash-style, multithreaded), which
    returns the log-sum-exp too; the <= S sink logits use the query re-rotated to its in-cache
    slot and join by log-sum-exp, as vLLM's cascade attention merges partial states. An ALiBi
    model (rope None, alibi_slopes [Hq]) adds -slope * (in-cache distance) to both parts."""
    T, Hq, D = query.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv

    def gather(blocks, k_layout):  # -> [Hq, NB*B, D], KV heads repeated for their query heads
        if k_layout:
            x = keys[blocks].permute(1, 0, 3, 2)     # [NB, Hkv, D, B] -> [Hkv, NB, B, D]
        else:
            x = values[blocks].transpose(0, 1)       # [NB, Hkv, B, D] -> [Hkv, NB, B, D]
        return x.reshape(Hkv, -1, D).repeat_interleave(G, dim=0)

    window_mask, sink_bias = tile.window_mask, None
    if alibi_slopes is not None:
        window_mask, sink_bias = _alibi_biases(tile, alibi_slopes, query.dtype)
    q = query.transpose(0, 1)                        # [Hq, T, D]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None].contiguous(), gather(tile.window_blocks, True)[None],
        gather(tile.window_blocks, False)[None], 0.0, False, attn_mask=window_mask,
        scale=scale)
    out, lse = out[0], lse[0]                        # [Hq, T, D], [Hq, T] (lse in fp32)
    if tile.sink_mask is not None:
        # The merge runs in the log-sum-exp's dtype (fp32 for bf16 models).
        acc = lse.dtype
        S = tile.sink_mask.shape[-1]
        sink_q = q if rope is None else rotate(q, tile.sink_rotation[None], rope.rotary_dim,
                                                rope.neox_style)
        sink_k = gather(tile.sink_blocks, True)[:, :S].to(acc)
        sink_v = gather(tile.sink_blocks, False)[:, :S].to(acc)
        logits = torch.matmul(sink_q.to(acc), sink_k.transpose(1, 2)).mul_(scale)
        logits.add_(tile.sink_mask)
        if sink_bias is not None:
            logits.add_(sink_bias)
        out = out.to(acc)
        top = torch.maximum(lse, logits.amax(dim=-1))            # [Hq, T]
        window_weight = (lse - top).exp_()
        sink_weights = (logits - top[..., None]).exp_()          # [Hq, T, S]
        denominator = window_weight + sink_weights.sum(dim=-1)
        out = (out * window_weight[..., None] + torch.matmul(sink_weights, sink_v)) \
            / denominator[..., None]
    return out.transpose(0, 1)


def attend_decode_batch(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        batch: DecodeBatch, scale: float, rope: RopeSpec) -> torch.Tensor:
    """attend_tile for a batch of R queries of a RoPE model (rows of small tiles of any
    requests): query [R, Hq, D] -> [R, Hq, D].

    The same attention in plain matmuls: window and sink (pinned) logits side by side in one
    softmax, in fp32 at least, each KV head with its G query heads side by side. Keys and values
    are read block by block where the cache keeps them (one index_select each, no copy per
    query head, no transposing copy: keys are stored [D, B] per block and KV head, the layout a
    matmul wants); at decode size that copying, not the arithmetic, is the cost."""
    R, Hq, D = query.shape
    Hkv, B = keys.shape[1], keys.shape[-1]
    G = Hq // Hkv
    acc = torch.promote_types(query.dtype, torch.float32)

    def scores(q, blocks, mask):  # -> [R, Hkv, G, NB*B], masked
        NB = blocks.shape[1]
        k = keys.index_select(0, blocks.flatten()).view(R, NB, Hkv, D, B).to(acc)
        s = torch.matmul(q.view(R, 1, Hkv, G, D).to(acc), k).mul_(scale)  # [R, NB, Hkv, G, B]
        s = s.permute(0, 2, 3, 1, 4).reshape(R, Hkv, G, NB * B)
        return s.add_(mask[:, None, None, :].to(acc))

    def mix(weights, blocks):  # weights [R, Hkv, G, NB*B] -> [R, Hkv, G, D]
        NB = blocks.shape[1]
        v = values.index_select(0, blocks.flatten()).view(R, NB, Hkv, B, D).to(acc)
        w = weights.reshape(R, Hkv, G, NB, B).permute(0, 3, 1, 2, 4)   # [R, NB, Hkv, G, B]
        return torch.matmul(w, v).sum(1)

    parts = [scores(query, batch.window_blocks, batch.window_mask)]
    if batch.sink_blocks is not None:
        sink_q = rotate(query, batch.sink_rotation[:, None], rope.rotary_dim, rope.neox_style)
        parts.append(scores(sink_q, batch.sink_blocks, batch.sink_mask))
    weights = torch.softmax(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0], dim=-1)
    window_columns = parts[0].shape[-1]
    out = mix(weights[..., :window_columns], batch.window_blocks)
    if len(parts) > 1:
        out += mix(weights[..., window_columns:], batch.sink_blocks)
    return out.reshape(R, Hq, D)


def _alibi_biases(tile: QueryTile, slopes: torch.Tensor, dtype: torch.dtype):
    """(window mask with each head's ALiBi bias [1, Hq, T, NB*B], sink bias [Hq, T, S] or None),
    in fp32 at least whatever the model's dtype (the fused kernel takes an fp32 mask with a bf16
    query, and a bias of hundreds in bf16 would be off by whole units; with a float64 query it
    needs a float64 mask). Built by the step's first layer and shared by the others: every
    layer has the same slopes."""
    key = tuple(slopes.tolist())
    cached = tile.alibi_biases.get(key)
    if cached is None:
        acc = torch.promote_types(dtype, torch.float32)
        per_head = -slopes.to(acc)[:, None, None]
        window = tile.window_mask.to(acc) + per_head * tile.window_distance.to(acc)
        sink = None if tile.sink_distance is None else per_head * tile.sink_distance.to(acc)
        cached = tile.alibi_biases[key] = (window, sink)
    return cached


class StreamsinkAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.streamsink = streaming_config(vllm_config)
        self.rope: RopeSpec | None = None
        if self.streamsink is not None:
            self.rope = rope_spec_from_hf_config(vllm_config.model_config.hf_text_config)
            if (self.rope is None) == (self.alibi_slopes is None):
                # The config and the layer disagree on how positions are encoded.
                raise RuntimeError(
                    "streamsink: this attention layer has " + (
                        "ALiBi slopes but the model config has RoPE" if self.rope is not None
                        else "no ALiBi slopes but the model config uses ALiBi"))
            # The kernel's left window; the metadata builder picks it up from the layers.
            self.sliding_window = self.streamsink.cache_tokens
        self.native_shadows = (shadow_op.shadow_writer(vllm_config.model_config.dtype)
                               if self.streamsink is not None else None)

    def _write_shadows(self, layer, kv_cache: torch.Tensor, shadows: ShadowWrites) -> None:
        """Sink j's K/V, rotated from position j to i-C+1+j (copied as is for ALiBi), into the
        slots the window left.

        With the native op (shadow_op.py) the first layer of the step writes them for every
        layer in one call: the slots are the same in all, and no layer reads them before its own
        attention. Without it, three stock ops per layer."""
        if self.native_shadows is not None:
            caches = shadows.layer_caches
            if caches is None or not any(c.data_ptr() == kv_cache.data_ptr() for c in caches):
                caches = [kv_cache]   # not bound as the builder saw them: this layer alone
            rope = self.rope
            shadow_op.write_shadows(self.native_shadows, caches, shadows.source_slots,
                                    shadows.slots, shadows.positions,
                                    shadows.rotation_table_f32, self.head_size,
                                    0 if rope is None else rope.rotary_dim,
                                    adjacent_pairs=rope is not None and not rope.neox_style)
            shadows.written.update(c.data_ptr() for c in caches)
            return
        # One gather of the sinks' keys and values, vLLM's in-place RoPE op on the keys, and
        # vLLM's cache write to the shadow slots (a flat index_copy_ took ~1.4x as long).
        sink_kv = kv_cache.view(-1).index_select(0, shadows.source_index)
        self._place_shadows(layer, kv_cache, shadows, sink_kv)

    def _place_shadows(self, layer, kv_cache: torch.Tensor, shadows: ShadowWrites,
                       sink_kv: torch.Tensor) -> None:
        """Rotate the gathered sink keys in place and write keys and values to the shadow slots
        (benchmarks/shadow_cost.py times this part alone)."""
        keys = sink_kv[:shadows.key_elements].view(-1, self.num_kv_heads * self.head_size)
        if self.rope is not None:
            ops.rotary_embedding(shadows.positions, keys, None, self.head_size,
                                 shadows.rotation_table, self.rope.neox_style)
        num_blocks, kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, kv_heads, 2 * block_size,
                                               -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            keys.view(-1, kv_heads, self.head_size),
            sink_kv[shadows.key_elements:].view(-1, kv_heads, self.head_size),
            key_cache, value_cache, shadows.slots, layer.isa)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "step_plan", None)
        if plan is not None and plan.shadows is not None \
                and kv_cache.data_ptr() not in plan.shadows.written:
            self._write_shadows(layer, kv_cache, plan.shadows)
        if plan is None or plan.kernel:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if plan.kernel_metadata is not None:
            self._kernel_requests(layer, query, kv_cache, plan, output)
        keys, values = split_kv_cache(kv_cache)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        q_all = query.view(query.shape[0], self.num_heads, self.head_size)
        if plan.decodes is not None:
            out[plan.decodes.tokens] = attend_decode_batch(
                q_all[plan.decodes.tokens], keys, values, plan.decodes, self.scale,
                self.rope).to(out.dtype)
        for tile in plan.tiles:
            out[tile.tokens] = attend_tile(q_all[tile.tokens], keys, values, tile, self.scale,
                                           self.rope, self.alibi_slopes).to(out.dtype)
        return output

    def _kernel_requests(self, layer, query, kv_cache, plan: StepPlan, output) -> None:
        """vLLM's kernel on the kernel requests of a mixed step (their tokens are usually one
        contiguous run: decodes come first in vLLM's batches)."""
        tokens = plan.kernel_tokens
        if isinstance(tokens, slice):
            super().forward(layer, query[tokens], None, None, kv_cache, plan.kernel_metadata,
                            output[tokens])
            return
        part = output[tokens]
        super().forward(layer, query[tokens], None, None, kv_cache, plan.kernel_metadata, part)
        output[tokens] = part


class StreamsinkAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with the streaming path; get_name() stays "CPU_ATTN" as vLLM requires."""

    @staticmethod
    def get_impl_cls():
        return StreamsinkAttentionImpl

    @staticmethod
    def get_builder_cls():
        return StreamsinkMetadataBuilder


def register_attention_backend() -> None:
    register_backend(AttentionBackendEnum.CPU_ATTN,
                     f"{StreamsinkAttentionBackend.__module__}.StreamsinkAttentionBackend")
