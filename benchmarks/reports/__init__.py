"""One renderer per benchmark the docs show: markdown (and, where a table is hard to read, a
PNG) from the benchmark's result files. Nothing here imports torch or vLLM.

Each renderer has NAMES (the result names it reads), markdown(results, doc) and, when it draws,
images(results, img_dir) -> the file names it wrote under docs/img/. Mostly a module a block;
peer_llamacpp renders four blocks (docs/peer_llamacpp.md's three and the README's line), one
renderer object each, from the newest run holding the block's part (its load, its perplexity)."""
from __future__ import annotations

from . import (batch_resume_check, batch_throughput, chat_session, decode_latency, dtype_cost,
               families, headline, latency_vs_cache, load, many_streams, memory, memory_1000k,
               passkey, peer_llamacpp, perplexity, pinned, ppl_speed, ray_serve, shadow_cost,
               soak, token_time, weights_cost)

# generated block id -> renderer, in the order docs/benchmarks.md shows them
BLOCKS = {
    "decode_latency": decode_latency,
    "shadow_cost": shadow_cost,
    "latency_vs_cache": latency_vs_cache,
    "many_streams": many_streams,
    "load": load,
    "memory": memory,
    "memory_1000k": memory_1000k,
    "perplexity": perplexity,
    "ppl_speed": ppl_speed,
    "passkey": passkey,
    "chat_session": chat_session,
    "dtype_cost": dtype_cost,
    "batch_throughput": batch_throughput,
    "batch_resume_check": batch_resume_check,
    "ray_serve": ray_serve,
    "headline": headline,
    "models": families,
    "peer_load": peer_llamacpp.peer_load,
    "peer_goals": peer_llamacpp.peer_goals,
    "peer_ppl": peer_llamacpp.peer_ppl,
    "peer_headline": peer_llamacpp.peer_headline,
    "pinned_cost": pinned.pinned_cost,
    "pinned_chat": pinned.pinned_chat,
    "pinned_sharing": pinned.pinned_sharing,
    "weights_cost": weights_cost,
    "token_time": token_time,
    "soak": soak,
}
# Names `<benchmark>:<part>` choose, per block, the newest run that holds that part.
PARTS = {peer_llamacpp.LOAD: peer_llamacpp.has_load, peer_llamacpp.PPL: peer_llamacpp.has_ppl}
# which document holds which blocks
_ELSEWHERE = {
    "README.md": ("headline", "peer_headline", "models"),
    "docs/peer_llamacpp.md": ("peer_load", "peer_goals", "peer_ppl"),
    "docs/pinned_prompt.md": ("pinned_chat", "pinned_cost", "pinned_sharing"),
    "docs/weights.md": ("weights_cost",),
    "docs/token_time.md": ("token_time",),
    "docs/soak.md": ("soak",),
}
DOCUMENTS = {
    **_ELSEWHERE,
    "docs/benchmarks.md": tuple(b for b in BLOCKS
                                if not any(b in blocks for blocks in _ELSEWHERE.values())),
}
