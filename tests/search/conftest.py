"""A private local Ray for the search tests (loopback, small object store), started once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """Ray on 127.0.0.1 with 2 CPUs; ``run_study`` reuses it (and leaves it running) instead of starting its own."""
    from kdray.search.study import ray_session

    with ray_session(num_cpus=2):
        yield
