"""`streamsink model-path`: print the local checkpoint directory of a model."""
from __future__ import annotations

from streamsink.model_store import resolve_model


def run(args) -> int:
    print(resolve_model(args.model))
    return 0
