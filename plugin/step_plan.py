"""Per-step plan of the streaming attention path, built once per step and shared by all layers.

For each request the plan lists the KV blocks that hold visible keys (the sink blocks, then the
window blocks), which key columns each query may see, and the rotation that moves a query from its
absolute position to its in-cache slot for the sink logits. Everything here is about positions and
blocks; no model tensors.

Positions here are *row positions* (see row_window.py): a long stream's worker row is rebased so
that its recent tokens sit at p' = p - offset. Visibility and slots only use differences of row
positions; RoPE angles (the model's table, the sink rotations, the shadows) add the offset back.

Semantics (DESIGN.md §1): query i sees j <= i with j < S or j > i - W; with n = min(i+1, C) the
query sits at slot n-1 and a window key j at slot n-1-(i-j), so keys rotated at their absolute
positions already give the right window logits. Only sink logits need the query rotated by
(n-1) - i, a rotation by a non-positive angle that is zero while i < C.

Two ways to compute a step (DESIGN.md §3 options 4 and 2):
- kernel step: every request is dense (all its queries < C) or a decode at i >= C+S-1. For each
  such decode the plan lists "shadow" writes: sink j's K/V, re-rotated to position i-C+1+j, into
  the slots of the S tokens just evicted. The last C slots then read as one contiguous run of
  exactly the keys query i must see, at the right distances, and vLLM's C++ kernel with a
  sliding window of C computes StreamingLLM attention unchanged.
- PyTorch step (any other step, e.g. a prefill chunk past C): per-request groups of blocks and
  visibility masks for attend_group in attention.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamsink.config import StreamsinkConfig
from streamsink.rope import RopeSpec

# Queries of one prefill chunk are processed in tiles of this many, so the logits of one tile
# stay small (tile x (S + W + tile) per head) and each tile reads only the blocks it can see.
PREFILL_TILE = 256


@dataclass
class AttentionGroup:
    """Rows of queries attended together: R rows of T queries over NB blocks each."""

    token_idx: torch.Tensor        # [R, T] rows of query/output in the step's token order
    block_ids: torch.Tensor        # [R, NB] physical KV blocks (padding repeats a real block)
    bias: torch.Tensor             # [R, NB, 1, T, 1, B] 0 where the key is visible, else -inf
    sink_blocks: int               # the first sink_blocks blocks of every row may hold sinks
    sink_col_mask: torch.Tensor    # [R, sink_blocks, 1, 1, B] column holds a sink token
    sink_rotation: torch.Tensor | None  # [R, T, rotary_dim] cos|sin, None if every query is dense


@dataclass
class ShadowWrites:
    """Sink K/V to copy, re-rotated, into the slots the window just left (kernel steps).

    Sources are flat indices into one layer's KV cache tensor (the same for every layer), in the
    CPU backend's "vec" layout: per (block, KV head) a page of [head_dim, B] keys, then [B,
    head_dim] values."""

    key_index: torch.Tensor        # [N * Hkv * D] flat index of sink keys, as [N, Hkv, D]
    value_index: torch.Tensor      # [N * Hkv * D] flat index of sink values, as [N, Hkv, D]
    rotation_index: torch.Tensor   # arange(N): rows of rotation
    rotation: torch.Tensor         # [N, rotary_dim] cos|sin: from position j to i-C+1+j
    slots: torch.Tensor            # [N] destination slot (block * B + offset)


@dataclass
class StepPlan:
    rope_index: torch.Tensor       # arange(num_tokens): rows of rope_cos_sin
    rope_cos_sin: torch.Tensor     # [num_tokens, rotary_dim] RoPE table at absolute positions
    kernel: bool                   # vLLM's kernel with a window of C computes this step
    shadows: ShadowWrites | None = None
    groups: list[AttentionGroup] = field(default_factory=list)


def _logical_blocks(first_query: int, last_query: int, cfg: StreamsinkConfig,
                    block_size: int) -> list[int]:
    """Logical block indices holding keys visible to queries first_query..last_query."""
    sinks = range(0, -(-min(cfg.sink_tokens, last_query + 1) // block_size))
    window_start = max(first_query - cfg.window_tokens + 1, 0)
    window = range(window_start // block_size, last_query // block_size + 1)
    return sorted(set(sinks) | set(window))


def _group(rows: list[tuple[list[int], list[int], list[int]]], block_table: torch.Tensor,
           row_requests: list[int], position_offsets: list[int], cfg: StreamsinkConfig,
           rope: RopeSpec, block_size: int, dtype: torch.dtype) -> AttentionGroup:
    """rows: (token indices, query row positions, logical blocks) per row; equal T per row;
    position_offsets: absolute minus row position, per row."""
    num_blocks = max(len(r[2]) for r in rows)
    token_idx = torch.tensor([r[0] for r in rows], dtype=torch.long)
    qpos = torch.tensor([r[1] for r in rows], dtype=torch.long)               # [R, T]
    logical = torch.full((len(rows), num_blocks), -1, dtype=torch.long)
    for i, (_, _, blocks) in enumerate(rows):
        logical[i, :len(blocks)] = torch.tensor(blocks)
    valid_block = logical >= 0
    # Padding columns point at the row's first real block (finite data) and are never visible.
    physical = block_table[torch.tensor(row_requests)[:, None], logical.clamp(min=0)].long()
    physical = torch.where(valid_block, physical, physical[:, :1])
    offsets = torch.arange(block_size)
    colpos = (logical[:, :, None] * block_size + offsets).flatten(1)         # [R, NB*B]
    colpos = torch.where(valid_block.repeat_interleave(block_size, dim=1), colpos, -1)
    col, q = colpos[:, None, :], qpos[:, :, None]
    visible = ((col >= 0) & (col <= q)
               & ((col < cfg.sink_tokens) | (col > q - cfg.window_tokens)))
    R, T, NB = qpos.shape[0], qpos.shape[1], num_blocks
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    bias = bias.view(R, T, NB, block_size).permute(0, 2, 1, 3)[:, :, None, :, None, :]
    sink_blocks = min(-(-cfg.sink_tokens // block_size), NB)
    sink_cols = colpos[:, :sink_blocks * block_size]
    sink_col_mask = ((sink_cols >= 0) & (sink_cols < cfg.sink_tokens)).view(
        R, sink_blocks, 1, 1, block_size)
    sink_rotation = None
    absolute = qpos + torch.tensor(position_offsets, dtype=torch.long)[:, None]
    if cfg.sink_tokens and bool((absolute >= cfg.cache_tokens).any()):
        # From the query's absolute position to its in-cache slot n-1 (row positions of a
        # rebased row are >= C-1, like the absolute ones, so the clamp reads the same).
        delta = qpos.clamp(max=cfg.cache_tokens - 1) - absolute                # <= 0
        sink_rotation = rope.cos_sin(delta.flatten(), dtype).view(*qpos.shape, -1)
    return AttentionGroup(token_idx, physical, bias.contiguous(), sink_blocks, sink_col_mask,
                          sink_rotation)


def _kernel_can_run(cfg: StreamsinkConfig, seq_len: int, query_len: int) -> bool:
    # Dense, or a decode whose shadow slots (i-C+1 .. i-C+S) lie past the real sinks.
    return (seq_len <= cfg.cache_tokens
            or (query_len == 1 and seq_len - 1 >= cfg.cache_tokens + cfg.sink_tokens - 1))


def _vec_layout_index(blocks: torch.Tensor, offsets: torch.Tensor, kv_heads: int,
                      head_dim: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the keys and values of tokens (block, offset): [N, kv_heads, head_dim]."""
    page = 2 * block_size * head_dim
    heads = torch.arange(kv_heads)[None, :, None]
    dims = torch.arange(head_dim)[None, None, :]
    base = blocks[:, None, None] * kv_heads * page + heads * page
    keys = base + dims * block_size + offsets[:, None, None]
    values = base + block_size * head_dim + offsets[:, None, None] * head_dim + dims
    return keys.flatten(), values.flatten()


def _shadow_writes(cfg: StreamsinkConfig, rope: RopeSpec, block_size: int,
                   seq_lens: list[int], offsets: list[int], block_table: torch.Tensor,
                   kv_heads: int, dtype: torch.dtype) -> ShadowWrites | None:
    rows = [(r, n - 1) for r, n in enumerate(seq_lens) if n > cfg.cache_tokens]
    if not rows or not cfg.sink_tokens:
        return None
    sinks = torch.arange(cfg.sink_tokens)
    req = torch.tensor([r for r, _ in rows]).repeat_interleave(cfg.sink_tokens)
    shift = torch.tensor([i - cfg.cache_tokens + 1 for _, i in rows])     # i - C + 1 >= S
    angle_shift = shift + torch.tensor([offsets[r] for r, _ in rows])     # absolute positions
    source = sinks.repeat(len(rows))
    dest = shift.repeat_interleave(cfg.sink_tokens) + source
    sink_blocks = block_table[req, source // block_size].long()
    dest_blocks = block_table[req, dest // block_size].long()
    key_index, value_index = _vec_layout_index(sink_blocks, source % block_size, kv_heads,
                                               rope.head_dim, block_size)
    return ShadowWrites(key_index=key_index, value_index=value_index,
                        rotation_index=torch.arange(len(dest)),
                        rotation=rope.cos_sin(angle_shift.repeat_interleave(cfg.sink_tokens),
                                              dtype),
                        slots=dest_blocks * block_size + dest % block_size)


def plan_step(cfg: StreamsinkConfig, rope: RopeSpec, block_size: int, seq_lens: list[int],
              query_start: list[int], block_table: torch.Tensor, positions: torch.Tensor,
              dtype: torch.dtype, kv_heads: int = 1,
              offsets: list[int] | None = None) -> StepPlan:
    """seq_lens, positions and block_table in row positions; offsets[r] = absolute minus row
    position of request r (None: all zero)."""
    num_tokens = positions.shape[0]
    query_lens = [query_start[r + 1] - query_start[r] for r in range(len(seq_lens))]
    offsets = offsets if offsets is not None else [0] * len(seq_lens)
    absolute = positions.clone()
    for r, offset in enumerate(offsets):
        if offset:
            absolute[query_start[r]:query_start[r + 1]] += offset
    plan = StepPlan(rope_index=torch.arange(num_tokens),
                    rope_cos_sin=rope.cos_sin(absolute, dtype),
                    kernel=all(_kernel_can_run(cfg, n, q) for n, q in zip(seq_lens, query_lens)))
    if plan.kernel:
        plan.shadows = _shadow_writes(cfg, rope, block_size, seq_lens, offsets, block_table,
                                      kv_heads, dtype)
        return plan
    decode_rows, decode_reqs = [], []
    for r, seq_len in enumerate(seq_lens):
        start, end = query_start[r], query_start[r + 1]
        first = seq_len - (end - start)
        if end - start == 1:
            decode_rows.append(([start], [first], _logical_blocks(first, first, cfg, block_size)))
            decode_reqs.append(r)
            continue
        for t0 in range(start, end, PREFILL_TILE):
            t1 = min(t0 + PREFILL_TILE, end)
            p0, p1 = first + (t0 - start), first + (t1 - start) - 1
            row = (list(range(t0, t1)), list(range(p0, p1 + 1)),
                   _logical_blocks(p0, p1, cfg, block_size))
            plan.groups.append(_group([row], block_table, [r], [offsets[r]], cfg, rope,
                                      block_size, dtype))
    if decode_rows:
        plan.groups.append(_group(decode_rows, block_table, decode_reqs,
                                  [offsets[r] for r in decode_reqs], cfg, rope, block_size,
                                  dtype))
    return plan
