"""`streamsink model-path`: print the local checkpoint directory of a model (the default
model's: of the --weights format, prepared if needed)."""
from __future__ import annotations

from streamsink.serving.engine_args import choose_model


def run(args) -> int:
    print(choose_model(args.model, args.weights).path)
    return 0
