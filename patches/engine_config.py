"""Patch: validate and adjust a streaming engine's VllmConfig at start-up.

Why: a bad streamsink config must be refused in the process the user started, before any engine
process spawns, and a streaming engine's settings (KV layout, row width, prefix caching) need
checking after the platform has picked its block size. vLLM's only
config-time hook of that reach is the platform's check_and_update_config (an out-of-tree platform
plugin would replace the whole CPU platform, which is far more than we need).
How: CpuPlatform.check_and_update_config is wrapped; the wrapper calls
streamsink.engine_setup.configure_streaming_engine(vllm_config), then the original, then
finish_streaming_engine(vllm_config) (which needs the block size the platform picks, and sizes
the KV pool of a streaming engine given no budget, kv_budget.py).
Delete when: vLLM lets general plugins validate/adjust additional_config (a config hook).
"""
from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from streamsink.engine_setup import configure_streaming_engine, finish_streaming_engine
from streamsink.patches._install import require, wrap


def _check_and_update_config(original, cls, vllm_config):
    configure_streaming_engine(vllm_config)
    original(cls, vllm_config)
    finish_streaming_engine(vllm_config)


def check_target() -> None:
    require(CpuPlatform, "check_and_update_config", ["cls", "vllm_config"], exact=True,
            kind=classmethod)


def apply() -> None:
    check_target()
    wrap(CpuPlatform, "check_and_update_config", _check_and_update_config)
