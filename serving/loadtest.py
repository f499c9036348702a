"""`streamsink loadtest` (placeholder: being built)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise SystemExit("streamsink loadtest: not built yet")
