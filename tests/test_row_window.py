"""The worker's per-block rotation tags (row_window.py), without an engine: keys written at one
row offset, copied by the scheduler's copy-on-write, adopted by a request with another offset,
end up exactly as if written at the new row positions; blocks that are not the request's
(stale ids below its window, the null block) are never touched."""
from types import SimpleNamespace

import torch

from streamsink.config import StreamsinkConfig
from streamsink.rope import RopeSpec, rotate

B, HKV, D = 8, 2, 64
ROPE = RopeSpec(head_dim=D, rotary_dim=32, theta=10000.0)
CFG = StreamsinkConfig(sink_tokens=4, window_tokens=60)       # C = 64


def make_rows(num_blocks):
    from streamsink.row_window import RowWindow

    cache = torch.zeros(num_blocks, HKV, B, 2 * D, dtype=torch.float64)
    # Two layers sharing one tensor (rotated once), and a second layer of its own.
    other = torch.zeros_like(cache)
    rows = RowWindow(CFG, B, token_width=512, block_width=64, kv_caches=[cache, cache, other],
                     rope=ROPE)
    return rows, cache, other


def raw_keys(num_blocks):
    torch.manual_seed(0)
    return torch.randn(num_blocks * B, HKV, D, dtype=torch.float64)  # per absolute position


def store(cache, block_id, index, raw, offset):
    """What the model writes for logical block `index` into physical block_id: keys of
    positions index*B.. rotated at their row positions (absolute inside the sink blocks)."""
    from streamsink.kv_cache_layout import split_kv_cache

    positions = torch.arange(index * B, (index + 1) * B)
    row = positions if index == 0 else positions - offset
    keys = rotate(raw[positions], ROPE.cos_sin(row, torch.float64)[:, None], ROPE.rotary_dim)
    split_kv_cache(cache)[0][block_id].copy_(keys.permute(1, 2, 0))   # [Hkv, D, B]


def stored(cache, block_id):
    from streamsink.kv_cache_layout import split_kv_cache

    return split_kv_cache(cache)[0][block_id].clone()


def request(req_id, block_ids, computed):
    return SimpleNamespace(req_id=req_id, block_ids=(list(block_ids),),
                           num_computed_tokens=computed, sampling_params=None)


def test_adopted_blocks_are_rerotated_from_their_tags():
    from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy

    rows, cache, other = make_rows(64)
    raw = raw_keys(64)
    # Request A (ids 1..25 for logical blocks 0..24) wrote blocks 0..19 at row offset 80, and
    # its blocks 20..24 after a rebase to offset 96 (tags say so).
    a_ids = list(range(1, 26))
    for index, block in enumerate(a_ids):
        offset = 80 if index < 20 else 96
        for tensor in (cache, other):
            store(tensor, block, index, raw, offset)
        if index:
            rows.block_rot[block] = offset
    # The scheduler copied A's block 18 (id 19) before a shadow reached it: the copy (id 40)
    # carries A's rotation.
    rows.copied([KVCacheBlockCopy(src_block_id=19, dst_block_id=40)])
    for tensor in (cache, other):
        tensor[40] = tensor[19]
    assert rows.block_rot[40] == 80
    # B adopts the hit at h = 160: sink (id 1), nulls, the run of cdiv(63, 8) = 8 blocks
    # (logical 12..19, id 40 for 18), then fresh blocks (ids 50, 51) for its new tokens.
    run = [13, 14, 15, 16, 17, 18, 40, 20]
    b = request("B", [1] + [0] * 11 + run + [50, 51], computed=160)
    untouched = {i: stored(cache, i) for i in (0, 2, 3, 21, 50, 51)}
    assert rows._carried_offset(b, 160) == 80
    rows._settle(b, 72, 160)
    for index, block in enumerate(run, 12):
        for tensor in (cache, other):
            want = torch.zeros_like(tensor)
            store(want, block, index, raw, 72)
            assert torch.allclose(stored(tensor, block), stored(want, block), atol=1e-12)
        assert rows.block_rot[block] == 72
    assert rows.block_rot[50] == rows.block_rot[51] == 72            # fresh: tagged only
    for block, before in untouched.items():                          # others: untouched
        assert torch.equal(stored(cache, block), before)
    assert 0 not in rows.block_rot and 1 not in rows.block_rot        # null and sink blocks


def test_mixed_tags_rotate_per_group_and_pick_the_furthest_offset():
    rows, cache, _ = make_rows(32)
    raw = raw_keys(32)
    ids = list(range(1, 21))
    for index, block in enumerate(ids):
        offset = 0 if index < 15 else 48
        store(cache, block, index, raw, offset)
        if index:
            rows.block_rot[block] = offset
    req = request("R", ids, computed=150)
    assert rows._carried_offset(req, 150) is None
    furthest = rows.furthest_offset(req, 150)
    assert rows._first_offset(150, 160, len(ids), req) == furthest
    rows._settle(req, furthest, 150)
    for index in range(rows._live_start(req, 150), 19):
        want = torch.zeros_like(cache)
        store(want, ids[index], index, raw, furthest)
        assert torch.allclose(stored(cache, ids[index]), stored(want, ids[index]), atol=1e-12)


def test_carried_offset_is_kept_when_it_fits():
    """The next turn of a conversation continues at its previous row's offset: no rotation."""
    rows, cache, _ = make_rows(32)
    ids = list(range(1, 21))
    for block in ids[1:]:
        rows.block_rot[block] = 40
    req = request("R", ids, computed=150)
    assert 40 <= rows.furthest_offset(req, 150)
    assert rows._first_offset(150, 160, len(ids), req) == 40
    before = cache.clone()
    rows._settle(req, 40, 150)
    assert torch.equal(cache, before)


def test_fresh_blocks_take_the_row_offset():
    rows, _, _ = make_rows(16)
    req = request("R", [1, 2, 3, 4, 5], computed=30)
    rows.offsets["R"] = 24
    rows.allocated(req, [4, 5])
    assert rows.block_rot == {4: 24, 5: 24}
    sink_only = request("S", [9], computed=0)
    rows.allocated(sink_only, [9])
    assert 9 not in rows.block_rot


def test_a_row_of_the_narrowest_width_fits_its_blocks():
    """max_model_len need not be a multiple of B: the row's block ids are counted against the
    block table's width (cdiv(max_model_len, B)), not against width // B. S=8, W=1020, B=128,
    decodes: the narrowest row (stream_rule.min_row_tokens) is 1,285 tokens and 11 blocks; the
    decode at token 1,280 needs 11 blocks at offset 0."""
    from streamsink.row_window import RowWindow
    from streamsink.stream_rule import min_row_tokens

    cfg = StreamsinkConfig(sink_tokens=8, window_tokens=1020)
    width = min_row_tokens(8, 1020, 0, 128, 1)
    rows = RowWindow(cfg, 128, token_width=width, block_width=-(-width // 128))
    assert width == 1285
    assert rows.fits(0, 1281, 11)
