"""Hypothesis profiles shared by the CLI, the pytest plugin and our own test suite.

They are registered as `headguard-dev` (quick), `headguard-ci` (derandomized, no example database) and
`headguard-fuzz` (many examples). headguard's own `--profile` options also accept the short names `dev`, `ci` and
`fuzz`; with Hypothesis they are registered only where no profile of that name exists when headguard is imported, so
a user's own `dev` profile, and Hypothesis' built-in `ci`, are never replaced.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis.errors import InvalidArgument

PROFILES = ("headguard-dev", "headguard-ci", "headguard-fuzz")
ALIASES = {"dev": "headguard-dev", "ci": "headguard-ci", "fuzz": "headguard-fuzz"}
# What `--profile` accepts: the full names, then the short ones.
CHOICES = (*PROFILES, *ALIASES)
_SLOW_INPUTS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors]

# Built on Hypothesis' own `default` profile, not on the current one: Hypothesis makes its derandomized `ci` profile
# current wherever a CI variable is set, and a randomised `dev` or `fuzz` run must stay randomised on a CI machine.
_BASE = settings.get_profile("default")
settings.register_profile(
    "headguard-dev", _BASE, max_examples=20, deadline=None, derandomize=False, suppress_health_check=_SLOW_INPUTS,
)
settings.register_profile(
    "headguard-ci", _BASE, max_examples=10, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=_SLOW_INPUTS,
)
settings.register_profile(
    "headguard-fuzz", _BASE, max_examples=1000, deadline=None, derandomize=False, suppress_health_check=_SLOW_INPUTS,
)

def canonical(profile: str) -> str:
    """The registered name of a headguard profile given by its full or short name."""
    if profile in PROFILES:
        return profile
    if profile in ALIASES:
        return ALIASES[profile]
    raise ValueError(f"Expected a Hypothesis profile in {CHOICES}, got profile={profile!r}")


def settings_for(profile: str) -> settings:
    """The Hypothesis settings a check runs under: a headguard profile by its full or short name (the short name
    means ours even where a user or Hypothesis registered another profile under it), or any other registered
    profile by name (tests derive their own)."""
    return settings.get_profile(ALIASES.get(profile, profile))


def derandomized(profile: str) -> bool:
    return settings_for(profile).derandomize


class _ByProfile(dict):
    """A table keyed by the full profile names that also answers to the short ones."""

    def __missing__(self, profile: str):
        return self[canonical(profile)]


# Seconds one check may run before it is reported as hung (`--timeout` and HeadSpec(timeout=...) override). A
# reference check takes under 7 s in `dev`/`ci` on a 2-core CPU; `fuzz` draws 50-100 times as many examples.
TIME_LIMITS_S = _ByProfile({"headguard-dev": 120.0, "headguard-ci": 120.0, "headguard-fuzz": 1800.0})


def load(profile: str) -> None:
    """Make `profile` (full or short name) Hypothesis' current profile; a short name that is still ours is loaded
    under that name, so `get_current_profile_name()` reads as the caller asked."""
    name = canonical(profile)
    if profile in _OWN_ALIASES and _OWN_ALIASES[profile] is _registered(profile):
        name = profile
    settings.load_profile(name)


def _registered(name: str) -> settings | None:
    try:
        return settings.get_profile(name)
    except InvalidArgument:
        return None


# The short names registered here (free when headguard was imported) -> the settings registered under them; a user
# who registers the name again later gets their own profile, never ours.
_OWN_ALIASES: dict[str, settings] = {}


def _register_free_aliases() -> None:
    for alias, name in ALIASES.items():
        if _registered(alias) is None:
            settings.register_profile(alias, settings.get_profile(name))
            _OWN_ALIASES[alias] = settings.get_profile(alias)


_register_free_aliases()
