"""Keep a stream's sinks and recent tokens in a worker batch row of bounded width.

vLLM's worker keeps, for each request of the batch, a row of token ids (max_model_len wide) and a
row of KV block ids (cdiv(max_model_len, B) wide), both indexed by position. A stream outgrows
both. But a streaming query reads only the sinks and its window, so the row only has to hold the
sink blocks and the recent blocks. When a stream's next step would not fit, its row is *rebased*:
from the end of the sink blocks on, the row is rewritten with the stream's tokens and blocks from
`offset` on (offset a multiple of B), and the batch's per-row counters (num_computed_tokens,
num_tokens_no_spec, num_prompt_tokens) become relative to it.

The worker then works in *row positions*: p' = p - offset past the sink blocks, p' = p inside
them. Differences between window positions are unchanged, the sinks keep their places, and every
query of a rebased row sits at p' >= C - 1, so the slot mapping, vLLM's kernel (sliding window C)
and the step plan's visibility all work unchanged on row positions. RoPE works on row positions
too: the model rotates q and k at p' (vLLM's own RoPE, its table never outgrown, and a graph
compiled once sees nothing of ours), and at a rebase the keys already cached for the kept blocks
are re-rotated by -(new offset - old offset) in every layer: one rotation for all of them,
since offsets are multiples of B. Each rebase adds ~1 ulp of rounding to those keys; a key lives
through only a few rebases before it leaves the window.

Prefix caching (prefix_cache.py) hands a request blocks another request wrote, rotated for that
request's row. So the rotation is tracked per physical block: block_rot[block id] is the offset
its keys are rotated for (absent: 0; the sink blocks, never moved, are not tracked). A block
copied by the scheduler's copy-on-write inherits its source's tag; a request adopting cached
blocks re-rotates them from their tags to its own row (none when it can take the row offset
they already carry, the usual case for the next turn of a conversation).

The rebase rewrites O(max_model_len) entries and re-rotates O(C) keys per layer once every
~(max_model_len - C - chunk) tokens.
The scheduler keeps absolute numbers; patches/worker_batch_rows.py does the translation.
"""
from __future__ import annotations

import copy

import torch

from streamsink.config import StreamsinkConfig
from streamsink.kv_cache_layout import rotate_cached_keys
from streamsink.request_options import engine_shape, request_shape
from streamsink.stream_rule import StreamShape, first_live_block, front_blocks, furthest_row_offset


class RowWindow:
    """The row bookkeeping of one streaming engine's InputBatch."""

    def __init__(self, config: StreamsinkConfig, block_size: int, token_width: int,
                 block_width: int, kv_caches: list | None = None, rope=None) -> None:
        self.engine = engine_shape(config)   # the shape of a request without options
        self.kv_caches = kv_caches if kv_caches is not None else []  # the runner's, per layer
        self.rope = rope          # RopeSpec, for re-rotations; None: ALiBi (nothing to rotate)
        self.block_size = block_size
        self.width = min(token_width, block_width * block_size)
        self.block_width = block_width    # block ids a row holds: cdiv(max_model_len, B) or more
        self.offsets: dict[str, int] = {}                  # req_id -> offset (0 if absent)
        # block id -> the row offset its stored keys are rotated for (0 if absent). Outlives
        # requests: finished requests' blocks stay in the prefix cache.
        self.block_rot: dict[int, int] = {}
        self.step_tokens: dict[str, int] = {}              # req_id -> tokens scheduled this step
        # The shape of each row of this step's batch, in batch order, when any request has
        # options of its own (None: all have the engine's); read by the attention metadata.
        self.step_shapes: list[StreamShape] | None = None
        self.rebases = 0

    def note_step_shapes(self, requests: list) -> None:
        """Before the step's attention metadata is built: the shape of each row, in order."""
        shapes = [self.shape(r) for r in requests]
        self.step_shapes = shapes if any(not s.writes_shadows for s in shapes) else None

    # -- decisions ------------------------------------------------------------------------
    def fits(self, offset: int, end: int, num_blocks: int) -> bool:
        """Positions < end, the token sampled at position end, and num_blocks blocks fit a row
        rebased at offset."""
        return (end + 1 - offset <= self.width
                and num_blocks - offset // self.block_size <= self.block_width)

    def shape(self, request) -> StreamShape:
        """The request's sinks (or pinned tokens) and window (request_options.py)."""
        return request_shape(self.engine, request.sampling_params.extra_args
                             if request.sampling_params is not None else None)

    def head_blocks(self, request) -> int:
        """Blocks at the front of the row kept as they are: the sink (or pinned) blocks."""
        return front_blocks(self.shape(request), self.block_size)

    def furthest_offset(self, request, first_query: int) -> int:
        """The largest offset that keeps every key the step's first query (and later ones)
        may see or shadow (stream_rule.furthest_row_offset)."""
        return furthest_row_offset(self.shape(request), self.block_size, first_query)

    def ensure_room(self, batch, row: int, request, first_query: int, end: int,
                    num_blocks: int) -> None:
        """Rebase the row if this step's positions [first_query, end) or blocks do not fit."""
        offset = self.offsets.get(request.req_id, 0)
        if self.fits(offset, end, num_blocks):
            return
        new_offset = self.furthest_offset(request, first_query)
        if new_offset <= offset:
            self._refuse(request, first_query, end)
        self.rebase(batch, row, request, new_offset, first_query, end, num_blocks)

    def _refuse(self, request, first_query: int, end: int) -> None:
        # Unreachable when engine_setup's start-up check (stream_rule.min_row_tokens) holds.
        raise RuntimeError(
            f"streamsink: request {request.req_id} does not fit its batch row "
            f"({self.width} tokens) at positions {first_query}..{end}; raise max_model_len")

    # -- row contents ---------------------------------------------------------------------
    @staticmethod
    def _tokens(request, start: int, stop: int) -> list[int]:
        """Token ids at absolute positions [start, stop) of a CachedRequestState."""
        prompt, n = request.prompt_token_ids, len(request.prompt_token_ids)
        out = request.output_token_ids
        return list(prompt[start:min(stop, n)]) + list(out[max(start - n, 0):max(stop - n, 0)])

    def rebase(self, batch, row: int, request, offset: int, first_query: int, end: int,
               num_blocks: int) -> None:
        """Rewrite the row of `request` so that row position p' holds absolute position
        p' (inside the sink blocks) or p' + offset (after them)."""
        if not self.fits(offset, end, num_blocks):
            self._refuse(request, first_query, end)
        head_blocks = self.head_blocks(request)
        head, num_prompt = head_blocks * self.block_size, len(request.prompt_token_ids)
        num_tokens = num_prompt + len(request.output_token_ids)
        head_len = min(head, num_tokens)
        batch.token_ids_cpu[row, :head_len] = self._tokens(request, 0, head_len)
        stop = min(num_tokens, offset + self.width)
        if stop > offset + head:
            batch.token_ids_cpu[row, head:stop - offset] = self._tokens(request, offset + head,
                                                                         stop)
        batch.is_token_ids[row, :max(stop - offset, head_len)] = True
        skipped = offset // self.block_size
        batch.block_table.add_row(
            tuple(ids[:head_blocks] + ids[head_blocks + skipped:]
                  for ids in request.block_ids), row)
        batch.num_computed_tokens_cpu[row] = first_query - offset
        batch.num_tokens_no_spec[row] = num_tokens - offset
        # Only the penalties' prompt tensor reads this: the prompt tokens still in the row.
        batch.num_prompt_tokens[row] = max(num_prompt - offset, 0)
        self.offsets[request.req_id] = offset
        self._settle(request, offset, first_query)
        self.rebases += 1

    # -- rotation tags --------------------------------------------------------------------
    def _live_start(self, request, computed_tokens: int) -> int:
        """The first non-sink block the scheduler still holds for a request that has
        computed `computed_tokens` (it frees every block before its retained tokens). Lower ids
        in a request's block_ids may be stale: freed and given to another request since."""
        # Without vLLM's extra_retained_tokens (the worker never reads them): at or past the
        # scheduler's first live block.
        return first_live_block(self.shape(request), self.block_size, computed_tokens)

    def _settle(self, request, offset: int, computed_tokens: int) -> None:
        """Make the keys stored in the request's live blocks rotated for `offset` (blocks its
        row dropped below that are never read again) and tag them so."""
        ids = request.block_ids[0] if request.block_ids else []
        written = -(-computed_tokens // self.block_size)
        moves: dict[int, list[int]] = {}     # rotation angle -> blocks, one rotation each
        for index in range(self._live_start(request, computed_tokens), len(ids)):
            block = ids[index]
            if block == 0:
                continue  # the null block: the middle a prefix-cache hit skips
            if index < written:
                delta = offset - self.block_rot.get(block, 0)
                if delta:
                    moves.setdefault(delta, []).append(block)
            self.block_rot[block] = offset
        for delta, blocks in moves.items():
            self._rotate(blocks, -delta)

    def _carried_offset(self, request, computed_tokens: int) -> int | None:
        """The one offset all of the request's written live blocks are rotated for, if any."""
        ids = request.block_ids[0] if request.block_ids else []
        written = min(len(ids), -(-computed_tokens // self.block_size))
        tags = {self.block_rot.get(b, 0)
                for b in ids[self._live_start(request, computed_tokens):written]
                if b != 0}
        return tags.pop() if len(tags) == 1 else None

    def _rotate(self, blocks: list[int], angle: int) -> None:
        """Rotate every key stored in `blocks` by `angle` positions, in every layer."""
        if not self.kv_caches or self.rope is None:
            return
        index = torch.tensor(blocks, dtype=torch.long)
        cos_sin = self.rope.cos_sin(torch.tensor([angle]), torch.float64)[0]
        seen = set()
        for kv_cache in self.kv_caches:
            if kv_cache is None or kv_cache.data_ptr() in seen:
                continue  # layers sharing one cache tensor rotate it once
            seen.add(kv_cache.data_ptr())
            rotate_cached_keys(kv_cache, index, cos_sin, self.rope.rotary_dim,
                               self.rope.neox_style)

    def copied(self, copies) -> None:
        """The scheduler's block copies of this step (run right after this, before any write):
        each copy carries its source's rotation."""
        tags = [(c.dst_block_id, self.block_rot.get(c.src_block_id, 0)) for c in copies]
        for dst, tag in tags:
            self.block_rot[dst] = tag

    def allocated(self, request, new_block_ids: list[int]) -> None:
        """Fresh blocks of a request in its row (already appended to its block_ids): written
        from now on at the row's offset."""
        offset = self.offsets.get(request.req_id, 0)
        first = len(request.block_ids[0]) - len(new_block_ids)
        head_blocks = self.head_blocks(request)
        for index, block in enumerate(new_block_ids, first):
            if index >= head_blocks and block != 0:
                self.block_rot[block] = offset

    def add_request(self, batch, request, original_add_request) -> int:
        """InputBatch.add_request for a streaming engine: rows that cannot hold the whole
        request are filled by rebase() instead of vLLM's copy of every token and block."""
        req_id, first = request.req_id, request.num_computed_tokens
        end = first + self.step_tokens.get(req_id, 0)
        num_blocks = len(request.block_ids[0]) if request.block_ids else 0
        self.offsets.pop(req_id, None)
        if self.fits(0, max(end, request.num_tokens - 1), num_blocks):
            row = original_add_request(batch, request)
            self._settle(request, 0, first)
            return row
        # vLLM's add_request sets up sampling, LoRA, etc.; give it a request without tokens or
        # blocks to copy, then put back the live lists it keeps references to.
        shell = copy.copy(request)
        shell.prompt_token_ids, shell.output_token_ids = [], []
        shell.block_ids = tuple([] for _ in request.block_ids)
        row = original_add_request(batch, shell)
        batch.req_output_token_ids[row] = request.output_token_ids
        added = batch.batch_update_builder.added
        if added and added[-1][0] == row:
            added[-1] = (row, request.sampling_params, request.prompt_token_ids,
                         request.output_token_ids)
        offset = 0 if self.fits(0, end, num_blocks) else self._first_offset(first, end,
                                                                             num_blocks, request)
        self.rebase(batch, row, request, offset, first, end, num_blocks)
        return row

    def _first_offset(self, first: int, end: int, num_blocks: int, request) -> int:
        """The offset of a row (re)built for a request past its first C tokens: the one its
        blocks are already rotated for when that fits (no rotation: a conversation's next turn
        continues where its previous turn's row was), else the furthest."""
        furthest = self.furthest_offset(request, first)
        carried = self._carried_offset(request, first)
        if carried is not None and carried <= furthest and self.fits(carried, end, num_blocks):
            return carried
        return furthest

    def to_row_positions(self, batch, requests) -> None:
        """After vLLM updated the batch with absolute num_computed_tokens: make them relative."""
        live = set(batch.req_id_to_index)
        for req_id in [r for r in self.offsets if r not in live]:
            del self.offsets[req_id]
        if not self.offsets:
            return
        for row, req_id in enumerate(batch.req_ids[:batch.num_reqs]):
            offset = self.offsets.get(req_id, 0)
            if offset:
                batch.num_computed_tokens_cpu[row] = requests[req_id].num_computed_tokens - offset


# -- where an engine's RowWindow lives ----------------------------------------------------------
# vLLM's InputBatch and VllmConfig have no slot for a plugin's state, so an engine's RowWindow
# rides on both under this one attribute, written and read only by the three functions below.
# A streaming engine's worker makes its RowWindow on its first step (set_rows); a stock engine's
# batch never gets one: whether an engine streams is its config's to say (streaming_config).
_ATTRIBUTE = "_streamsink_rows"


def set_rows(batch, vllm_config, rows: RowWindow) -> None:
    """Attach an engine's RowWindow to its worker's InputBatch (the worker patches read it
    there) and to its VllmConfig (the attention metadata builder has the config, not the
    runner)."""
    setattr(batch, _ATTRIBUTE, rows)
    # object.__setattr__: vLLM's configs are pydantic dataclasses (assignment is validated).
    object.__setattr__(vllm_config, _ATTRIBUTE, rows)


def rows_of(batch) -> RowWindow | None:
    """The RowWindow attached to a worker's InputBatch; None before set_rows, and always for a
    stock engine's batch."""
    return vars(batch).get(_ATTRIBUTE)


def rows_of_config(vllm_config) -> RowWindow | None:
    """The RowWindow of the engine a VllmConfig belongs to (as rows_of)."""
    return vars(vllm_config).get(_ATTRIBUTE) if vllm_config is not None else None
