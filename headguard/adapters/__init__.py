"""Adapters for heads and losses that are not ours, so the catalogue can check them as it checks the reference."""
