"""``kdray compare``: train every row x seed of a :class:`~kdray.compare.study.Study`, each run in its own process,
at most ``jobs`` at once, and write the tables, the plot and one record per run.

Layout of the output folder::

    <out>/runs/<label>-s<seed>/   each run's folder, as ``kdray train --out`` makes it
    <out>/runs/mlflow.db          the runs' MLflow store (the default one: beside the run folders)
    <out>/logs/<label>-s<seed>.log each run's stdout and stderr
    <out>/records.jsonl           one JSON line per finished run (config, command, kdray version, machine, time)
    <out>/table.md, table.json    mean ± std per row; paired differences against the baseline row
    <out>/compare.png             the same, drawn
    <out>/compare.json            the MLflow parent run of the comparison

Resuming: the same command again reuses every finished run (its record, or its run folder's summary) and
continues every interrupted one from its last checkpoint (``kdray train --resume``); a run folder or record that
holds another config than the row's is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.compare.study import Row, Study
from kdray.compare.worker import SUMMARY
from kdray.errors import KdrayError

RECORDS = "records.jsonl"
STATE = "compare.json"
# Keys that say how a run is executed, not what it trains: a finished run is reused whatever they are.
EXECUTION_KEYS = ("name", "train.threads", "train.progress", "train.verbose", "data.root", "data.download",
                  "data.num_workers", "tracking")  # fmt: skip


class CompareStopped(KdrayError):
    """Ctrl-C: the running runs stopped at a safe point; the same command continues."""

    exit_code = 130


# -------------------------------------------------------------------------------------------------- the machine
def machine() -> dict[str, Any]:
    """What a record says of the machine: CPU model, cores, platform, torch and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:  # pragma: no cover
        torch_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch_version}  # fmt: skip


def default_jobs(runs: int, cores: int | None = None) -> int:
    """Half the cores (each run then has two torch threads), at least one, at most one per run."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(runs, cores // 2))


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch threads per run so that jobs x threads <= cores (at least one)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // jobs)


# ---------------------------------------------------------------------------------------------- the run's identity
def identity(raw: dict[str, Any]) -> Any:
    """What a run trains: its resolved config (every stage's, for a staged config) without :data:`EXECUTION_KEYS`.
    Two runs train the same thing iff these agree."""
    from kdray.config import validate
    from kdray.stages import is_staged, stage_configs

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        d = json.loads(json.dumps(d))
        for dotted in EXECUTION_KEYS:
            node, parts = d, dotted.split(".")
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(parts[-1], None)
        return d

    if is_staged(raw):
        return [strip({**cfg.to_dict(), "name": name}) for name, cfg in stage_configs(raw)]
    return strip(validate(raw).to_dict())


def first_difference(a: Any, b: Any, prefix: str = "") -> str:
    """The first dotted key where two resolved configs differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{prefix}{i}.")
    return f"{prefix.rstrip('.') or '<config>'}: {a!r} there, {b!r} now"


@dataclass
class Job:
    row: Row
    seed: int
    raw: dict[str, Any]
    folder: Path
    log: Path
    resume: bool = False
    parent_run_id: str | None = None  # the comparison's MLflow run, where this run's store is the same

    @property
    def key(self) -> tuple[str, int]:
        return (self.row.label, self.seed)

    @property
    def name(self) -> str:
        return f"{self.row.label} seed {self.seed}"


def load_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (a line cut short by a kill is skipped)."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _folder_config(folder: Path) -> dict[str, Any] | None:
    """The raw config a run folder was started with (a staged run's stages.yaml, else config.yaml)."""
    import yaml

    for name in ("stages.yaml", "config.yaml"):
        if (folder / name).is_file():
            return yaml.safe_load((folder / name).read_text())
    return None


def started(folder: Path) -> bool:
    """A run that wrote a checkpoint (or a staged run that began): it continues with ``kdray train --resume``."""
    return (folder / "checkpoints" / "last.pt").is_file() or (folder / "stages.yaml").is_file()


def record_of(
    job: Job, summary: dict[str, Any], status: str, wall_s: float | None, command: str
) -> dict[str, Any]:
    """One finished run's record (see :mod:`kdray.compare.table` for the keys the tables read)."""
    from kdray.version import __version__

    test = summary.get("test") or {}
    last = test.get("last") or {}
    trained = [p for p in summary["peers"] if not p.get("frozen")]
    record: dict[str, Any] = {
        "label": job.row.label,
        "seed": job.seed,
        "peers": {
            p["name"]: {
                "arch": p["arch"],
                "test_acc": p.get("test_acc"),
                "test_ece": p.get("test_ece"),
                "best_val_acc": p.get("best_val_acc"),
                "last_test_acc": (last.get("peers") or {}).get(p["name"]),
            }
            for p in trained
        },
        "ensemble_test_acc": summary.get("ensemble_test_acc"),
        "last_ensemble_test_acc": last.get("ensemble_acc"),
        "best_epoch": test.get("epoch"),
        "last_epoch": summary.get("epochs"),
        "selection": {
            "on": (summary.get("selection") or {}).get("split"),
            "score": (summary.get("best") or {}).get("metric"),
        },  # fmt: skip
        "val_curve": {
            p["name"]: [h.get(f"{p['name']}/val_acc") for h in summary.get("history", [])] for p in trained
        },  # fmt: skip
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "run_folder": str(job.folder),
        "status": status,
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "config": job.raw,
        "command": command,
        "kdray_version": __version__,
        "machine": machine(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    teachers = teachers_of(summary)
    if teachers:
        record["teachers"] = teachers
    staged = summary.get("staged") or {}
    if staged.get("generations"):
        record["generations"] = staged["generations"]
    return record


def teachers_of(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's frozen peers (KD teachers; a staged run's: its last stage's), with their test accuracy: the same
    weights at the selected and the last epoch, so the student can be read against its own teacher."""
    return {
        p["name"]: {"arch": p["arch"], "test_acc": p.get("test_acc")}
        for p in summary["peers"]
        if p.get("frozen")
    }


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------- planning
def plan(
    study: Study, out: Path, overrides: list[str] | None, command: str
) -> tuple[list[Job], list[dict[str, Any]]]:
    """Every row x seed's job, checked before anything runs; the runs already finished become records (appended to
    ``records.jsonl`` when only their folder had them). Returns (jobs to run, records of this study)."""
    path = out / RECORDS
    existing = {(r["label"], r["seed"]): r for r in load_records(path)}
    todo, records = [], []
    for row in study.rows:
        for seed in study.seeds:
            raw = study.config(row, seed, overrides)
            stem = f"{row.slug}-s{seed}"
            job = Job(row, seed, raw, out / "runs" / stem, out / "logs" / f"{stem}.log")
            want = identity(raw)
            known = existing.get(job.key)
            if known is not None:
                if identity(known["config"]) != want:
                    raise KdrayError(
                        f"{path} holds row '{row.label}' seed {seed} trained with another config "
                        f"({first_difference(identity(known['config']), want)}); choose another --out, or remove "
                        f"that line and {job.folder}"
                    )
                records.append(known)
                continue
            there = _folder_config(job.folder)
            if there is not None and identity(there) != want:
                raise KdrayError(
                    f"{job.folder} holds a run of another config ({first_difference(identity(there), want)}); "
                    "choose another --out, or remove that folder"
                )
            if (
                job.folder / SUMMARY
            ).is_file():  # finished, but its record was never written (a kill in between)
                summary = json.loads((job.folder / SUMMARY).read_text())
                record = record_of(job, summary, "reused", None, command)
                _append(path, record)
                records.append(record)
                continue
            job.resume = started(job.folder)
            todo.append(job)
    return todo, records


# ------------------------------------------------------------------------------------------------------ running
class Running:
    def __init__(self, job: Job, proc: subprocess.Popen, log, t0: float):
        self.job, self.proc, self.log, self.t0 = job, proc, log, t0


def _start(job: Job, threads: int, out: Path) -> Running:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    spec = out / "logs" / f"{job.folder.name}.job.json"
    spec.write_text(json.dumps({"config": job.raw, "out": str(job.folder), "resume": job.resume,
                                "parent_run_id": job.parent_run_id, "threads": threads}))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = job.log.open("a")
    log.write(
        f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {'resume' if job.resume else 'start'}\n"
    )
    log.flush()
    proc = subprocess.Popen([sys.executable, "-m", "kdray.compare.worker", str(spec)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    return Running(job, proc, log, time.monotonic())


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("kdray: error:")]
    return (errors or lines or [""])[-1].strip()[:300]


def _signal_all(running: list[Running], sig: int) -> None:
    for r in running:
        if r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it just ended
                r.proc.send_signal(sig)


@contextlib.contextmanager
def _stop_signals():
    """While the runs go on, Ctrl-C and SIGTERM raise KeyboardInterrupt in the command (main thread only), whatever
    it inherited: a shell's background job starts with SIGINT ignored, and Python then leaves it ignored, while
    each run installs its own handler; a Ctrl-C to the group would otherwise stop the runs and not the command,
    which then counted them as failed. SIGTERM (a scheduler's stop) is a Ctrl-C here: the runs are asked to stop
    at a safe point, where SIGTERM's default would end the command and leave them running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, _raise) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def execute(
    todo: list[Job],
    jobs: int,
    threads: int,
    out: Path,
    command: str,
    done_before: int,
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run ``todo``, at most ``jobs`` processes at once; returns (new records, failure lines). Ctrl-C or SIGTERM:
    every running run is asked to stop at its next safe point (SIGTERM; a second Ctrl-C stops them at once) and
    :class:`CompareStopped` is raised once they have."""
    from tqdm import tqdm

    total = done_before + len(todo)
    bar = tqdm(total=total, initial=done_before, desc="kdray compare", unit="run", disable=not show_progress,
               dynamic_ncols=True, file=sys.stderr)  # fmt: skip
    pending, running = list(todo), []
    records, failures = [], []
    with _stop_signals():
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    running.append(_start(pending.pop(0), threads, out))
                bar.set_postfix_str(", ".join(r.job.name for r in running)[:80])
                time.sleep(0.2)
                for r in [r for r in running if r.proc.poll() is not None]:
                    running.remove(r)
                    r.log.close()
                    rc, job = r.proc.returncode, r.job
                    if rc == 0 and (job.folder / SUMMARY).is_file():
                        summary = json.loads((job.folder / SUMMARY).read_text())
                        status = "resumed" if job.resume else "trained"
                        record = record_of(job, summary, status, time.monotonic() - r.t0, command)
                        _append(out / RECORDS, record)
                        records.append(record)
                        accs = ", ".join(f"{n} {p['test_acc']:.4f}" for n, p in record["peers"].items()
                                         if p["test_acc"] is not None)  # fmt: skip
                        bar.write(f"{job.name}: {status}, test {accs} ({record['wall_s']} s)")
                    else:
                        failures.append(f"{job.name}: exit {rc}: {_last_line(job.log)} (log: {job.log})")
                        bar.write(f"FAILED {failures[-1]}")
                    bar.update(1)
        except KeyboardInterrupt:
            bar.write(
                f"kdray compare: stopping {len(running)} run(s) at their next safe point (Ctrl-C again: at once)"
            )
            _signal_all(running, signal.SIGTERM)
            try:
                for r in running:
                    r.proc.wait()
            except KeyboardInterrupt:
                _signal_all(running, signal.SIGINT)
                for r in running:
                    try:
                        r.proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        r.proc.kill()
            for r in running:
                r.log.close()
            raise CompareStopped(
                "stopped; every run keeps its last checkpoint: run the same command again to continue"
            ) from None
        finally:
            bar.close()
    return records, failures


# ------------------------------------------------------------------------------------------------------- MLflow
def parent_tracker(study: Study, out: Path, overrides: list[str] | None):
    """The comparison's MLflow run, in the store of the baseline row's runs (None when that row does not track).
    A second invocation reopens the same run (its id is in ``compare.json``)."""
    from kdray.config import validate
    from kdray.stages import is_staged, stage_configs
    from kdray.tracking import Tracker

    row = next(r for r in study.rows if r.label == study.baseline)
    raw = study.config(row, study.seeds[0], overrides)
    cfg = stage_configs(raw)[0][1] if is_staged(raw) else validate(raw)
    if not cfg.tracking.enabled:
        return None
    tracker = Tracker(
        cfg.tracking, out / "runs" / "compare"
    )  # the default store: <out>/runs/mlflow.db, the runs'
    tracker.check()
    state = json.loads((out / STATE).read_text()) if (out / STATE).is_file() else {}
    tracker.start(f"compare {' vs '.join(study.labels())}"[:200], resume_run_id=state.get("mlflow_run_id"))
    (out / STATE).write_text(json.dumps({**state, "mlflow_run_id": tracker.run_id}, indent=1))
    tracker.log_params({"rows": ",".join(study.labels()), "seeds": ",".join(map(str, study.seeds)),
                        "baseline": study.baseline})  # fmt: skip
    tracker.set_tags({"kdray.compare": "1", "kdray.out": str(out)})
    return tracker


def nests_under(job: Job, tracker) -> bool:
    """A run's MLflow run can nest under the comparison's only in the same store."""
    from kdray.config import validate
    from kdray.stages import is_staged, stage_configs
    from kdray.tracking import Tracker

    if tracker is None:
        return False
    cfg = stage_configs(job.raw)[0][1] if is_staged(job.raw) else validate(job.raw)
    return cfg.tracking.enabled and Tracker(cfg.tracking, job.folder).uri == tracker.uri


# -------------------------------------------------------------------------------------------------------- output
def write_outputs(study: Study, records: list[dict[str, Any]], out: Path) -> str:
    """table.md, table.json and compare.png of the records; returns the markdown."""
    from kdray.compare.plots import plot_compare, plot_val_curves
    from kdray.compare.table import (
        COMPARE_COLUMNS,
        diff_table,
        generation_diff_lines,
        generation_lines,
        markdown_table,
        memorisation_lines,
        table_json,
        teacher_lines,
    )

    labels = study.labels()
    # the seeds the records hold (a row may have more than another: `--rows ... --seeds 3 4` added to some rows)
    present = sorted({r["seed"] for r in records if r.get("label") in labels and "seed" in r})
    seeds = ", ".join(map(str, present or study.seeds))
    lines = [
        f'Test accuracy (%), mean ± sample std (ddof 1) over seeds {seeds}; peers\' columns and "peer mean", '
        '"ensemble", "ECE": the selected checkpoint\'s (best.pt); "last epoch": last.pt\'s.',
        "",
        *markdown_table(records, labels, COMPARE_COLUMNS),
    ]
    diffs = diff_table(records, labels, study.baseline)
    if len(diffs) > 2:  # a row besides the baseline has records (a study's other rows may not have run yet)
        lines += [
            "",
            f"Paired differences against **{study.baseline}** (same seed), in points: mean ± standard error "
            "(sd of the differences, ddof 1, / sqrt(n)).",
            "",
            *diffs,
        ]
    for label in labels:  # born-again rows: each generation, and each against generation 1
        staged = [r for r in records if r.get("label") == label and r.get("generations")]
        if staged:
            lines += ["", f"Generations of **{label}** (generation 1 is plain training; test accuracy, %):"]
            lines += [*generation_lines(staged), *generation_diff_lines(staged)]
    for label in labels:  # rows that learn from frozen teachers: the student against its own teacher
        taught = [r for r in records if r.get("label") == label and r.get("teachers")]
        if taught:
            lines += [
                "",
                f"The frozen teachers of **{label}** (test accuracy, %; the student against its own teacher):",
            ]
            lines += teacher_lines(taught)
    curve = memorisation_lines(records, labels)
    if curve:
        lines += ["", "Validation curves (curves.png): where each row's validation accuracy peaks, and its fall by the "
                  "last epoch (a fall: the network fits its label noise).", *curve]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(table_json(records, labels, study.baseline), indent=1))
    plot_compare(records, labels, study.baseline, out / "compare.png")
    plot_val_curves(records, labels, out / "curves.png")
    return text


def run_compare(
    study: Study,
    out: str | Path,
    overrides: list[str] | None = None,
    jobs: int | None = None,
    threads: int | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train what is missing, then write the outputs. Returns ``{"records", "failures", "trained", "reused",
    "table"}`` (``table``: the markdown)."""
    out = Path(out)
    command = command or " ".join(["kdray", *sys.argv[1:]])
    out.mkdir(parents=True, exist_ok=True)
    todo, records = plan(study, out, overrides, command)
    jobs = jobs or default_jobs(max(1, len(todo)))
    threads = threads or threads_per_job(jobs)
    tracker = parent_tracker(study, out, overrides)
    status = "FAILED"
    try:
        for job in todo:
            job.parent_run_id = tracker.run_id if nests_under(job, tracker) else None
        new, failures = execute(todo, jobs, threads, out, command, len(records), show_progress)
        records = records + new
        text = write_outputs(study, records, out)
        if tracker is not None:
            from kdray.compare.table import peer_mean, stat

            metrics = {}
            for row in study.rows:
                s = stat([peer_mean(r) for r in records if r["label"] == row.label])
                if s is not None:
                    metrics[f"{row.slug}/peer_mean_test_acc"] = s["mean"]
                    metrics[f"{row.slug}/peer_mean_test_acc_std"] = s["std"]
            tracker.log_metrics(metrics, step=0)
            for name in ("table.md", "table.json", "compare.png", RECORDS):
                tracker.log_artifact(out / name)
        status = "FINISHED" if not failures else "FAILED"
    except CompareStopped:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end(status)
    trained = [r for r in new if r["status"] in ("trained", "resumed")]
    return {"records": records, "failures": failures, "trained": trained, "reused": len(records) - len(trained),
            "table": text}  # fmt: skip
