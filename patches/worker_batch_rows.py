"""Patch: streams longer than a worker batch row (max_model_len) in vLLM's model runner.

Why: the worker keeps each request's token ids and block ids in rows max_model_len wide, indexed
by absolute position; vLLM copies every prompt token and block into them, appends until the row
overflows, and compares row counters with the request's absolute length. A stream past
max_model_len breaks all three.
How: streamsink.row_window.RowWindow keeps only the sink blocks and the recent part of a stream
in its row, in row positions (absolute minus a per-request offset). Three methods are wrapped,
each only for an engine with a streamsink config:
- InputBatch.add_request: a request that does not fit its row is added without tokens and
  blocks and its row written by RowWindow.rebase;
- GPUModelRunner._update_states: before it, rows whose step would overflow are rebased (and
  their cached keys re-rotated to the new row positions) and the blocks the scheduler copies
  this step inherit their sources' rotation tags; after it, num_computed_tokens (set from the
  scheduler's absolute numbers) is made relative and fresh blocks are tagged with their row's
  offset;
- GPUModelRunner._prepare_inputs: after it, "discard the sampled token" (a partial prefill) is
  recomputed from absolute lengths (vLLM compares the row's seq_len with the request's length),
  and the rows' per-request shapes (pinned tokens, window; request_options.py) are noted in
  batch order for the attention metadata built next.
Delete when: vLLM's worker buffers are bounded by a window for windowed attention (a ring of
max_num_batched_tokens + window tokens per request) instead of max_model_len.
"""
from __future__ import annotations

import inspect

from vllm.v1.worker.gpu_input_batch import InputBatch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from streamsink.config import streaming_config
from streamsink.errors import PatchTargetMoved
from streamsink.patches._install import require, wrap
from streamsink.rope import rope_spec_from_hf_config
from streamsink.row_window import RowWindow, rows_of, set_rows


def _rows_of(runner) -> RowWindow | None:
    """The RowWindow of a runner's batch, made on a streaming engine's first step (this is the
    first of our hooks vLLM calls in a step); None for a stock engine."""
    batch = runner.input_batch
    rows = rows_of(batch)
    if rows is None:
        config = streaming_config(runner.vllm_config)
        if config is None:
            return None
        table = batch.block_table[0]
        model_config = runner.vllm_config.model_config
        rows = RowWindow(config, table.block_size, batch.token_ids_cpu.shape[1],
                         table.max_num_blocks_per_req, kv_caches=runner.kv_caches,
                         rope=rope_spec_from_hf_config(model_config.hf_text_config))
        set_rows(batch, runner.vllm_config, rows)
    return rows


def _add_request(original, self, request):
    # Rows exist by now on a streaming engine: vLLM adds requests inside _update_states.
    rows = rows_of(self)
    if rows is None:
        return original(self, request)
    return rows.add_request(self, request, original)


def _update_states(original, self, scheduler_output):
    rows = _rows_of(self)
    if rows is None:
        return original(self, scheduler_output)
    rows.step_tokens = scheduler_output.num_scheduled_tokens
    cached = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        row = self.input_batch.req_id_to_index.get(req_id)
        if row is None or req_id in cached.resumed_req_ids:
            continue  # (re-)added below by add_request
        request = self.requests[req_id]
        first = cached.num_computed_tokens[i]
        new_blocks = cached.new_block_ids[i]
        num_blocks = len(request.block_ids[0]) + (len(new_blocks[0]) if new_blocks else 0)
        rows.ensure_room(self.input_batch, row, request, first,
                         first + scheduler_output.num_scheduled_tokens[req_id], num_blocks)
    # The original runs the scheduler's block copies first thing: after the rebases above
    # (which rotate blocks in place), before add_request (which rotates adopted blocks).
    rows.copied(scheduler_output.kv_cache_block_copies or ())
    result = original(self, scheduler_output)
    rows.to_row_positions(self.input_batch, self.requests)
    for i, req_id in enumerate(cached.req_ids):
        new_blocks = cached.new_block_ids[i]
        if new_blocks and req_id not in cached.resumed_req_ids and req_id in self.requests:
            rows.allocated(self.requests[req_id], new_blocks[0])
    return result


def _prepare_inputs(original, self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
    rows = rows_of(self.input_batch)
    if rows is None:
        # _update_states, which makes a streaming engine's rows, runs first in every step.
        assert streaming_config(self.vllm_config) is None, \
            "streamsink: the worker prepared inputs before it updated its rows"
        return result
    batch = self.input_batch
    rows.note_step_shapes([self.requests[r] for r in batch.req_ids[:batch.num_reqs]])
    if rows.offsets:
        mask = self.discard_request_mask
        for row, req_id in enumerate(batch.req_ids[:batch.num_reqs]):
            offset = rows.offsets.get(req_id, 0)
            if offset:
                seq_len = int(self.optimistic_seq_lens_cpu[row]) + offset
                mask.np[row] = seq_len < self.requests[req_id].num_tokens
        mask.copy_to_gpu(batch.num_reqs)
    return result


def check_target() -> None:
    """Raise PatchTargetMoved unless vLLM's worker is the one this patch was written for."""
    # What the row bookkeeping relies on: where vLLM writes rows and the absolute counters.
    require(InputBatch, "add_request", ["self", "request"], needles=[
        "self.token_ids_cpu[req_index, :num_prompt_tokens] = request.prompt_token_ids",
        "self.block_table.add_row(request.block_ids, req_index)",
        "self.req_output_token_ids[req_index] = request.output_token_ids"])
    updates = require(GPUModelRunner, "_update_states", ["self", "scheduler_output"], needles=[
        "self.input_batch.num_computed_tokens_cpu[req_index] = num_computed_tokens",
        "self.input_batch.block_table.append_row(new_block_ids, req_index)",
        "self.input_batch.add_request(request)",
        # the order the rotation tags rely on: copies before any request is (re-)added
        "if scheduler_output.kv_cache_block_copies:"])
    source = inspect.getsource(updates)
    if source.index("copy_kv_cache_blocks_inplace(") > \
            source.index("self.input_batch.add_request(request)"):
        raise PatchTargetMoved("GPUModelRunner._update_states adds requests before it runs "
                               "the scheduler's block copies")
    require(GPUModelRunner, "_prepare_inputs", ["self", "scheduler_output"], needles=[
        "self.discard_request_mask.np[:num_reqs] = (",
        "positions_np + req_indices * self.input_batch.token_ids_cpu.shape[1]"])


def apply() -> None:
    check_target()
    wrap(InputBatch, "add_request", _add_request)
    wrap(GPUModelRunner, "_update_states", _update_states)
    wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
