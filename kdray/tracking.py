"""MLflow tracking: one run per population, an embedded SQLite store by default (no server).

Default store: ``sqlite:///<output root>/mlflow.db`` with artifacts in ``<output root>/mlartifacts``, where the output
root is the parent of the run folder (``runs/`` for ``--out runs/quick``), so every run of a project lands in one
store: ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``.

Runs that share a SQLite store never interfere (``docs/faults.md``):

- MLflow creates and migrates a new store's tables in the first process that opens it, without a lock of its own
  (MLflow 3.17: ``SqlAlchemyStore.__init__``), so two processes started at once could both migrate and one die
  ("Online migration expected to match one row"). The first client of a store and the creation of an experiment
  therefore happen under an exclusive lock on ``<db>.lock`` (``fcntl.flock``), one process at a time.
- Every call that touches the store is retried with a growing back-off while SQLite says it is busy ("database is
  locked"): MLflow's sessions wait 20 s for a lock (``PRAGMA busy_timeout``), its engine's inspection only 5 s.
  A store still busy after :data:`RETRY_FOR_S` is one :class:`~kdray.errors.TrackingError`.

A tracking server (``tracking.uri: http://...``) that goes away mid-run stops nothing: what the run logs while it
cannot be reached (metrics, params, tags, artifacts, the run's end) is appended to ``<run folder>/tracking_backlog.jsonl``
and kept in memory, one warning line says so, and the backlog is written to the server, in order, as soon as it
answers again (tried at most every :data:`RECONNECT_EVERY_S` seconds, and at the run's end). A backlog left when the
run ends (the server never came back) is written by ``kdray tracking replay RUN_FOLDER`` or by ``kdray train
--resume``; ``docs/faults.md`` has the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kdray.config import TrackingConfig
from kdray.errors import TrackingError

# Fail fast on an unreachable server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

RETRY_FOR_S = 120.0  # how long a busy SQLite store is retried before the run gives up on it
RECONNECT_EVERY_S = 5.0  # a server that went away is tried again at most this often (calls between are kept)
# in the run folder: what a server that went away has not received yet
BACKLOG_FILE = "tracking_backlog.jsonl"
T = TypeVar("T")


def default_uri(out_dir: Path) -> str:
    return f"sqlite:///{out_dir.resolve().parent / 'mlflow.db'}"


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store, or an in-memory database)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(uri: str | None) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` beside a SQLite store, held by one process at a time (nothing for other
    stores; nothing either where the lock file cannot be made: MLflow's own error then says why)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock
        yield
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_busy(exc: BaseException) -> bool:
    """SQLite says another process holds the database: worth waiting for (any other error is raised at once)."""
    text = str(exc).lower()
    return any(s in text for s in ("database is locked", "database table is locked", "database is busy"))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def retry_busy(uri: str | None, what: str, fn: Callable[[], T], run_open: bool = False) -> T:
    """``fn()``, again after a growing pause while the SQLite store ``uri`` is busy (other runs writing to it); any
    other error, and any error of another kind of store, is raised at once. Still busy after :data:`RETRY_FOR_S`:
    one :class:`TrackingError`. Safe for writes: SQLite rolls back the transaction it refused."""
    deadline = time.monotonic() + RETRY_FOR_S
    pause = 0.05
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified: busy SQLite is retried, the rest is raised
            if sqlite_path(uri) is None or not is_busy(exc):
                raise
            if time.monotonic() + pause > deadline:
                after = (
                    "the run's checkpoints are intact: continue it with kdray train --resume"
                    if run_open
                    else "try again once the other runs on this store are done"
                )
                raise TrackingError(
                    f"tracking store '{uri}' stayed busy for {RETRY_FOR_S:.0f} s while {what} "
                    f"({first_line(exc)}); {after}"
                ) from None
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 2.0)


def is_server(uri: str | None) -> bool:
    return bool(uri) and uri.split("://", 1)[0].lower() in ("http", "https")


def is_outage(uri: str | None, exc: BaseException) -> bool:
    """A tracking server that cannot be reached right now (refused or timed-out connection, a gateway's or a
    restarting server's 502/503/504): worth keeping the call for later. Anything else (a bad request, an unknown
    run) is a real error, and any error of a store that is not a server is raised as before."""
    if not is_server(uri):
        return False
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - MLflow needs requests
        pass
    text = str(exc)
    return "failed with exception" in text or bool(re.search(r"failed with error code 50[234]\b", text))


def outage_reason(exc: BaseException) -> str:
    """What an unreachable server's error says, short ("[Errno 111] Connection refused", "error code 503")."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text) or re.search(
        r"error code 50\d|[Rr]ead timed out", text
    )
    return found.group(0).strip() if found else first_line(exc)


def _expected_schema(uri: str) -> tuple[str, set[str], dict[str, set[str]]] | None:
    """MLflow's newest schema revision, every revision it knows, and its tables' columns (None if this MLflow
    cannot say: the check is then skipped, never a reason to refuse a store)."""
    try:
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config
        from mlflow.store.tracking.dbmodels import models

        script = ScriptDirectory.from_config(_get_alembic_config(uri))
        known = {rev.revision for rev in script.walk_revisions()}
        tables = {name: {c.name for c in t.columns} for name, t in models.Base.metadata.tables.items()}
        return script.get_current_head(), known, tables
    except Exception:  # noqa: BLE001 - an MLflow laid out otherwise: MLflow's own checks still run
        return None


def store_schema_problem(uri: str | None) -> str | None:
    """What is wrong with an existing SQLite store's schema, read without writing (None: sound, new, or not
    SQLite). A process killed while MLflow created or migrated the store leaves it half-migrated: tables without
    a schema version, a version behind MLflow's, or MLflow's newest version with a table or column missing; MLflow
    cannot resume the migration, and later calls would fail at random points of a run."""
    import sqlite3

    db = sqlite_path(uri)
    if db is None or not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = (
                [r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
                if "alembic_version" in tables
                else None
            )
            expected = _expected_schema(uri) if tables else None
            columns = {
                name: {r[1] for r in con.execute(f'PRAGMA table_xinfo("{name}")')}
                for name in (expected[2] if expected else {})
                if name in tables
            }
        finally:
            con.close()
    except sqlite3.Error as exc:
        if is_busy(exc):  # another run is writing: retried by the caller like any busy call
            raise
        return f"it cannot be read as an SQLite database ({first_line(exc)})"
    if not tables or expected is None:
        return None  # a new store: MLflow creates its tables
    head, known, want = expected
    if not versions:
        return (
            f"it holds {len(tables)} MLflow table(s) but no schema version: its creation was interrupted "
            "(a process killed while MLflow created the store)"
        )
    if len(versions) > 1 or versions[0] not in known:
        return f"its schema version {versions} is not one this MLflow knows (its newest: {head}); a newer MLflow wrote it"
    if versions[0] != head:
        return (
            f"its schema is at revision {versions[0]}, behind this MLflow's {head} (a migration was interrupted, or "
            "an older MLflow made the store)"
        )
    missing = sorted(set(want) - tables)
    if missing:
        return (
            f"its schema version is the newest ({head}) but table '{missing[0]}' is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": a migration was interrupted after it recorded its version"
        )
    for name, cols in sorted(want.items()):
        gone = sorted(cols - columns[name])
        if gone:
            return (
                f"its schema version is the newest ({head}) but column '{name}.{gone[0]}' is missing: a migration "
                "was interrupted after it recorded its version"
            )
    return None


def check_store_schema(uri: str | None) -> None:
    """One :class:`TrackingError` for a half-migrated SQLite store: what is wrong and how to recover; nothing is
    changed or deleted."""
    problem = store_schema_problem(uri)
    if problem is None:
        return
    db = sqlite_path(uri)
    raise TrackingError(
        f"tracking store '{db}' is damaged: {problem}. Nothing was changed. To recover, back the file up, then "
        f"run `mlflow db upgrade {uri}`; if that fails, move '{db}' aside (e.g. to '{db.name}.broken'): the next "
        "run creates a new store there, and the run folders keep their checkpoints and summaries"
    )


class Tracker:
    """A thin wrapper over ``MlflowClient`` (explicit run ids, no global active-run state, safe in workers)."""

    def __init__(self, cfg: TrackingConfig, out_dir: Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.uri = cfg.uri or default_uri(self.out_dir)
        self.run_id: str | None = None
        self._client = None
        self._backlog: list[dict[str, Any]] = []  # calls kept while the server is away, oldest first
        self._written: list[dict[str, Any]] = []  # of the current outage's backlog, what was written already
        self._tried_at = 0.0  # when the server was last tried (monotonic)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry_busy(self.uri, what, fn, run_open=self.run_id is not None)

    def check(self) -> None:
        """Make sure the store answers, before any training starts. The first client of a SQLite store creates its
        tables: under the store's lock, so that runs started at once never migrate it twice."""
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        def connect():
            with store_lock(self.uri):  # under the lock: a store another process is creating is not half-made
                check_store_schema(self.uri)
                client = MlflowClient(tracking_uri=self.uri)
                client.search_experiments(max_results=1)
            return client

        try:
            self._client = self._retry("opening it", connect)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means: cannot track
            raise TrackingError(
                f"tracking.uri '{self.uri}' cannot be reached ({first_line(exc)}); start the server, fix the URI, "
                "or set tracking.uri: null for the embedded store"
            ) from None

    @property
    def client(self):
        if self._client is None:
            self.check()
        return self._client

    def _experiment_id(self) -> str:
        def get_or_create() -> str:
            with store_lock(self.uri):  # two runs creating the same experiment at once: one creates it
                exp = self.client.get_experiment_by_name(self.cfg.experiment)
                if exp is not None:
                    return exp.experiment_id
                artifacts = None
                db = sqlite_path(self.uri)
                if db is not None:
                    artifacts = (db.parent / "mlartifacts").resolve().as_uri()
                try:
                    return self.client.create_experiment(self.cfg.experiment, artifact_location=artifacts)
                except (
                    Exception
                ) as exc:  # a server store has no file lock: another client may have won the race
                    exp = self.client.get_experiment_by_name(self.cfg.experiment)
                    if exp is None:
                        raise exc from None
                    return exp.experiment_id

        return self._retry("creating the experiment", get_or_create)

    def start(
        self, run_name: str, resume_run_id: str | None = None, parent_run_id: str | None = None
    ) -> str | None:
        """Open the run (or reopen ``resume_run_id``: a resumed population continues its run, no duplicate)."""
        if not self.enabled:
            return None
        if resume_run_id:
            try:
                self._retry("reopening the run", lambda: self.client.get_run(resume_run_id))
                self._retry(
                    "reopening the run", lambda: self.client.update_run(resume_run_id, status="RUNNING")
                )
                self.run_id = resume_run_id
            except Exception:  # noqa: BLE001 - the old store is gone: start a fresh run, say so in its tags
                pass
            else:  # reopened: its backlog's errors are its own, never a reason to open another run
                self._resume_backlog()
                return self.run_id
        tags = {"mlflow.runName": run_name}
        if resume_run_id:  # the run to continue could not be reopened
            tags["kdray.continues_run"] = resume_run_id
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        experiment = self._experiment_id()
        run = self._retry(
            "creating the run", lambda: self.client.create_run(experiment, run_name=run_name, tags=tags)
        )
        self.run_id = run.info.run_id
        if resume_run_id:
            self._resume_backlog()
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.run_id:
            return
        items = [[k, str(v)[:6000]] for k, v in params.items()]
        for i in range(0, len(items), 100):  # a resumed run cannot re-log params: those it has are skipped
            self._send("logging params", {"op": "params", "params": items[i : i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id or not metrics:
            return
        now = int(time.time() * 1000)
        items = [[k.replace("@", "_"), float(v), now, step] for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self._send("logging metrics", {"op": "metrics", "metrics": items[i : i + 500]})

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if self.run_id and Path(path).exists():
            self._send("logging an artifact", {"op": "artifact", "path": str(path), "subdir": subdir})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id and tags:
            self._send("setting a tag", {"op": "tags", "tags": [[k, str(v)] for k, v in tags.items()]})

    # ------------------------------------------------------------------------------ a server that goes away
    @property
    def backlog_file(self) -> Path:
        return self.out_dir / BACKLOG_FILE

    def _apply(self, op: dict[str, Any]) -> None:
        """One logging call (``op``, as the backlog keeps it) made on the store."""
        from mlflow.entities import Metric, Param

        client, run_id, kind = self.client, op["run_id"], op["op"]
        if kind == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]])
        elif kind == "params":
            existing = client.get_run(run_id).data.params
            items = [Param(k, v) for k, v in op["params"] if k not in existing]
            if items:
                client.log_batch(run_id, params=items)
        elif kind == "tags":
            for k, v in op["tags"]:
                client.set_tag(run_id, k, v)
        elif kind == "artifact":
            if Path(op["path"]).exists():
                client.log_artifact(run_id, op["path"], op.get("subdir"))
        elif kind == "end":
            client.set_terminated(run_id, status=op["status"])
        else:  # pragma: no cover - written by this class only
            raise TrackingError(f"{self.backlog_file}: unknown call {kind!r}")

    def _send(self, what: str, op: dict[str, Any]) -> None:
        """``op`` made on the store now; kept in the backlog instead while a tracking server cannot be reached (and
        behind calls kept earlier, so the server receives them in order)."""
        op = {"run_id": self.run_id, "uri": self.uri, **op}
        if self._backlog and not self._reconnect():
            self._keep(op)
            return
        try:
            self._retry(what, lambda: self._apply(op))
        except Exception as exc:  # noqa: BLE001 - classified: a server away is waited for, the rest raised
            if not is_outage(self.uri, exc):
                raise
            self._tried_at = time.monotonic()
            if not self._warned:  # one line per outage, not one per call
                self._warned = True
                print(
                    f"kdray: warning: tracking server {self.uri} cannot be reached ({outage_reason(exc)}); training "
                    f"goes on, and what it logs is kept in {self.backlog_file} and written to the server once it is "
                    "back",
                    file=sys.stderr,
                    flush=True,
                )
            self._keep(op)

    def _keep(self, op: dict[str, Any]) -> None:
        self._backlog.append(op)
        # a disk that refuses: the memory copy is still written when the server answers
        with contextlib.suppress(OSError):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with self.backlog_file.open("a") as fh:
                fh.write(json.dumps(op) + "\n")

    def _save_backlog(self) -> None:
        with contextlib.suppress(OSError):
            if not self._backlog:
                self.backlog_file.unlink(missing_ok=True)
                return
            tmp = self.backlog_file.with_name(f"{BACKLOG_FILE}.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(op) + "\n" for op in self._backlog))
            tmp.replace(self.backlog_file)

    def _reconnect(self, force: bool = False) -> bool:
        """Write the backlog to the server, oldest call first, if it answers (tried at most every
        :data:`RECONNECT_EVERY_S` seconds unless ``force``). True when nothing is left to write."""
        if not self._backlog:
            return True
        if not force and time.monotonic() - self._tried_at < RECONNECT_EVERY_S:
            return False
        self._tried_at = time.monotonic()
        done = 0
        try:
            for op in self._backlog:
                self._retry("writing the backlog", lambda op=op: self._apply(op))
                done += 1
        except Exception as exc:  # noqa: BLE001 - still away: try again later; anything else is raised
            if not is_outage(self.uri, exc):
                raise
        finally:
            written, self._backlog = self._backlog[:done], self._backlog[done:]
            self._written += written
            if done:
                self._save_backlog()
        if self._backlog:
            return False
        values = sum(len(op.get("metrics", ())) for op in self._written)
        print(
            f"kdray: tracking server {self.uri} answers again: the {len(self._written)} call(s) kept meanwhile "
            f"({values} metric value(s)) are written",
            file=sys.stderr,
            flush=True,
        )
        self._written, self._warned = [], False  # a later outage is said again
        return True

    def _resume_backlog(self) -> None:
        """A resumed run's backlog (its server went away before the run ended), written before anything new; its
        run end is dropped (the resumed run ends itself)."""
        if not self.backlog_file.is_file():
            return
        self._backlog = [
            {**op, "run_id": self.run_id} for op in read_backlog(self.backlog_file) if op.get("op") != "end"
        ]
        self._save_backlog()
        self._reconnect(force=True)

    def close_abandoned_children(self, out_dir: str | Path) -> list[str]:
        """Mark KILLED the nested runs of this run that are still RUNNING for ``out_dir`` (tag ``kdray.out``).

        A stage killed before its first checkpoint leaves its MLflow run RUNNING; ``--resume`` starts that stage
        again in a new run, and this closes the old one (tagged ``kdray.superseded``) so none stays RUNNING.
        Returns the run ids it closed. Never raises: a store that refuses leaves the old run as it was, says so on
        stderr, and the stage runs again all the same."""
        if not self.run_id:
            return []
        where = f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'"
        closed: list[str] = []
        try:
            runs = self._retry(
                "finding abandoned stage runs",
                lambda: self.client.search_runs(
                    [self._experiment_id()], filter_string=where, max_results=1000
                ),
            )
            for run in runs:
                if run.data.tags.get("kdray.out") != str(out_dir):
                    continue
                rid = run.info.run_id
                self._retry(
                    "closing an abandoned run", lambda r=rid: self.client.set_tag(r, "kdray.superseded", "1")
                )
                self._retry(
                    "closing an abandoned run", lambda r=rid: self.client.set_terminated(r, status="KILLED")
                )
                closed.append(rid)
        except Exception as exc:  # noqa: BLE001 - a bookkeeping step: the run itself goes on
            print(
                f"kdray: warning: the abandoned MLflow runs of {out_dir} could not be closed ({first_line(exc)})",
                file=sys.stderr,
            )
        return closed

    def end(self, status: str = "FINISHED") -> None:
        """Close the run. Never raises: it runs in ``finally`` blocks, where an error of its own would hide the
        run's outcome (a stop, a full disk); a store that refuses is said on one line of stderr, and a server still
        away keeps the end in the backlog with the rest (one line says how to write it later)."""
        if not self.run_id:
            return
        try:
            self._reconnect(force=True)
            self._send("closing the run", {"op": "end", "status": status})
        except Exception as exc:  # noqa: BLE001
            print(
                f"kdray: warning: MLflow run {self.run_id} could not be marked {status} ({first_line(exc)})",
                file=sys.stderr,
            )
        if self._backlog:
            values = sum(len(op.get("metrics", ())) for op in self._backlog)
            print(
                f"kdray: warning: tracking server {self.uri} did not answer again before the run ended: "
                f"{len(self._backlog)} call(s) ({values} metric value(s)) are in {self.backlog_file}; once it "
                f"answers, `kdray tracking replay {self.out_dir}` writes them",
                file=sys.stderr,
            )


def read_backlog(path: Path) -> list[dict[str, Any]]:
    """The calls a run kept while its tracking server was away (a line cut short by a kill is skipped)."""
    ops = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(ValueError):
                op = json.loads(line)
                if isinstance(op, dict) and "op" in op and "run_id" in op:
                    ops.append(op)
    return ops


def replay_backlog(run_dir: str | Path) -> tuple[int, int]:
    """Write a run's ``tracking_backlog.jsonl`` to its tracking server: (calls, metric values) written. One
    :class:`TrackingError` when there is none, or when the server still cannot be reached (the file is kept)."""
    run_dir = Path(run_dir)
    ops = read_backlog(run_dir / BACKLOG_FILE)
    if not ops:
        raise TrackingError(
            f"'{run_dir}' holds no {BACKLOG_FILE} to replay (nothing was kept, or it was written)"
        )
    from kdray.config import TrackingConfig

    tracker = Tracker(TrackingConfig(uri=ops[0]["uri"]), run_dir)
    tracker.check()
    tracker.run_id, tracker._backlog = ops[-1]["run_id"], ops
    values = sum(len(op.get("metrics", ())) for op in ops)
    if not tracker._reconnect(force=True):
        raise TrackingError(
            f"tracking server {tracker.uri} still cannot be reached; {len(tracker._backlog)} call(s) are kept in "
            f"{tracker.backlog_file}"
        )
    return len(ops), values


def _cmd_tracking(args) -> int:
    calls, values = replay_backlog(args.run_dir)
    print(f"{args.run_dir}: {calls} call(s) ({values} metric value(s)) written to the tracking server")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tracking", help="write what a run kept while its tracking server was away (tracking_backlog.jsonl)"
    )
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("replay", help=f"write RUN_FOLDER/{BACKLOG_FILE} to the run's tracking server")
    r.add_argument("run_dir", metavar="RUN_FOLDER")
    r.set_defaults(func=_cmd_tracking)
