"""headguard: property-based and fuzz tests for object-detector heads."""

from headguard.errors import UsageError
from headguard.outcomes import CheckFailure, CheckSkipped
from headguard.subject import ExpectedFailure, HeadSpec, Subject, build_subject

__all__ = [
    "CATALOGUE", "CheckFailure", "CheckResult", "CheckSkipped", "ExpectedFailure", "HeadSpec", "NonFiniteOrigin",
    "ShapeLossSpec", "Subject", "UsageError", "build_subject", "check", "check_head", "locate_nonfinite",
    "parametrize_with_checks", "run_checks",
]
__version__ = "0.1.0"

# Resolved on first use: `import headguard` stays light, and parametrize_with_checks needs pytest only when used.
_LAZY = {
    "CheckResult": "headguard.runner",
    "run_checks": "headguard.runner",
    "locate_nonfinite": "headguard.tracing",
    "NonFiniteOrigin": "headguard.tracing",
    "parametrize_with_checks": "headguard.plugin",
    "ShapeLossSpec": "headguard.shapes",
    "check_head": "headguard.api",
    "check": "headguard.registry",
}


def __getattr__(name: str):
    if name == "CATALOGUE":  # filled by importing headguard.checks: an eager import would hand out an empty dict
        from headguard.registry import CATALOGUE, load_catalogue

        load_catalogue()
        return CATALOGUE
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'headguard' has no attribute {name!r}")
