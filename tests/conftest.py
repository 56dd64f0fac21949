"""The fixtures of tests/fixtures.py (on the path through pyproject.toml's pytest pythonpath)."""

from fixtures import *  # noqa: F403
