"""The errors streamsink raises for users and maintainers, and how a refusal becomes one line.

A leaf module: it imports nothing else of streamsink, so every layer can raise these.
"""
from __future__ import annotations


class StreamsinkConfigError(ValueError):
    """An invalid streamsink configuration; the message is one line, meant for the user."""


class PatchTargetMoved(RuntimeError):
    """The vLLM or Ray internal a patch reaches into is not what the patch was written
    against (see patches/)."""


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception as one line, streamsink's own refusals unwrapped from the errors vLLM
    wraps them in (pydantic's ValidationError around the engine config, a cause chain)."""
    ours = find_config_error(exc)
    if ours is not None:
        return " ".join(str(ours).split())
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def find_config_error(exc: BaseException) -> StreamsinkConfigError | None:
    """The StreamsinkConfigError inside exc, if it is one or carries one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StreamsinkConfigError):
            return exc
        inner = _pydantic_inner(exc)
        if inner is not None:
            return inner
        exc = exc.__cause__ or exc.__context__
    return None


def _pydantic_inner(exc: BaseException) -> StreamsinkConfigError | None:
    # pydantic's ValidationError keeps the original exception in each error's ctx.
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return None
    try:
        for item in errors():
            inner = (item.get("ctx") or {}).get("error")
            if isinstance(inner, StreamsinkConfigError):
                return inner
    except Exception:  # not pydantic's errors(): nothing to unwrap
        return None
    return None


class UsageError(ValueError):
    """A command line or input the user must change (one line; the CLI exits 2)."""
