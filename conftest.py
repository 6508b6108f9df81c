"""Root conftest: our own suite uses headguard's Hypothesis profiles (choose one with --hypothesis-profile)."""

import headguard.profiles  # noqa: F401  (registers headguard-dev, headguard-ci and headguard-fuzz)
