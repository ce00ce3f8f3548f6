"""Fixtures of the integration tests only (the shared ones are in tests/fixtures/)."""

import pytest

from tests.conftest import Stack
from tests.source_events import EventReader


@pytest.fixture
def reader(stack: Stack) -> EventReader:
    """Reads cdc-source's topics; keeps the envelopes this test read, for reader.assert_valid()."""
    return EventReader(stack.bootstrap_servers)
