"""`streamsink batch` (placeholder: being built)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise SystemExit("streamsink batch: not built yet")
