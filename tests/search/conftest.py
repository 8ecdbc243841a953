"""A private local Ray for the search tests (loopback, small object store), started once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """Ray on 127.0.0.1 (tests/conftest.py sets the loopback switch before ray is imported); ``run_study`` uses it
    (and leaves it running) instead of starting its own."""
    import ray

    from kdray.config import EngineConfig
    from kdray.engines.ray_runtime import ray_session

    # with a dashboard, as `kdray tune` starts its Ray (study_ray): ray-engine trials keep Train's cleaner, which asks it
    with ray_session(EngineConfig(name="ray", session={"dashboard": True}), 2):
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray.get_runtime_context().gcs_address
