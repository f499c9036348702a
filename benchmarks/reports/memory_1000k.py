"""memory.py --tokens 1000000: the same measurement over one 1,000,000-token stream."""
from __future__ import annotations

from . import memory
from .base import Doc

NAMES = ("memory_1000k",)


def markdown(results: dict, doc: Doc) -> str:
    return memory.markdown(results, doc, NAMES[0])


def images(results: dict, img_dir: str) -> list[str]:
    return memory.images(results, img_dir, NAMES[0])
