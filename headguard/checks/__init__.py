"""The check catalogue: importing this package registers every check (one module per area)."""

from headguard.checks import forward, head, loss, shape_loss, training  # noqa: F401

__all__ = ["forward", "head", "loss", "shape_loss", "training"]
