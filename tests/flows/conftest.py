"""Prefect in ephemeral mode for every flow test (one temporary server for the session)."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
