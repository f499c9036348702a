"""The per-step plan sees exactly V(i) = {j <= i : j < S or j > i - W} for every query."""
import random

import pytest
import torch

from streamsink.config import StreamsinkConfig
from streamsink.rope import RopeSpec
from streamsink.step_plan import PREFILL_TILE, plan_step

ROPE = RopeSpec(head_dim=64, rotary_dim=64, theta=10000.0)
# GPT-J's pairing (adjacent features) on part of the head, with scaled frequencies.
ADJACENT = RopeSpec(head_dim=64, rotary_dim=32, theta=10000.0, neox_style=False,
                    frequencies=tuple(0.5 ** k for k in range(16)), attention_factor=1.3)


def query_rows(plan):
    """(token, window blocks, window mask row, sink blocks, sink mask row) of every query the
    plan sends through PyTorch: the tiles' queries, then the DecodeBatch's rows."""
    for tile in plan.tiles:
        for t in range(tile.tokens.stop - tile.tokens.start):
            yield (tile.tokens.start + t, tile.window_blocks, tile.window_mask[0, 0, t],
                   tile.sink_blocks, None if tile.sink_mask is None else tile.sink_mask[0, t])
    batch = plan.decodes
    if batch is not None:
        for r, token in enumerate(batch.tokens.tolist()):
            yield (token, batch.window_blocks[r], batch.window_mask[r],
                   None if batch.sink_blocks is None else batch.sink_blocks[r],
                   None if batch.sink_mask is None else batch.sink_mask[r])


def visible_positions(window_blocks, window_mask, sink_blocks, sink_mask, block_size,
                      logical_of_physical):
    """Positions a query attends to as the plan says, window columns plus sinks (a sink column j
    must read logical block j // B); and the physical blocks of its visible columns."""
    seen, read = set(), set()
    for b, physical in enumerate(window_blocks.tolist()):
        for off in range(block_size):
            if window_mask[b * block_size + off] == 0:
                seen.add(logical_of_physical[physical] * block_size + off)
                read.add(physical)
    if sink_mask is not None:
        for j in range(sink_mask.shape[-1]):
            if sink_mask[j] == 0:
                physical = int(sink_blocks[j // block_size])
                assert logical_of_physical[physical] == j // block_size
                seen.add(j)
                read.add(physical)
    return seen, read


@pytest.mark.parametrize("seed", range(12))
def test_plan_visibility_matches_semantics(seed):
    rng = random.Random(seed)
    block_size = rng.choice([4, 8, 32])
    cfg = StreamsinkConfig(sink_tokens=rng.choice([0, 1, 4, 9]), window_tokens=rng.randint(1, 40))
    reqs = [(rng.randint(1, 150), rng.choice([1, 1, rng.randint(2, 40)])) for _ in range(4)]
    reqs = [(max(seq, q), q) for seq, q in reqs]
    max_blocks = max(-(-seq // block_size) for seq, _ in reqs)
    # Distinct physical ids per request, so a wrong row or block would show.
    table = torch.arange(len(reqs) * max_blocks).view(len(reqs), max_blocks) + 100
    logical_of_physical = {int(p): i % max_blocks for i, p in enumerate(table.flatten())}
    query_start, positions = [0], []
    for seq, q in reqs:
        query_start.append(query_start[-1] + q)
        positions += list(range(seq - q, seq))
    plan = plan_step(cfg, ROPE, block_size, [s for s, _ in reqs], query_start, table,
                     torch.float32)
    # vLLM's kernel attends to the last C slots; that is exact only for a request that is
    # dense, or a decode whose S shadow slots lie past the real sinks.
    on_kernel = [seq <= cfg.cache_tokens or (q == 1 and seq - 1 >= cfg.cache_tokens
                                             + cfg.sink_tokens - 1) for seq, q in reqs]
    assert plan.kernel == all(on_kernel)
    if plan.kernel:
        assert not plan.tiles
        return
    assert plan.kernel_reqs == [r for r, ok in enumerate(on_kernel) if ok]
    covered = {token: True for r in plan.kernel_reqs
               for token in range(query_start[r], query_start[r + 1])}
    for token, *row in query_rows(plan):
        i = positions[token]
        req = next(r for r in range(len(reqs)) if query_start[r] <= token < query_start[r + 1])
        expected = {j for j in range(i + 1) if j < cfg.sink_tokens or j > i - cfg.window_tokens}
        seen, read = visible_positions(*row, block_size, logical_of_physical)
        assert seen == expected
        assert all((x - 100) // max_blocks == req for x in read)   # its own request's blocks
        assert token not in covered
        covered[token] = True
    assert sorted(covered) == list(range(len(positions)))  # each token by one path
    # Shadows only for kernel decodes past C (a PyTorch request reads the real sinks).
    shadow_reqs = [r for r in plan.kernel_reqs if reqs[r][0] > cfg.cache_tokens]
    if cfg.sink_tokens and shadow_reqs:
        assert plan.shadows.slots.numel() == cfg.sink_tokens * len(shadow_reqs)
    else:
        assert plan.shadows is None


def test_shadows_fill_the_slots_the_window_just_left():
    """Decode at i: the C slots (i-C, i] hold sink j, rotated to i-C+1+j, then the window."""
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=12)        # C = 16
    block_size, table = 8, torch.arange(10).view(1, 10) + 3
    plan = plan_step(cfg, ROPE, block_size, [40], [0, 1], table, torch.float64, kv_heads=2)
    assert plan.kernel and not plan.tiles
    shadows = plan.shadows
    dest = [24, 25, 26, 27]                                        # i-C+1+j for i = 39
    assert shadows.slots.tolist() == [int(table[0, p // block_size]) * block_size
                                      + p % block_size for p in dest]
    expected = ROPE.cos_sin(torch.tensor([24] * 4), torch.float64)  # rotate j -> 24 + j
    assert torch.allclose(shadows.rotation_table[shadows.positions], expected)
    # Sources: the sinks' keys then values, [4 tokens, 2 heads, D] each, in the vec layout
    # (per block and head a [D, B] key page, then a [B, D] value page).
    page = 2 * block_size * ROPE.head_dim

    def flat(pos, head, dim, value):
        block, off = int(table[0, pos // block_size]), pos % block_size
        base = (block * 2 + head) * page
        return (base + block_size * ROPE.head_dim + off * ROPE.head_dim + dim if value
                else base + dim * block_size + off)

    def expect(positions):
        return [flat(p, h, d, v) for v in (False, True) for p in positions
                for h in range(2) for d in range(ROPE.head_dim)]

    assert shadows.source_slots.tolist() == [int(table[0, 0]) * block_size + j for j in range(4)]
    assert shadows.key_elements == 4 * 2 * ROPE.head_dim
    assert shadows.source_index.tolist() == expect(range(4))
    assert shadows.slots.dtype == torch.int64  # vLLM's cache write takes int64 slots


def test_sink_rotation_moves_query_to_its_cache_slot():
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=12)
    table = torch.arange(10).view(1, 10)
    # A prefill chunk past C goes through the PyTorch path (as a tile).
    plan = plan_step(cfg, ROPE, 8, [40], [0, 2], table, torch.float64, small_tile=0)
    assert not plan.kernel
    (tile,) = plan.tiles
    # Query 39 sits at slot C-1 = 15: rotation by 15 - 39 = -24 positions.
    assert torch.allclose(tile.sink_rotation[1], ROPE.cos_sin(torch.tensor([-24]),
                                                              torch.float64)[0])


def test_alibi_tiles_carry_in_cache_distances():
    """Without RoPE (ALiBi) a tile has no rotation but the distances its bias is made of: i - j
    to window keys, n-1-j to sinks (n-1 = C-1 for a query past C)."""
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=12)
    plan = plan_step(cfg, None, 8, [40], [0, 2], torch.arange(10).view(1, 10), torch.float32,
                     head_dim=64)
    (tile,) = plan.tiles
    assert tile.sink_rotation is None
    assert tile.sink_distance[1].tolist() == [15 - j for j in range(4)]
    columns = tile.window_blocks.tolist()   # identity table: logical block = physical block
    assert tile.window_distance[1, 7].item() == 39 - (columns[0] * 8 + 7)


@pytest.mark.parametrize("positions", ["neox", "adjacent", "alibi", "neox-batch",
                                       "adjacent-batch"])
@pytest.mark.parametrize("sink,window,first,count", [(4, 12, 30, 9), (4, 12, 5, 20),
                                                     (1, 30, 40, 3), (0, 9, 20, 5),
                                                     (40, 12, 55, 1), (20, 7, 35, 1)])
def test_tile_attention_equals_the_definition(sink, window, first, count, positions):
    """attend_tile (fused window attention + sinks merged by log-sum-exp), and
    attend_decode_batch (a row per query of every tile: one softmax over both ranges), equal
    softmax over V(i) written out: window keys as stored, sink (pinned) logits with the query at
    its cache slot (RoPE, either pairing), or ALiBi's -slope * (in-cache distance) on every
    logit."""
    from streamsink.attention import attend_decode_batch, attend_tile
    from streamsink.kv_cache_layout import split_kv_cache
    from streamsink.rope import rotate

    batched = positions.endswith("-batch")
    positions = positions.removesuffix("-batch")
    rope = {"neox": ROPE, "adjacent": ADJACENT, "alibi": None}[positions]
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if rope is None else None
    torch.manual_seed(sink + first)
    cfg = StreamsinkConfig(sink_tokens=sink, window_tokens=window)
    block_size, kv_heads, heads, d = 8, 2, 4, 64
    table = torch.tensor([[5, 2, 7, 0, 3, 6, 1, 4]])
    cache = torch.randn(8, kv_heads, block_size, 2 * d, dtype=torch.float64)
    keys, values = split_kv_cache(cache)
    seq = first + count
    # Every tile batched, whatever its size, or none.
    plan = plan_step(cfg, rope, block_size, [seq], [0, count], table, torch.float64,
                     head_dim=d, small_tile=PREFILL_TILE if batched else 0)
    query = torch.randn(count, heads, d, dtype=torch.float64)
    if batched:
        assert not plan.tiles and plan.decodes.tokens.tolist() == list(range(count))
        got = attend_decode_batch(query, keys, values, plan.decodes, 0.125, rope)
    else:
        assert plan.decodes is None
        got = torch.cat([attend_tile(query[t.tokens], keys, values, t, 0.125, rope, slopes)
                         for t in plan.tiles])

    def kv(j):  # [Hkv, D] key and value of token j
        block, off = int(table[0, j // block_size]), j % block_size
        return keys[block, :, :, off], values[block, :, off, :]

    for t in range(count):
        i = first + t
        slot = min(i, cfg.cache_tokens - 1)
        for h in range(heads):
            logits, vals = [], []
            for j in range(i + 1):
                if not (j < sink or j > i - window):
                    continue
                k, v = kv(j)
                q = query[t, h]
                outside = j < sink and j <= i - window    # a sink outside the window
                if outside and rope is not None:          # q at its slot
                    q = rotate(q, rope.cos_sin(torch.tensor([slot - i]), torch.float64)[0],
                               rope.rotary_dim, rope.neox_style)
                bias = 0.0
                if rope is None:
                    bias = -float(slopes[h]) * ((slot if outside else i) - j)
                logits.append(0.125 * q @ k[h // 2] + bias)
                vals.append(v[h // 2])
            want = torch.softmax(torch.stack(logits), 0) @ torch.stack(vals)
            assert torch.allclose(got[t, h], want, atol=1e-10), (t, h)


@pytest.mark.parametrize("neox_style", [True, False], ids=["halves", "adjacent"])
def test_rebase_rerotation_equals_keys_cached_at_the_new_row_positions(neox_style):
    """RowWindow moves a row by delta and rotates the kept blocks' cached keys by -delta: the
    result equals keys rotated at the new row positions directly (the "vec" cache layout), with
    the model's table (attention factor included) against a pure rotation."""
    from streamsink.kv_cache_layout import rotate_cached_keys, split_kv_cache
    from streamsink.rope import rotate

    torch.manual_seed(0)
    rope = RopeSpec(head_dim=64, rotary_dim=16, theta=10000.0, neox_style=neox_style,
                    frequencies=tuple(0.3 ** k for k in range(8)), attention_factor=1.2)
    num_blocks, kv_heads, block_size, delta = 5, 2, 8, 3 * 8
    raw = torch.randn(num_blocks, block_size, kv_heads, 64, dtype=torch.float64)
    positions = torch.arange(num_blocks * block_size).view(num_blocks, block_size) + 100

    def cache_at(pos):  # keys rotated at `pos`, stored as the CPU backend stores them
        cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * 64, dtype=torch.float64)
        keys, _ = split_kv_cache(cache)
        rotated = rotate(raw, rope.model_table(pos.flatten(), torch.float64).view(
            num_blocks, block_size, 1, -1), rope.rotary_dim, rope.neox_style)
        keys.copy_(rotated.permute(0, 2, 3, 1))                        # [N, Hkv, D, B]
        return cache

    moved = cache_at(positions)
    kept = torch.tensor([1, 3, 4])
    rotate_cached_keys(moved, kept, rope.cos_sin(torch.tensor([-delta]), torch.float64)[0],
                       rope.rotary_dim, rope.neox_style)
    want = cache_at(positions - delta)
    assert torch.allclose(moved[kept], want[kept], atol=1e-12)
    assert torch.equal(moved[[0, 2]], cache_at(positions)[[0, 2]])  # other blocks untouched


def test_decodes_batched_equal_one_tile_at_a_time():
    """A step's small tiles — requests with different pins, windows and lengths, some past
    their cache and some with no sink outside the window, one of three queries — computed as one
    padded batch equal each tile computed alone by attend_tile (both checked against the
    definition above)."""
    from streamsink.attention import attend_decode_batch, attend_tile
    from streamsink.kv_cache_layout import split_kv_cache
    from streamsink.stream_rule import StreamShape

    torch.manual_seed(7)
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=12, max_pinned_tokens=40)
    block_size, kv_heads, heads, d = 8, 2, 4, 64
    shapes = [StreamShape(40, 12, writes_shadows=False), StreamShape(0, 9, writes_shadows=False),
              StreamShape(3, 5, writes_shadows=False), StreamShape(4, 12),
              StreamShape(20, 7, writes_shadows=False)]
    seq_lens = [70, 30, 19, 18, 45]        # the engine-shaped one right after C (no kernel)
    table = torch.randperm(60)[:50].view(5, 10)
    cache = torch.randn(60, kv_heads, block_size, 2 * d, dtype=torch.float64)
    keys, values = split_kv_cache(cache)
    starts = [0, 1, 2, 3, 4, 7]              # the last request: a chunk of three queries
    plan = plan_step(cfg, ROPE, block_size, seq_lens, starts, table, torch.float64,
                     head_dim=d, shapes=shapes)
    assert plan.decodes is not None and not plan.tiles
    assert plan.decodes.tokens.tolist() == list(range(7))
    query = torch.randn(7, heads, d, dtype=torch.float64)
    got = attend_decode_batch(query, keys, values, plan.decodes, 0.125, ROPE)
    for r in range(5):
        count = starts[r + 1] - starts[r]
        (tile,) = plan_step(cfg, ROPE, block_size, [seq_lens[r]], [0, count], table[r:r + 1],
                            torch.float64, head_dim=d, shapes=[shapes[r]], small_tile=0).tiles
        want = attend_tile(query[starts[r]:starts[r + 1]], keys, values, tile, 0.125, ROPE)
        assert torch.allclose(got[starts[r]:starts[r + 1]], want, atol=1e-12), r
