"""How every patch in this package installs itself: checked first, once, undoable (§6 of
docs/architecture.md).

- `require(owner, name, params, needles=...)` checks a target before it is patched: it exists,
  its leading parameters (all of them with exact=True) are the ones the wrapper relies on, its
  source still holds the lines the patch relies on; otherwise PatchTargetMoved, one line. Once
  the target is patched the check reads the original, so it can run again after apply().
- `wrap(owner, name, around)` makes owner.name call around(original, *args, **kwargs); a method,
  classmethod, staticmethod, cached_property or module function keeps its kind, a coroutine
  function stays one. `replace(owner, name, make)` sets a value made from the original.
- Both install once: apply() runs in every vLLM process, and a forked one inherits its parent's
  patches, so a second call leaves the first wrapper in place.
- `undo(owner, name)` puts the original back (tests; a patch that holds only inside a block).

The record kept here is what each installed patch replaced: facts about vLLM's and Ray's code,
the same for every engine in the process. Imports neither vLLM nor Ray.
"""
from __future__ import annotations

import functools
import inspect
from functools import cached_property
from typing import Any, Callable, Iterable

from streamsink.errors import PatchTargetMoved

# (owner, name) -> (the attribute as it was, the one installed in its place)
_installed: dict[tuple[Any, str], tuple[Any, Any]] = {}


def _function(attribute):
    """The function inside a classmethod, staticmethod or cached_property."""
    if isinstance(attribute, (classmethod, staticmethod)):
        return attribute.__func__
    if isinstance(attribute, cached_property):
        return attribute.func
    return attribute


def _stored(owner, name):
    """owner.name as the owner itself stores it (a classmethod object, not the bound method);
    None when the owner does not define it."""
    now = vars(owner).get(name)
    was, ours = _installed.get((owner, name), (None, None))
    return was if ours is not None and now is ours else now


def original_of(owner, name):
    """What a patch of owner.name wraps: the original while our patch is in place, else what is
    there now; a function for a classmethod, staticmethod or cached_property. None if absent."""
    return _function(_stored(owner, name))


def installed() -> list[tuple[Any, str]]:
    """(owner, name) of every patch installed in this process."""
    return list(_installed)


def _where(owner, name: str) -> str:
    return f"{getattr(owner, '__name__', owner)}.{name}"


def contains(obj, needles: Iterable[str], where: str) -> str:
    """obj's source; PatchTargetMoved unless it holds every needle."""
    source = inspect.getsource(obj)
    for needle in needles:
        if needle not in source:
            raise PatchTargetMoved(f"{where} no longer contains {needle!r}")
    return source


def require(owner, name: str, params: Iterable[str] | None = None, *, exact: bool = False,
            needles: Iterable[str] = (), kind: type | None = None):
    """owner.name's original (original_of), checked: the owner defines it (as a `kind` when
    given), its parameters start with `params` (are exactly `params` with exact=True), its
    source holds every needle. PatchTargetMoved with a one-line reason otherwise."""
    where = _where(owner, name)
    stored = _stored(owner, name)
    target = _function(stored)
    if not callable(target):
        raise PatchTargetMoved(f"{where} is gone")
    if kind is not None and not isinstance(stored, kind):
        raise PatchTargetMoved(f"{where} is no longer a {kind.__name__}")
    if params is not None:
        params = list(params)
        found = list(inspect.signature(target).parameters)
        if (found if exact else found[:len(params)]) != params:
            raise PatchTargetMoved(f"{where}({', '.join(params)}) changed")
    if needles:
        contains(target, needles, where)
    return target


def replace(owner, name: str, make: Callable[[Any], Any]) -> None:
    """owner.name becomes make(owner.name as stored); once: a second call changes nothing."""
    if (owner, name) in _installed:
        return
    was = vars(owner).get(name)
    if was is None:
        raise PatchTargetMoved(f"{_where(owner, name)} is gone")
    ours = make(was)
    setattr(owner, name, ours)
    _installed[(owner, name)] = (was, ours)


def wrap(owner, name: str, around: Callable) -> None:
    """owner.name calls around(original, *args, **kwargs) from now on, in the original's kind
    (method, classmethod, staticmethod, cached_property, module function); once."""
    replace(owner, name, lambda was: _same_kind(owner, was, _calling(around, _function(was))))


def _calling(around: Callable, function: Callable) -> Callable:
    # functools.wraps: the wrapper shows the original's name and signature to introspection.
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def wrapper(*args, **kwargs):
            return await around(function, *args, **kwargs)
    else:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return around(function, *args, **kwargs)
    return wrapper


def _same_kind(owner, was, function: Callable):
    if isinstance(was, (classmethod, staticmethod)):
        return type(was)(function)
    if isinstance(was, cached_property):
        wrapped = cached_property(function)
        wrapped.__set_name__(owner, was.attrname)
        return wrapped
    return function


def undo(owner, name: str) -> None:
    """Put back what replace() or wrap() replaced; nothing if it is not installed."""
    was, _ = _installed.pop((owner, name), (None, None))
    if was is not None:
        setattr(owner, name, was)
