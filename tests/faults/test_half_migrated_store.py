"""A SQLite MLflow store left half-migrated (a process killed while MLflow created or upgraded it) is detected when
kdray opens it and explained in one line: what is wrong and how to recover; nothing in the file changes.

The stores are real: one created by MLflow to its newest schema and then damaged the ways a killed migration leaves
a store (no version row, a version behind, the newest version with a table or a column missing), and one whose
creating process is SIGKILLed in the middle of its migrations. ``docs/faults.md`` has the figures.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from kdray.cli import main
from kdray.errors import TrackingError
from kdray.tracking import check_store_schema, store_schema_problem

from .conftest import env, tiny, write_yaml

CATEGORIES: dict[str, Counter] = {}
REPORT_LABEL = "store"

CREATE = "from mlflow.tracking import MlflowClient; MlflowClient(tracking_uri='sqlite:///{db}').search_experiments()"


def _create(db: Path) -> subprocess.Popen:
    """A process that creates (and migrates) a new store at ``db``, as the first run on a store does."""
    return subprocess.Popen(
        [sys.executable, "-c", CREATE.format(db=db)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _tables_and_version(db: Path) -> tuple[int, str | None]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = None
        if "alembic_version" in tables:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
            version = row[0] if row else None
        return len(tables), version
    finally:
        con.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A sound store at MLflow's newest schema, and one whose creating process was SIGKILLed once its migrations
    had begun (both made at once: two processes, ~10 s each)."""
    root = tmp_path_factory.mktemp("stores")
    sound, killed = root / "sound" / "mlflow.db", root / "killed" / "mlflow.db"
    sound.parent.mkdir()
    killed.parent.mkdir()
    makers = {"sound": _create(sound), "killed": _create(killed)}
    try:
        seen = []
        deadline = time.monotonic() + 240
        while makers["killed"].poll() is None and time.monotonic() < deadline:
            try:
                tables, version = _tables_and_version(killed) if killed.exists() else (0, None)
            except sqlite3.Error:  # busy while a migration writes: look again
                tables, version = 0, None
            if version is not None and 10 <= tables < 50:  # migrations begun, well before the last one
                os.kill(makers["killed"].pid, signal.SIGKILL)
                seen.append((tables, version))
                break
            time.sleep(0.02)
        makers["killed"].wait(timeout=60)
        assert makers["sound"].wait(timeout=240) == 0
    finally:
        for proc in makers.values():
            proc.kill()
    assert seen and makers["killed"].returncode == -signal.SIGKILL, (
        "the migration ended before it could be killed"
    )
    return {"sound": sound, "killed": killed}


def _uri(db: Path) -> str:
    return f"sqlite:///{db}"


def _digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


def _damaged(sound: Path, folder: Path, sql: str) -> Path:
    folder.mkdir()
    db = folder / "mlflow.db"
    shutil.copy(sound, db)
    con = sqlite3.connect(db)
    con.executescript(sql)
    con.commit()
    con.close()
    return db


def test_sound_stores_pass(stores):
    assert store_schema_problem(_uri(stores["sound"])) is None
    assert (
        store_schema_problem(_uri(stores["sound"].parent / "new.db")) is None
    )  # not made yet: MLflow creates it
    assert store_schema_problem("http://127.0.0.1:5000") is None  # a server's schema is the server's business


def test_damaged_stores_are_explained(stores, tmp_path, capsys):
    """Each damage a killed migration leaves, in a copy of the sound store: one TrackingError naming what is wrong
    and `mlflow db upgrade`, the file unchanged; through ``kdray train`` (the store beside the run folder): exit
    code 2, one line, no run folder."""
    sound = stores["sound"]
    head = sqlite3.connect(sound).execute("SELECT version_num FROM alembic_version").fetchone()[0]
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    older = ScriptDirectory.from_config(_get_alembic_config(_uri(sound))).get_revision(head).down_revision
    cases = {
        "no version row": ("DELETE FROM alembic_version;", "no schema version"),
        "no version table": ("DROP TABLE alembic_version;", "no schema version"),
        "a version behind": (f"UPDATE alembic_version SET version_num = '{older}';", f"at revision {older}"),
        "an unknown version": (
            "UPDATE alembic_version SET version_num = 'ffffffffffff';",
            "not one this MLflow",
        ),
        "the newest version, a table missing": ("DROP TABLE spans;", "table 'spans' is missing"),
        "the newest version, a column missing": (
            "ALTER TABLE runs DROP COLUMN source_name;",
            "column 'runs.source_name' is missing",
        ),
    }
    tally = CATEGORIES.setdefault("half-migrated SQLite store (a copy of a sound one, damaged)", Counter())
    for i, (label, (sql, words)) in enumerate(cases.items()):
        db = _damaged(sound, tmp_path / f"case{i}", sql)
        before = _digest(db)
        with pytest.raises(TrackingError) as exc:
            check_store_schema(_uri(db))
        msg = str(exc.value)
        assert words in msg and f"mlflow db upgrade {_uri(db)}" in msg and "Nothing was changed" in msg, msg
        config = write_yaml(db.parent / "tiny.yaml", {**tiny(), "tracking": {"enabled": True}})
        capsys.readouterr()
        code = main(["train", str(config), "--out", str(db.parent / "run")])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        ok = code == 2 and len(lines) == 1 and lines[0].startswith("kdray: error:") and words in err
        tally.update({"tried": 1, "survived" if ok else "lost": 1})
        assert ok, (label, code, err)
        assert _digest(db) == before, f"{label}: the store changed"
        assert not (db.parent / "run").exists()
        assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db", "mlflow.db.lock", "tiny.yaml"]


def test_a_store_whose_creation_was_killed(stores, tmp_path, capsys):
    """The real thing: the process creating the store SIGKILLed mid-migration. kdray explains it in one line,
    with the way out (``mlflow db upgrade``, or moving the file aside), and leaves the file as it was."""
    killed = stores["killed"]
    problem = store_schema_problem(_uri(killed))
    assert problem is not None and ("no schema version" in problem or "behind this MLflow" in problem), (
        problem
    )
    before = _digest(killed)
    config = write_yaml(
        tmp_path / "tiny.yaml", {**tiny(), "tracking": {"enabled": True, "uri": _uri(killed)}}
    )
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err and "mlflow db upgrade" in err and "aside" in err, err
    assert _digest(killed) == before
    CATEGORIES.setdefault(
        "SQLite store whose creating process was SIGKILLed mid-migration", Counter()
    ).update({"tried": 1, "survived": 1})
