"""The run-configuration error type (its own module so every part of the run config can raise it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad run configuration; ``launch/train.py`` prints it as one line and exits with code 2."""
