"""Root conftest: our own suite uses headguard's Hypothesis profiles (choose one with --hypothesis-profile)."""

import headguard.profiles  # noqa: F401  (registers dev, ci and fuzz)
