"""The per-step plan sees exactly V(i) = {j <= i : j < S or j > i - W} for every query."""
import random

import pytest
import torch

from streamsink.config import StreamsinkConfig
from streamsink.rope import RopeSpec
from streamsink.step_plan import plan_step

ROPE = RopeSpec(head_dim=64, rotary_dim=64, theta=10000.0)


def visible_positions(group, row, t, block_size, logical_of_physical):
    bias = group.bias[row, :, 0, t, 0, :]                      # [NB, B]
    seen = set()
    for b, physical in enumerate(group.block_ids[row].tolist()):
        for off in range(block_size):
            if bias[b, off] == 0:
                seen.add(logical_of_physical[physical] * block_size + off)
    return seen


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
                     torch.tensor(positions), torch.float32)
    if plan.kernel:
        # vLLM's kernel attends to the last C slots; that is exact only when every request is
        # dense, or a decode whose S shadow slots lie past the real sinks.
        for seq, q in reqs:
            assert seq <= cfg.cache_tokens or (q == 1 and seq - 1 >= cfg.cache_tokens
                                               + cfg.sink_tokens - 1)
        assert not plan.groups
        return
    covered = {}
    for g in plan.groups:
        for row in range(g.token_idx.shape[0]):
            for t in range(g.token_idx.shape[1]):
                token = int(g.token_idx[row, t])
                i = positions[token]
                req = next(r for r in range(len(reqs)) if query_start[r] <= token
                           < query_start[r + 1])
                assert all(p // max_blocks == req for p in
                           [(int(x) - 100) for x in g.block_ids[row]])
                expected = {j for j in range(i + 1)
                            if j < cfg.sink_tokens or j > i - cfg.window_tokens}
                assert visible_positions(g, row, t, block_size, logical_of_physical) == expected
                covered[token] = True
    assert sorted(covered) == list(range(len(positions)))


def test_shadows_fill_the_slots_the_window_just_left():
    """Decode at i: the C slots (i-C, i] hold sink j, rotated to i-C+1+j, then the window."""
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=12)        # C = 16
    block_size, table = 8, torch.arange(10).view(1, 10) + 3
    plan = plan_step(cfg, ROPE, block_size, [40], [0, 1], table, torch.tensor([39]),
                     torch.float64, kv_heads=2)
    assert plan.kernel and not plan.groups
    shadows = plan.shadows
    dest = [24, 25, 26, 27]                                        # i-C+1+j for i = 39
    assert shadows.slots.tolist() == [int(table[0, p // block_size]) * block_size
                                      + p % block_size for p in dest]
    expected = ROPE.cos_sin(torch.tensor([24] * 4), torch.float64)  # rotate j -> 24 + j
    assert torch.allclose(shadows.rotation, expected)
    assert shadows.key_index.numel() == 4 * 2 * ROPE.head_dim


def test_sink_rotation_moves_query_to_its_cache_slot():
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=12)
    table = torch.arange(10).view(1, 10)
    # A prefill chunk past C goes through the PyTorch path.
    plan = plan_step(cfg, ROPE, 8, [40], [0, 2], table, torch.tensor([38, 39]), torch.float64)
    assert not plan.kernel
    (group,) = plan.groups
    # Query 39 sits at slot C-1 = 15: rotation by 15 - 39 = -24 positions.
    assert torch.allclose(group.sink_rotation[0, 1], ROPE.cos_sin(torch.tensor([-24]),
                                                                   torch.float64)[0])


@pytest.mark.parametrize("query_len", [1, 2])
def test_rebased_row_keeps_absolute_angles(query_len):
    """A row rebased by `offset` (row_window.py) plans the same blocks and visibility in row
    positions, and every RoPE angle at the absolute position: model table, sink rotation and
    shadows equal those of the same step planned at absolute positions."""
    cfg = StreamsinkConfig(sink_tokens=4, window_tokens=12)        # C = 16
    block_size, offset = 8, 1_000_000 - 40                         # a multiple of 8
    table = torch.arange(10).view(1, 10) + 3
    rel = list(range(40 - query_len, 40))
    kwargs = dict(dtype=torch.float64, kv_heads=2)
    row = plan_step(cfg, ROPE, block_size, [40], [0, query_len], table, torch.tensor(rel),
                    offsets=[offset], **kwargs)
    absolute = [p + offset for p in rel]
    assert torch.allclose(row.rope_cos_sin, ROPE.cos_sin(torch.tensor(absolute), torch.float64))
    if query_len == 1:
        assert row.kernel
        # Sink j moves to absolute position i-C+1+j, into the row slots (i'-C+1+j).
        expected = ROPE.cos_sin(torch.tensor([absolute[0] - 15] * 4), torch.float64)
        assert torch.allclose(row.shadows.rotation, expected)
        assert row.shadows.slots.tolist() == [int(table[0, p // 8]) * 8 + p % 8
                                             for p in (24, 25, 26, 27)]
    else:
        (group,) = row.groups
        plain = plan_step(cfg, ROPE, block_size, [40], [0, 2], table, torch.tensor(rel),
                          **kwargs).groups[0]
        assert torch.equal(group.bias, plain.bias) and torch.equal(group.block_ids,
                                                                     plain.block_ids)
        # The query at absolute a sits at slot C-1: rotation by 15 - a.
        want = ROPE.cos_sin(torch.tensor([15 - a for a in absolute]), torch.float64)
        assert torch.allclose(group.sink_rotation[0], want)
