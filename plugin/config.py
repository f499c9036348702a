"""The streamsink engine configuration: parsed from ``additional_config["streamsink"]``.

Streaming is on for an engine whose additional_config has a ``streamsink`` entry (``{}`` means the
defaults); without one the engine is stock vLLM. Invalid values are refused with a one-line reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

CONFIG_KEY = "streamsink"
DEFAULT_SINK_TOKENS = 4
DEFAULT_WINDOW_TOKENS = 1020


class StreamsinkConfigError(ValueError):
    """An invalid streamsink configuration; the message is one line, meant for the user."""


@dataclass(frozen=True)
class StreamsinkConfig:
    sink_tokens: int = DEFAULT_SINK_TOKENS    # S: the first S tokens stay visible forever
    window_tokens: int = DEFAULT_WINDOW_TOKENS  # W: the W most recent tokens, the query included

    @property
    def cache_tokens(self) -> int:
        """C = S + W: the most keys one query attends to."""
        return self.sink_tokens + self.window_tokens


_FIELDS = {"sink_tokens": 0, "window_tokens": 1}  # name -> smallest allowed value


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
    for name, minimum in _FIELDS.items():
        if name not in raw:
            continue
        value = raw[name]
        # bool is an int subclass; `true` is never a meaningful token count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise StreamsinkConfigError(
                f"streamsink {name} must be an integer, got {value!r}")
        if value < minimum:
            raise StreamsinkConfigError(f"streamsink {name} must be >= {minimum}, got {value}")
        values[name] = value
    return StreamsinkConfig(**values)


def config_from_additional(additional_config: Any) -> StreamsinkConfig | None:
    """The streamsink config of an engine, or None when streaming is off (stock vLLM)."""
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    return parse_config(additional_config[CONFIG_KEY])
