"""User-facing entry points: the `streamsink` CLI, serving and metrics."""
