"""Streaming prefix caching, scheduler side, without an engine: vLLM's real KVCacheManager and
block pool with the streaming manager, driven like the scheduler drives them, beside a model of
what the worker writes into each physical block (tokens, and the sink shadows of kernel
decodes). Every key a step reads must be the request's own token at that position."""
import pytest

SINK, WINDOW, BLOCK = 4, 40, 16          # C = 44: a hit carries cdiv(43, 16) = 3 blocks


class Sim:
    """A synchronous scheduler + worker in miniature. content[block_id][slot] is what the
    worker last wrote there: ("tok", position, token) or ("shadow", position)."""

    def __init__(self, sink=SINK, window=WINDOW, block=BLOCK, num_blocks=96):
        import torch
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

        from streamsink.kv_policy import StreamingSinkSpec, register_kv_policy
        from streamsink.patches import kv_request_shapes

        register_kv_policy()
        kv_request_shapes.apply()   # the manager learns each request before its lookup
        init_none_hash(sha256)
        self.S, self.W, self.B, self.C = sink, window, block, sink + window
        spec = StreamingSinkSpec(block_size=block, num_kv_heads=1, head_size=64,
                                 dtype=torch.float32, sliding_window=window, sink_tokens=sink)
        config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        self.kv = KVCacheManager(config, max_model_len=10**7, scheduler_block_size=block,
                                 hash_block_size=block, enable_caching=True)
        self.manager = self.kv.coordinator.single_type_managers[0]
        self.pool = self.kv.block_pool
        self.hasher = get_request_block_hasher(block, sha256)
        self.content: dict[int, list] = {}
        self.running: dict = {}
        self.max_tokens: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.copies = 0
        self.check_cache = True

    def request(self, rid, prompt, max_tokens):
        from vllm import SamplingParams
        from vllm.v1.request import Request

        self.max_tokens[rid] = max_tokens
        return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), None,
                       block_hasher=self.hasher)

    def step(self, new=(), chunk=10**9):
        """One scheduling pass (running first, then the new requests) and its forward."""
        scheduled = {}
        for rid, req in self.running.items():
            n = min(chunk, req.num_tokens - req.num_computed_tokens)
            assert self.kv.allocate_slots(req, n) is not None
            scheduled[rid] = n
        for req in new:
            blocks, hit, _ = self.kv.get_computed_blocks(req)
            n = min(chunk, req.num_tokens - hit)
            assert self.kv.allocate_slots(req, n, num_new_computed_tokens=hit,
                                          new_computed_blocks=blocks) is not None
            req.num_computed_tokens = hit
            self.hits[req.request_id] = hit
            self.running[req.request_id] = req
            scheduled[req.request_id] = n
        copies, retained = self.kv.take_kv_cache_block_copies()
        self.pool.free_blocks(retained)  # what the scheduler does right after (sync)
        self.copies += len(copies)
        # Worker: copies first (one batched gather/scatter), then every write of the step,
        # then every read.
        snapshot = [list(self.content.get(c.src_block_id, [None] * self.B)) for c in copies]
        for c, data in zip(copies, snapshot):
            self.content[c.dst_block_id] = data
        for rid, n in scheduled.items():
            req, q = self.running[rid], self.running[rid].num_computed_tokens
            if n == 1 and q >= self.C + self.S - 1:      # kernel decode: sink shadows
                for p in range(q - self.C + 1, q - self.W + 1):
                    self._write(rid, p, ("shadow", p))
            for p in range(q, q + n):
                self._write(rid, p, ("tok", p, req.all_token_ids[p]))
        for rid, n in scheduled.items():
            self._check_reads(rid, self.running[rid].num_computed_tokens, n)
        self._check_no_sharing()
        finished = []
        for rid, n in scheduled.items():
            req = self.running[rid]
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.append_output_token_ids(3 + (req.num_tokens * 7 + len(rid)) % 500)
                if len(req.output_token_ids) >= self.max_tokens[rid]:
                    finished.append(rid)
        for rid in finished:
            self.kv.free(self.running.pop(rid))
        if self.check_cache:
            self._check_cache_clean()
        return finished

    def run(self, req, chunk=10**9):
        """Admit req and step until it finishes; returns its generated tokens."""
        self.step(new=[req], chunk=chunk)
        while req.request_id in self.running:
            self.step(chunk=chunk)
        return list(req.output_token_ids)

    def _slot(self, rid, p):
        block = self.manager.req_to_blocks[rid][p // self.B]
        assert not block.is_null, (rid, p)
        return block.block_id, p % self.B

    def _write(self, rid, p, entry):
        block_id, slot = self._slot(rid, p)
        self.content.setdefault(block_id, [None] * self.B)[slot] = entry

    def _check_reads(self, rid, q, n):
        """Streaming attention of queries q..q+n-1: sinks and the window, from this request's
        blocks, must hold its own tokens (shadow slots are written by the step itself)."""
        tokens = self.running[rid].all_token_ids
        for i in (q, q + n - 1):
            visible = [j for j in range(min(self.S, i + 1))]
            visible += range(max(self.S, i - self.W + 1), i + 1)
            for j in visible:
                block_id, slot = self._slot(rid, j)
                got = self.content[block_id][slot]
                assert got == ("tok", j, tokens[j]), f"{rid} query {i} read {got} at {j}"

    def _check_no_sharing(self):
        owner = {}
        for rid, blocks in self.manager.req_to_blocks.items():
            for b in blocks:
                if not b.is_null:
                    assert owner.setdefault(b.block_id, rid) == rid, "block shared by two"

    def _check_cache_clean(self):
        """Every hashed block holds the real keys of the B tokens its hash covers."""
        for block in self.pool.blocks:
            if block.block_hash is None:
                continue
            end = block.block_hash_num_tokens
            data = self.content[block.block_id]
            assert [e[:2] for e in data] == [("tok", p) for p in range(end - self.B, end)], \
                f"cached block {block.block_id} holds {data}"

    def assert_pool_restored(self):
        assert not self.running and not self.manager.req_to_blocks
        assert self.pool.get_num_free_blocks() == self.pool.num_gpu_blocks - 1
        assert all(b.ref_cnt == 0 for b in self.pool.blocks if not b.is_null)


def chat(sim, turns, user_tokens, gen_tokens, chunk=10**9, seed=0):
    """A multi-turn session: each prompt is the history (prompt + generated) + a user turn."""
    import random

    rng = random.Random(seed)
    history, hits, lengths = [], [], []
    for t in range(turns):
        prompt = history + [rng.randrange(3, 500) for _ in range(user_tokens)]
        req = sim.request(f"turn{t}-{seed}", prompt, gen_tokens)
        history = prompt + sim.run(req, chunk)
        hits.append(sim.hits[req.request_id])
        lengths.append(len(prompt))
    return hits, lengths


def test_chat_turns_hit_the_processed_history_and_read_clean_keys():

    sim = Sim()
    copies_before = sim.manager.cache.shadow_copies_total
    hits, lengths = chat(sim, turns=6, user_tokens=20, gen_tokens=30)
    assert hits[0] == 0
    for t in range(1, 6):
        processed = lengths[t - 1] + 30 - 1          # the last sampled token is not computed
        assert hits[t] == processed // BLOCK * BLOCK, (t, hits)
    assert lengths[-1] > 5 * (SINK + WINDOW)
    # The decodes' shadows reached cached blocks: clean copies kept the cache exact.
    assert sim.manager.cache.shadow_copies_total > copies_before
    sim.assert_pool_restored()
    assert len(sim.pool.cached_block_hash_to_block) > 0


def test_lookup_layout_and_sink_requirement():
    sim = Sim()
    prompt = [3 + i % 400 for i in range(200)]
    sim.run(sim.request("first", prompt, 2))
    req = sim.request("second", prompt + [7, 8, 9], 1)
    blocks, hit, _ = sim.kv.get_computed_blocks(req)
    group = blocks.blocks[0]
    run = -(-(SINK + WINDOW - 1) // BLOCK)
    assert hit == 201 // BLOCK * BLOCK == len(group) * BLOCK
    assert not group[0].is_null                                     # the sink block
    assert all(b.is_null for b in group[1:len(group) - run])        # the skipped middle
    assert not any(b.is_null for b in group[len(group) - run:])     # the last C-1 tokens
    # Without its sink block a prefix cannot hit at all.
    sim.pool._maybe_evict_cached_block(group[0])
    blocks, hit, _ = sim.kv.get_computed_blocks(req)
    assert hit == 0


def test_a_shared_shadowed_block_would_be_caught(monkeypatch):
    """Negative control: without the copy before the first shadow, a later turn reads
    another request's shadows (or the cache holds shadowed blocks), and this model sees it."""
    from streamsink.prefix_cache import StreamingPrefixCache

    monkeypatch.setattr(StreamingPrefixCache, "protect_from_shadows",
                        lambda self: self._scheduled.clear())
    sim = Sim()
    with pytest.raises(AssertionError, match="shadow"):
        chat(sim, turns=4, user_tokens=20, gen_tokens=30)
    sim = Sim()
    sim.check_cache = False  # the cache holds shadows; the next turn's window reads them
    with pytest.raises(AssertionError, match="read"):
        chat(sim, turns=4, user_tokens=20, gen_tokens=30)


def test_concurrent_requests_never_share_a_block():
    """B continues A's history while A keeps decoding (and shadowing) over the same range:
    B gets copies of the blocks A holds; both read only their own keys."""

    sim = Sim()
    a = sim.request("A", [3 + i % 450 for i in range(150)], 120)
    sim.step(new=[a])
    for _ in range(20):
        sim.step()
    copies_before = sim.manager.cache.adopt_copies_total
    b = sim.request("B", list(a.all_token_ids[:a.num_computed_tokens]) + [9, 9, 9], 60)
    sim.step(new=[b])
    assert sim.hits["B"] >= a.num_computed_tokens - 20 - BLOCK
    assert sim.manager.cache.adopt_copies_total > copies_before
    while sim.running:
        sim.step()
    sim.assert_pool_restored()


def test_first_step_a_single_token_decode_on_adopted_blocks():
    """A prompt one token past a block boundary: the hit leaves one token, whose step is a
    kernel decode that shadows the adopted (cached) blocks at once."""

    sim = Sim()
    prompt = [3 + i % 300 for i in range(200)]
    sim.run(sim.request("first", prompt, 1))
    nxt = prompt[:11 * BLOCK + 1]                 # len - 1 is a multiple of B
    copies = sim.manager.cache.shadow_copies_total
    sim.run(sim.request("second", nxt, 20))
    assert sim.hits["second"] == len(nxt) - 1
    assert sim.manager.cache.shadow_copies_total > copies
    sim.assert_pool_restored()


def test_window_smaller_than_a_block():
    """W < B: shadows reach a block before it is full; such blocks are never hashed."""
    sim = Sim(sink=4, window=10, block=16)
    hits, _ = chat(sim, turns=5, user_tokens=12, gen_tokens=25)
    sim.assert_pool_restored()
    assert all(h > 0 for h in hits[1:])  # shorter than with W >= B, but hits


@pytest.mark.parametrize("chunk", [7, 32])
def test_chunked_prefill_and_hits(chunk):
    sim = Sim()
    hits, lengths = chat(sim, turns=4, user_tokens=40, gen_tokens=20, chunk=chunk)
    assert all(h > 0 for h in hits[1:])
    sim.assert_pool_restored()


def test_no_free_block_for_a_copy_drops_the_hash():
    """A shadow must never wait for a free block: with none left after the pass, the cached
    block just leaves the cache (the next hit is shorter, never wrong)."""

    sim = Sim()
    chat(sim, turns=2, user_tokens=20, gen_tokens=30)
    take, free_count = sim.kv.take_kv_cache_block_copies, sim.pool.get_num_free_blocks

    def take_with_pool_exhausted():  # the end-of-pass decision sees no free block
        sim.pool.get_num_free_blocks = lambda: 0
        try:
            return take()
        finally:
            sim.pool.get_num_free_blocks = free_count

    sim.kv.take_kv_cache_block_copies = take_with_pool_exhausted
    unhashed = sim.manager.cache.unhashed_total
    chat(sim, turns=2, user_tokens=20, gen_tokens=30, seed=1)
    sim.kv.take_kv_cache_block_copies = take
    assert sim.manager.cache.unhashed_total > unhashed
    sim.assert_pool_restored()


def test_blocks_to_allocate_counts_what_an_admission_takes():
    """get_num_blocks_to_allocate == blocks an admission takes from the free count (sinks
    adopted from the free queue, the run, held hits' copies, fresh blocks)."""
    sim = Sim()
    prompt = [3 + i % 400 for i in range(300)]
    sim.run(sim.request("base", prompt, 40))
    counted = []
    original = sim.manager.get_num_blocks_to_allocate

    def spy(*args, **kwargs):
        counted.append(original(*args, **kwargs))
        return counted[-1]

    sim.manager.get_num_blocks_to_allocate = spy
    for name, extra in (("free-hit", [5] * 50), ("held-hit", [6] * 70)):
        req = sim.request(name, prompt + [9] * 30 + extra, 5)
        blocks, hit, _ = sim.kv.get_computed_blocks(req)
        assert hit > 0
        free = sim.pool.get_num_free_blocks()
        assert sim.kv.allocate_slots(req, req.num_tokens - hit, num_new_computed_tokens=hit,
                                     new_computed_blocks=blocks) is not None
        assert free - sim.pool.get_num_free_blocks() == counted[-1]
        req.num_computed_tokens = hit
        # Keep it running, so the next probe's hits are held (copied).
        copies, retained = sim.kv.take_kv_cache_block_copies()
        sim.pool.free_blocks(retained)
    for rid in ("free-hit", "held-hit"):
        sim.kv.free(sim.request(rid, [1], 1))
    sim.manager.get_num_blocks_to_allocate = original
    assert sim.pool.get_num_free_blocks() == sim.pool.num_gpu_blocks - 1


def test_gauges_read_the_pool_after_the_last_request_is_freed(monkeypatch, tmp_path):
    """What a user watches on an idle server: once the last request is freed the published
    pool_used_blocks is what the pool holds (0 blocks), not the count from before vLLM returned
    that request's blocks. Freed through vLLM's own KVCacheManager.free, as the scheduler does
    at finish, abort and preemption."""
    from streamsink import metrics

    monkeypatch.setenv(metrics.ENV_DIR, str(tmp_path))   # this Sim's snapshot alone
    sim = Sim()

    def pool_used():
        return sim.pool.num_gpu_blocks - 1 - sim.pool.get_num_free_blocks()

    hits, _ = chat(sim, turns=3, user_tokens=20, gen_tokens=30)   # finishes, with cache hits
    assert hits[-1] > 0
    totals = metrics.read_totals(str(tmp_path))
    assert totals["held_blocks"] == totals["streams"] == 0
    assert totals["pool_used_blocks"] == pool_used() == 0
    # A running request: the gauges follow it, then its abort (the same free) empties them.
    req = sim.request("aborted", [3 + i % 400 for i in range(100)], 50)
    sim.step(new=[req])
    sim.manager.publish(force=True)
    assert metrics.read_totals(str(tmp_path))["pool_used_blocks"] == pool_used() > 0
    sim.kv.free(sim.running.pop("aborted"))
    totals = metrics.read_totals(str(tmp_path))
    assert totals["held_blocks"] == totals["streams"] == 0
    assert totals["pool_used_blocks"] == pool_used() == 0
    sim.assert_pool_restored()
