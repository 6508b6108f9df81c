"""headguard: property-based and fuzz tests for object-detector heads."""

from headguard.registry import CATALOGUE, CheckFailure, check
from headguard.subject import HeadSpec, Subject, build_subject

__all__ = ["CATALOGUE", "CheckFailure", "HeadSpec", "Subject", "build_subject", "check"]
__version__ = "0.1.0"
