"""Every config under configs/ validates (every stage of a staged one), with the architectures and methods named."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdray.config import load_config, read_raw
from kdray.stages import is_staged, stage_configs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    raw = read_raw(path)
    text = path.read_text()
    assert text.lstrip().startswith("#"), (
        f"{path.name}: say in a header what it runs and where its values come from"
    )
    if is_staged(raw):
        stages = stage_configs(raw)
        assert len(stages) >= 2
    else:
        load_config(raw)
