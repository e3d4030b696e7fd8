"""Prefect in ephemeral mode for every flow test (one temporary server for the session)."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def pytest_collection_modifyitems(config, items):
    """Every test here runs Prefect's server (the harness above), most of them Ray too: the slow lane."""
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
