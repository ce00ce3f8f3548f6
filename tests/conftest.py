"""The tests' fixtures, one plugin per concern under tests/fixtures/. The integration tests run against
the real local stack (`make up`); a missing service fails the test with a message saying so, it is
never skipped.

Stack, Databases and admin_client are re-exported here: tests import them from tests.conftest."""

import pytest
from hypothesis import settings

# Property tests judge values, never time: no per-example deadline (a loaded CI machine is slow).
settings.register_profile("cdc", deadline=None)
settings.load_profile("cdc")

# Before the imports below: the plugins' asserts are rewritten like those of the tests.
pytest.register_assert_rewrite("tests.fixtures")

from tests.fixtures.databases import Databases  # noqa: E402
from tests.fixtures.stack import Stack, admin_client  # noqa: E402

pytest_plugins = [
    "tests.fixtures.stack",
    "tests.fixtures.databases",
    "tests.fixtures.kafka",
    "tests.fixtures.processes",
]

__all__ = ["Databases", "Stack", "admin_client"]
