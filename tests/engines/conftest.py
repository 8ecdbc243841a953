"""A private local Ray for the engine tests: one per session, on loopback, in its own short temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """Ray started the way RayEngine starts it (``ray_session``), but in a temp dir of the test session's own.

    RayEngine finds Ray initialised and uses it as it is (it stops nothing it did not start)."""
    from kdray.config import EngineConfig
    from kdray.engines.ray_runtime import ray_session

    temp_dir = Path(tempfile.mkdtemp(prefix="kdt-", dir="/tmp"))  # short: Ray's socket paths live under it
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(temp_dir)
    try:
        # a dashboard, as `kdray tune` starts it: runs in an existing Ray keep Train's placement-group cleaner
        session = {"object_store_mb": 200, "dashboard": True}
        with ray_session(EngineConfig(name="ray", session=session), num_peers=3):
            yield temp_dir
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(temp_dir, ignore_errors=True)
