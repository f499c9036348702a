"""Per-step plan of the streaming attention path, built once per step and shared by all layers.

For each request the plan lists the KV blocks that hold visible keys (the sink blocks, then the
window blocks), which key columns each query may see, and the rotation that moves a query from its
absolute position to its in-cache slot for the sink logits. Everything here is about positions and
blocks; no model tensors.

Positions here are *row positions* (see row_window.py): a long stream's worker row is rebased so
that its recent tokens sit at p' = p - offset, and its cached keys are re-rotated to match, so the
model's RoPE, the sink rotations and the shadows all work on row positions, which stay below
max_model_len. Nothing here needs the absolute position.

Semantics (docs/architecture.md §1): query i sees j <= i with j < S or j > i - W; with
n = min(i+1, C) the query sits at slot n-1 and a window key j at slot n-1-(i-j), so keys rotated
at their absolute positions already give the right window logits. Only sink logits need the
query rotated by (n-1) - i, a rotation by a non-positive angle that is zero while i < C. ALiBi
models (rope None) store nothing positional: their bias is by in-cache distance, i - j for a
window key and n-1-j for a sink, which the kernel gets from shadow slots and the PyTorch path
from the tile's distances.

Two ways to compute a request's attention (docs/architecture.md §4, options 4 and 2), chosen
per request:
- kernel (stream_rule.kernel_can_run): the request is dense (all its queries < C) or a decode at
  i >= C+S-1. For each such decode the plan lists "shadow" writes (stream_rule.shadow_span):
  sink j's K/V, re-rotated to position i-C+1+j, into the slots of the S tokens just evicted.
  The last C slots then read as one contiguous run of exactly the keys query i must see, at the
  right distances, and vLLM's C++ kernel with a sliding window of C computes StreamingLLM
  attention unchanged.
- PyTorch (any other request, e.g. a prefill chunk past C): per-request tiles of queries, the
  window keys through PyTorch's fused attention and the sink keys merged in by log-sum-exp
  (QueryTile, attend_tile in attention.py); the queries of small tiles (decode-sized) instead
  go, all of the step's at once, through one softmax over both ranges in plain matmuls
  (DecodeBatch, attend_decode_batch).
A step whose requests all take the kernel is one kernel call, as in stock vLLM; a mixed step runs
the kernel on its kernel requests and PyTorch only on the others, so decodes never wait on the
slow path because a long prompt joined the batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from streamsink.config import StreamsinkConfig
from streamsink.kv_cache_layout import flat_kv_index
from streamsink.request_options import engine_shape
from streamsink.rope import RopeSpec
from streamsink.stream_rule import (
    StreamShape,
    front_blocks,
    in_window,
    kernel_can_run,
    query_slot,
    shadow_span,
    sink_outside_window,
    window_start,
)

# Queries of one prefill chunk are processed in tiles of this many, so the mask of one tile stays
# small (tile x (W + tile) entries) and each tile reads only the blocks it can see.
PREFILL_TILE = 256

# Tiles of at most this many queries (decodes, short chunks) of a RoPE model join the step's
# DecodeBatch, one row per query: at that size the fused kernel's fixed costs and its copies of
# the keys per query head, not the arithmetic, are the cost.
SMALL_TILE = 8


@dataclass
class QueryTile:
    """T consecutive queries of one request that vLLM's kernel cannot compute (a prefill chunk
    past C, or a decode right after C). Their keys split into two disjoint sets:
    - window keys j with i-W < j <= i: stored as the model wrote them, so the logits are right as
      they are; computed by PyTorch's fused CPU attention, which also returns the log-sum-exp;
    - sink keys j < S with j <= i-W: the query re-rotated to its in-cache slot for these only
      (O(S) per query), merged into the window result by log-sum-exp."""

    tokens: slice                       # the tile's tokens in the step's token order
    window_blocks: torch.Tensor         # [NB] physical blocks holding the window keys, in order
    window_mask: torch.Tensor           # [1, 1, T, NB*B] 0 where visible, -inf elsewhere
    sink_blocks: torch.Tensor | None    # [ceil(S/B)] physical blocks of the sinks; None: no sink
    sink_mask: torch.Tensor | None      # [1, T, S] 0 where sink j is visible (outside the window)
    sink_rotation: torch.Tensor | None  # [T, rotary_dim] cos|sin: query position -> its slot
    # ALiBi models only: in-cache distances from each query to the window key columns [T, NB*B]
    # and to the sinks [T, S] (attend_tile turns them into each head's bias, once per step).
    window_distance: torch.Tensor | None = None
    sink_distance: torch.Tensor | None = None
    alibi_biases: dict = field(default_factory=dict)   # slopes -> (window, sink) bias


@dataclass
class ShadowWrites:
    """Sink K/V to copy, re-rotated, into the slots the window just left (kernel steps).

    Shadow n: the K/V of every KV head at slot source_slots[n] (block * B + offset, a sink),
    keys rotated by positions[n] (i-C+1; not for ALiBi models, whose rotation tables are None),
    to slot slots[n]. The slots are the same for every
    layer. attention.py writes them with the native op (shadow_op.py), for every layer in
    layer_caches at once when the metadata builder found them, or, without the op, with stock
    ops one layer at a time (one gather at source_index, vLLM's rotary op, vLLM's cache write)."""

    source_slots: torch.Tensor     # [N] int64
    slots: torch.Tensor            # [N] int64 destination slot (block * B + offset)
    positions: torch.Tensor        # [N] int64: rotate sink j by this many positions (i-C+1)
    rotation_table: torch.Tensor | None  # cos|sin rows by position, model dtype (vLLM's layout)
    rotation_table_f32: torch.Tensor | None  # the same rows in fp32 (the native op's)
    kv_heads: int
    head_dim: int
    block_size: int
    # The KV caches of every layer this step's metadata serves (set by the metadata builder), and
    # the data_ptr of each cache whose shadows are written already this step.
    layer_caches: list[torch.Tensor] | None = None
    written: set[int] = field(default_factory=set)
    _source_index: torch.Tensor | None = None

    @property
    def source_index(self) -> torch.Tensor:
        """Flat positions in one layer's KV cache tensor of the sinks' keys [N, Hkv, D], then
        their values the same way (the stock-op path's gather), built once per step."""
        if self._source_index is None:
            slots = self.source_slots.numpy()
            self._source_index = torch.from_numpy(flat_kv_index(
                slots // self.block_size, slots % self.block_size, self.kv_heads,
                self.head_dim, self.block_size))
        return self._source_index

    @property
    def key_elements(self) -> int:
        return len(self.source_slots) * self.kv_heads * self.head_dim


@dataclass
class DecodeBatch:
    """The queries of a step's small tiles (at most SMALL_TILE queries of a RoPE model: decodes
    the kernel cannot take — pinned requests past their cache, engine-shaped ones right after
    C — and short chunks past C), one row per query, padded into one batch that every layer
    computes at once (attention.attend_decode_batch). A row's blocks and masks are its tile's,
    mask row by row; padding columns point at block 0 and are masked out."""

    tokens: torch.Tensor            # [R] the queries' positions in the step's token order
    window_blocks: torch.Tensor     # [R, NBw] physical blocks of each query's window
    window_mask: torch.Tensor       # [R, NBw*B] 0 where visible, -inf elsewhere
    sink_blocks: torch.Tensor | None    # [R, NBs] sink (pinned) blocks; None: no query has any
    sink_mask: torch.Tensor | None      # [R, NBs*B]
    sink_rotation: torch.Tensor | None  # [R, rotary_dim] cos|sin: query position -> its slot


def batch_small_tiles(tiles: list[QueryTile], block_size: int, rope: RopeSpec,
                      dtype: torch.dtype) -> DecodeBatch:
    """Pad the queries of small tiles (RoPE models) into a DecodeBatch, a row per query."""
    rows = [(tile, t) for tile in tiles for t in range(tile.tokens.stop - tile.tokens.start)]
    R = len(rows)
    widest = max(len(tile.window_blocks) for tile in tiles)
    window_blocks = torch.zeros(R, widest, dtype=torch.long)
    window_mask = torch.full((R, widest * block_size), float("-inf"), dtype=dtype)
    for r, (tile, t) in enumerate(rows):
        window_blocks[r, :len(tile.window_blocks)] = tile.window_blocks
        window_mask[r, :tile.window_mask.shape[-1]] = tile.window_mask[0, 0, t]
    batch = DecodeBatch(tokens=torch.tensor([tile.tokens.start + t for tile, t in rows]),
                        window_blocks=window_blocks, window_mask=window_mask, sink_blocks=None,
                        sink_mask=None, sink_rotation=None)
    with_sinks = [tile for tile in tiles if tile.sink_mask is not None]
    if with_sinks:
        widest = max(len(tile.sink_blocks) for tile in with_sinks)
        batch.sink_blocks = torch.zeros(R, widest, dtype=torch.long)
        batch.sink_mask = torch.full((R, widest * block_size), float("-inf"), dtype=dtype)
        # No sink: any rotation (its columns are all masked); the identity.
        batch.sink_rotation = rope.cos_sin(torch.zeros(R, dtype=torch.long), dtype)
        for r, (tile, t) in enumerate(rows):
            if tile.sink_mask is not None:
                batch.sink_blocks[r, :len(tile.sink_blocks)] = tile.sink_blocks
                batch.sink_mask[r, :tile.sink_mask.shape[-1]] = tile.sink_mask[0, t]
                batch.sink_rotation[r] = tile.sink_rotation[t]
    return batch


@dataclass
class StepPlan:
    kernel: bool                   # vLLM's kernel with a window of C computes the whole step
    # A mixed step: the requests (batch rows) that vLLM's kernel computes; the others are tiles.
    kernel_reqs: list[int] = field(default_factory=list)
    shadows: ShadowWrites | None = None
    tiles: list[QueryTile] = field(default_factory=list)
    # Set by the metadata builder for a mixed step: the kernel's metadata for kernel_reqs, and
    # where their tokens sit in the step (a slice when contiguous, else an index tensor).
    kernel_metadata: object = None
    kernel_tokens: slice | torch.Tensor | None = None
    # The queries of the step's small tiles (RoPE models), batched; those tiles are not in `tiles`.
    decodes: DecodeBatch | None = None


def _query_tile(start: int, first: int, last: int, request: int, block_table: torch.Tensor,
                shape: StreamShape, rope: RopeSpec | None, block_size: int,
                dtype: torch.dtype) -> QueryTile:
    """Queries at row positions first..last of one request, its tokens from `start` on; shape:
    that request's sinks (or pinned tokens) and window."""
    logical = torch.arange(window_start(shape, first) // block_size, last // block_size + 1)
    qpos = torch.arange(first, last + 1)[:, None]
    col = logical[0] * block_size + torch.arange(len(logical) * block_size)[None, :]
    window = in_window(shape, qpos, col)
    mask = torch.zeros(window.shape, dtype=dtype).masked_fill_(~window, float("-inf"))
    tile = QueryTile(tokens=slice(start, start + last - first + 1),
                     window_blocks=block_table[request, logical].long(),
                     window_mask=mask[None, None], sink_blocks=None, sink_mask=None,
                     sink_rotation=None)
    # The query's in-cache slot n-1 (row positions of a rebased row are >= C-1, like the
    # absolute ones, so it reads the same).
    slot = query_slot(shape, qpos)
    if rope is None:
        tile.window_distance = (qpos - col).to(torch.float32)
    sinks = torch.arange(shape.sink_tokens)[None, :]
    outside = sink_outside_window(shape, qpos, sinks)
    if bool(outside.any()):
        tile.sink_blocks = block_table[request, :front_blocks(shape, block_size)].long()
        tile.sink_mask = torch.zeros(outside.shape, dtype=dtype).masked_fill_(
            ~outside, float("-inf"))[None]
        if rope is None:
            tile.sink_distance = (slot - sinks).to(torch.float32)
        else:  # from the query's position to its slot
            tile.sink_rotation = rope.cos_sin((slot - qpos)[:, 0], dtype)      # angles <= 0
    return tile


@functools.lru_cache(maxsize=8)
def _rotation_table(rope: RopeSpec, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """cos|sin of positions 0..rows-1 (float64 angles, then cast), built once per size."""
    return rope.cos_sin(torch.arange(rows), dtype)


def _shadow_writes(rope: RopeSpec | None, block_size: int, sinks: int,
                   starts: list[tuple[int, int]], block_table: torch.Tensor, kv_heads: int,
                   head_dim: int, dtype: torch.dtype) -> ShadowWrites | None:
    """The shadows of `starts`: (request, the first slot of its shadow_span) for each kernel
    decode that writes them; sink j goes to that slot + j, rotated by the slot's position.

    Built every decode step, so the index arithmetic is numpy on a handful of numbers (a torch op
    costs several times a numpy one at this size)."""
    if not starts:
        return None
    req = np.repeat(np.array([r for r, _ in starts]), sinks)
    shift = np.repeat(np.array([lowest for _, lowest in starts]), sinks)  # >= S
    source = np.tile(np.arange(sinks), len(starts))
    dest = shift + source
    table = block_table.numpy()
    dest_blocks = table[req, dest // block_size].astype(np.int64)
    source_blocks = table[req, source // block_size].astype(np.int64)
    # Row positions stay below the row width, so the table stays small; sized in powers of two
    # so that it is built a few times per engine, not per step.
    rows_needed = 1 << max(int(shift.max()), 1023).bit_length()
    return ShadowWrites(
        source_slots=torch.from_numpy(source_blocks * block_size + source % block_size),
        slots=torch.from_numpy(dest_blocks * block_size + dest % block_size),
        positions=torch.from_numpy(shift.astype(np.int64)),
        rotation_table=None if rope is None else _rotation_table(rope, rows_needed, dtype),
        rotation_table_f32=(None if rope is None
                            else _rotation_table(rope, rows_needed, torch.float32)),
        kv_heads=kv_heads, head_dim=head_dim, block_size=block_size)


def plan_step(config: StreamsinkConfig, rope: RopeSpec | None, block_size: int, seq_lens: list[int],
              query_start: list[int], block_table: torch.Tensor, dtype: torch.dtype,
              kv_heads: int = 1, head_dim: int | None = None,
              shapes: list[StreamShape] | None = None,
              small_tile: int = SMALL_TILE) -> StepPlan:
    """seq_lens and block_table in row positions, one entry per request of the step. rope None:
    an ALiBi model (head_dim then required). shapes: each request's (request_options.py);
    None: all the engine's. Tiles of at most small_tile queries go to the DecodeBatch (RoPE
    models; 0: none do)."""
    head_dim = head_dim or rope.head_dim
    engine = engine_shape(config)
    shapes = shapes or [engine] * len(seq_lens)
    query_lens = [query_start[r + 1] - query_start[r] for r in range(len(seq_lens))]
    on_kernel = [kernel_can_run(engine, shape, n, q)
                 for shape, n, q in zip(shapes, seq_lens, query_lens)]
    kernel_reqs = [r for r, ok in enumerate(on_kernel) if ok]
    plan = StepPlan(kernel=all(on_kernel))
    shadow_starts = [(r, span[0]) for r in kernel_reqs
                     if (span := shadow_span(shapes[r], seq_lens[r] - query_lens[r],
                                             query_lens[r]))]
    plan.shadows = _shadow_writes(rope, block_size, engine.sink_tokens, shadow_starts, block_table,
                                  kv_heads, head_dim, dtype)
    if plan.kernel:
        return plan
    plan.kernel_reqs = kernel_reqs
    for r, seq_len in enumerate(seq_lens):
        if on_kernel[r]:
            continue
        start, end = query_start[r], query_start[r + 1]
        first = seq_len - (end - start)
        for t0 in range(start, end, PREFILL_TILE):
            t1 = min(t0 + PREFILL_TILE, end)
            plan.tiles.append(_query_tile(t0, first + t0 - start, first + t1 - 1 - start, r,
                                          block_table, shapes[r], rope, block_size, dtype))
    if rope is not None:
        small = [t for t in plan.tiles if t.tokens.stop - t.tokens.start <= small_tile]
        if small:
            plan.decodes = batch_small_tiles(small, block_size, rope, dtype)
            plan.tiles = [t for t in plan.tiles if t.tokens.stop - t.tokens.start > small_tile]
    return plan
