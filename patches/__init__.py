"""Patches to vLLM internals that no plugin hook reaches: one module per touch point."""
