"""The streamsink engine configuration: parsed from ``additional_config["streamsink"]``.

Streaming is on for an engine whose additional_config has a ``streamsink`` entry (``{}`` means the
defaults); without one the engine is stock vLLM. Invalid values are refused with a one-line reason.

`streaming_config(vllm_config)` is the one way the rest of the plugin reads it: parsed once and
kept on that VllmConfig object (it travels with the config to the engine processes), so two
engines in one process never see each other's settings.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from streamsink.errors import StreamsinkConfigError

CONFIG_KEY = "streamsink"
DEFAULT_SINK_TOKENS = 4
DEFAULT_WINDOW_TOKENS = 1020
# Share of the self-sized KV pool added for prefix caching (kv_budget.py): blocks of finished
# requests stay cached there for the next turn of a conversation.
DEFAULT_PREFIX_CACHE_HEADROOM = 0.25

# Where the parsed config is kept on the VllmConfig / ModelConfig objects it belongs to.
_ATTRIBUTE = "_streamsink_config"

__all__ = ["CONFIG_KEY", "StreamsinkConfig", "StreamsinkConfigError", "parse_config",
           "config_from_additional", "streaming_config", "streaming_model_config"]


@dataclass(frozen=True)
class StreamsinkConfig:
    sink_tokens: int = DEFAULT_SINK_TOKENS    # S: the first S tokens stay visible forever
    window_tokens: int = DEFAULT_WINDOW_TOKENS  # W: the W most recent tokens, the query included
    prefix_cache_headroom: float = DEFAULT_PREFIX_CACHE_HEADROOM
    # The most tokens one request may pin in place of the S sinks (request_options.py); the KV
    # budget and the admission bound hold a stream of this many pinned tokens. 0: no pins.
    max_pinned_tokens: int = 0

    @property
    def cache_tokens(self) -> int:
        """C = S + W: the most keys one query attends to."""
        return self.sink_tokens + self.window_tokens

    @property
    def widest_sink_tokens(self) -> int:
        """The most tokens a request of this engine keeps in front of its window."""
        return max(self.sink_tokens, self.max_pinned_tokens)

    def as_dict(self) -> dict:
        """The JSON form (what `additional_config["streamsink"]` takes)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# name -> (type, smallest allowed value)
_FIELDS = {"sink_tokens": (int, 0), "window_tokens": (int, 1),
           "prefix_cache_headroom": (float, 0.0), "max_pinned_tokens": (int, 0)}


def parse_config(raw: Any) -> StreamsinkConfig:
    """Validate the value of ``additional_config["streamsink"]``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise StreamsinkConfigError(
            f"streamsink config must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise StreamsinkConfigError(
            f"unknown streamsink option(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(_FIELDS)}")
    values = {}
    for name, (kind, minimum) in _FIELDS.items():
        if name not in raw:
            continue
        value = raw[name]
        # bool is an int subclass; `true` is never a meaningful count or share.
        accepted = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, accepted):
            what = "an integer" if kind is int else "a number"
            raise StreamsinkConfigError(f"streamsink {name} must be {what}, got {value!r}")
        if value < minimum:
            raise StreamsinkConfigError(f"streamsink {name} must be >= {minimum}, got {value}")
        values[name] = kind(value)
    return StreamsinkConfig(**values)


def config_from_additional(additional_config: Any) -> StreamsinkConfig | None:
    """The streamsink config in an engine's additional_config, or None (stock vLLM)."""
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    return parse_config(additional_config[CONFIG_KEY])


def streaming_config(vllm_config) -> StreamsinkConfig | None:
    """The streamsink config of this engine (None: stock vLLM), parsed once per VllmConfig."""
    if vllm_config is None:
        return None
    additional = getattr(vllm_config, "additional_config", None)
    cached = vars(vllm_config).get(_ATTRIBUTE)
    if cached is not None and cached[0] is additional:
        return cached[1]
    cfg = config_from_additional(additional)
    # object.__setattr__: vLLM's configs are pydantic dataclasses (assignment is validated).
    object.__setattr__(vllm_config, _ATTRIBUTE, (additional, cfg))
    if cfg is not None and getattr(vllm_config, "model_config", None) is not None:
        object.__setattr__(vllm_config.model_config, _ATTRIBUTE, cfg)
    return cfg


def streaming_model_config(model_config) -> StreamsinkConfig | None:
    """The streamsink config of the engine a ModelConfig belongs to (for vLLM code that is
    handed the model config alone); set once that engine's VllmConfig has been read."""
    return vars(model_config).get(_ATTRIBUTE) if model_config is not None else None
