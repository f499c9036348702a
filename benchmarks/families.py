"""Every supported model family and RoPE/ALiBi variant (plugin/model_families.py) streamed by
the engine against the literal reference (reference/streaming_llm.py), on tiny random
checkpoints (tests/tiny_models.py; no model hub): the max |dNLL| per family for the
supported-models table.

Per variant, one streaming engine (fp32; S=4, W=60, KV blocks of 32, rows of 256 tokens, steps
of 64) runs three streams in one call (prompts of 600, 200 and 40 tokens, 48 generated each:
chunked prefill past C, decodes with sink shadows, mixed steps, row rebases), then continues the
longest from the prefix cache (60 more tokens, 32 generated); every prompt and generated token's
NLL is compared with the reference over the same tokens. Stock vLLM (no streamsink) runs the
first C+1 tokens, where streaming is dense, against the same reference (LongRoPE: C tokens, so
that stock vLLM's max_model_len stays within original_max_position_embeddings, past which it
takes the long factors for every position).

    .venv/bin/python benchmarks/families.py [--quick] [--only NAME ...]

Writes results/families/<UTC date>-<short commit>.json; `make docs` renders the supported-models
table from it (reports/families.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import common

ROOT = os.path.dirname(common.HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

FULL = dict(sink=4, window=60, block=32, max_model_len=256, step=64, prompts=(600, 200, 40),
            generated=48, continuation=60, continuation_generated=32)
QUICK = dict(sink=4, window=28, block=32, max_model_len=128, step=32, prompts=(150, 60, 20),
             generated=16, continuation=20, continuation_generated=12)


def describe(model_path: str) -> dict:
    """Architecture, registry family and position encoding of a checkpoint."""
    from transformers import AutoConfig

    from streamsink.model_families import family_of
    from streamsink.rope import rope_type_of, uses_alibi

    config = AutoConfig.from_pretrained(model_path)
    arch = config.architectures[0]
    family = family_of(arch)
    return {"architecture": arch, "family": family.name if family else None,
            "positions": "ALiBi" if uses_alibi(config) else f"RoPE {rope_type_of(config)}"}


def measure(names: list[str], shape_args: dict, workdir: str) -> dict:
    from family_streams import StreamShape, build_model, max_difference, measure_families

    shape = StreamShape(**shape_args)
    models = {name: build_model(name, workdir) for name in names}
    measured = measure_families(
        models, shape, progress=lambda name, s: print(f"{name}: engines done ({s:.1f} s)",
                                                      flush=True))
    variants = {}
    for name, m in measured.items():
        run, refs, stock = m.run, m.references, m.stock
        streaming = max(max_difference(seq.nlls, ref) for seq, ref in zip(run.sequences, refs))
        dense = max(abs(a - b) for a, b in zip(stock, refs[0]))
        variants[name] = {**describe(models[name]), "max_abs_dnll": streaming,
                          "stock_dense_max_abs_dnll": dense, "stock_dense_tokens": len(stock),
                          "tokens_compared": sum(len(s.nlls) for s in run.sequences),
                          "longest_stream": len(run.sequences[0].tokens),
                          "rebases": run.rebases, "prefix_cache_hit_tokens": run.cached_tokens,
                          "attention_steps": run.paths, "engine_seconds": round(m.seconds, 1)}
        print(f"{name}: max |dNLL| {streaming:.2e} (stock dense {dense:.2e})", flush=True)
    return variants


def main() -> None:
    from family_streams import FAMILY_MODELS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the test suite's shorter streams")
    parser.add_argument("--only", nargs="*", choices=list(FAMILY_MODELS), default=None)
    args = parser.parse_args()
    names = args.only or list(FAMILY_MODELS)
    shape = QUICK if args.quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        variants = measure(names, shape, workdir)
    # Commit, machine and versions go into the file's provenance (result_files.py).
    path = common.save("families" + ("_quick" if args.quick else ""), {
        "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
        "tolerance_in_tests": 1e-3, "variants": variants,
        "seconds": round(time.perf_counter() - started, 1)}, args)
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
