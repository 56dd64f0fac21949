"""The lab's tests use the product suite's fixtures (tests/fixtures.py)."""

from fixtures import *  # noqa: F403
