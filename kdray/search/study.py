"""``kdray tune``: a study of populations, searched with Ray Tune.

Search: OptunaSearch (TPE, seeded, first trial = the config's own values) or random search, with ASHA (default) or
FIFO; or Population Based Training, which starts from random samples and perturbs the loss weights and temperature
while the populations train, a worse trial continuing from a better trial's checkpoint. Each trial is one population
(see :mod:`kdray.search.trial`). Everything about the study lands in ``runs/<study>/``::

    study.json      settings, the space, per-trial values / metrics / status, the best trial, compute used
    best.yaml       the best trial's config, ready for ``kdray train``
    best.pt         the best trial's final population checkpoint
    trials.csv      the trials table
    plots/          optimisation history, parameter importances, PBT schedules (PNG)
    trials/<id>/    each trial's kdray run folder (config.yaml, checkpoints/, summary.json)
    tune/           Ray Tune's experiment state (what ``--resume`` restores)

and in MLflow: a parent run with one nested run per trial.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdray.checkpoint import copy_checkpoint
from kdray.config import ExperimentConfig, apply_overrides, load_config, read_raw
from kdray.errors import KdrayError, PlacementError
from kdray.search.space import SearchSpace, load_space, parse_space, same_values
from kdray.search.trial import (
    HISTORY_FILE,
    OBJECTIVES,
    PROGRESS_FILE,
    TrialPlan,
    _read_json,
    _write_json,
    board_name,
    read_history,
    run_trial,
)

SCHEDULERS = ("asha", "fifo", "pbt")
SEARCHES = ("tpe", "random")
TUNE_DIR = "tune"
STUDY_FILE = "study.json"


class StudyError(KdrayError):
    """A study cannot start or resume as asked."""


@dataclass
class StudySettings:
    samples: int = 16
    scheduler: str = "asha"
    search: str = "tpe"  # ignored by PBT, which starts from random samples (Tune allows no searcher with PBT)
    metric: str = "mean_peer"
    max_concurrent: int | None = None
    seed: int = 0
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/rf at each rung
    perturbation_interval: int = 1  # PBT: epochs between exploit/explore decisions
    quantile_fraction: float = 0.25  # PBT: the bottom fraction copies the top fraction
    resample_probability: float = 0.25  # PBT: chance a perturbed value is drawn afresh instead of scaled
    start_from_config: bool = True  # the first trial runs the config's own values
    # ASHA never stops the config's own values before the last epoch: the winner is compared with them at the end
    keep_baseline: bool = False
    extra_points: list[dict[str, Any]] = field(
        default_factory=list
    )  # more fixed first trials (tests, benchmarks)
    cpus_per_trial: float | None = None
    epoch_budget: int | None = (
        None  # stop the study after this many epochs trained in all (fixed compute budget)
    )
    multi_objective: bool = (
        False  # maximise the objective and minimise the trained peers' parameters (Pareto)
    )
    address: str | None = (
        None  # the Ray cluster the study runs on (default: engine.session.address, RAY_ADDRESS)
    )

    def check(self) -> None:
        def bad(key: str, value: Any, accepted: str) -> StudyError:
            return StudyError(f"{key} = {value!r}: {accepted}")

        if self.samples < 1:
            raise bad("--samples", self.samples, "need at least 1 trial")
        if self.scheduler not in SCHEDULERS:
            raise bad("--scheduler", self.scheduler, f"accepted: {list(SCHEDULERS)}")
        if self.search not in SEARCHES:
            raise bad("--search", self.search, f"accepted: {list(SEARCHES)}")
        if self.metric not in OBJECTIVES:
            raise bad("--metric", self.metric, f"accepted: {list(OBJECTIVES)}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise bad("--max-concurrent", self.max_concurrent, "need at least 1")
        if self.grace_period < 1 or self.perturbation_interval < 1:
            raise bad("grace_period/perturbation_interval", self.grace_period, "need at least 1 epoch")
        if self.reduction_factor <= 1:
            raise bad("reduction_factor", self.reduction_factor, "must be > 1")
        if not 0 < self.quantile_fraction <= 0.5:
            raise bad("quantile_fraction", self.quantile_fraction, "must be in (0, 0.5]")
        if self.epoch_budget is not None and self.epoch_budget < 1:
            raise bad("--epoch-budget", self.epoch_budget, "need at least 1 epoch")
        if self.cpus_per_trial is not None and self.cpus_per_trial <= 0:
            raise bad("--cpus-per-trial", self.cpus_per_trial, "must be > 0")
        if self.keep_baseline and self.scheduler != "asha":
            raise bad(
                "--keep-baseline",
                True,
                f"only with --scheduler asha (this study's is {self.scheduler!r}: FIFO stops no trial, and PBT "
                "changes the values of the trials it exploits)",
            )
        if self.keep_baseline and not self.start_from_config:
            raise bad(
                "--keep-baseline",
                True,
                "needs the config's own values as the first trial (start_from_config)",
            )
        if self.multi_objective and self.scheduler != "fifo":
            raise bad(
                "--scheduler",
                self.scheduler,
                "a multi-objective study (--multi-objective) needs --scheduler fifo: ASHA and PBT compare trials "
                "on one number",
            )


@dataclass
class StudyResult:
    study_dir: Path
    study: dict[str, Any]

    @property
    def best(self) -> dict[str, Any] | None:
        return self.study["best"]


# ------------------------------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class TrialResources:
    resources: dict[str, float]  # what Tune reserves for the trial process
    max_concurrent: int
    threads: int | None  # torch threads per trial (local engine)
    note: str
    worker_cpus: float | None = None  # Ray engine: CPUs per Train worker


DRIVER_CPUS = 0.01  # a Ray-engine trial only drives its Train run (0 is refused by Tune)
WORKER_CPU_SHARE = 0.99


def plan_resources(
    cfg: ExperimentConfig, cluster: dict[str, float], max_concurrent: int | None, cpus_per_trial: float | None
) -> TrialResources:
    """Per-trial resources and how many trials run at once, from the cluster and the population.

    Local engine: the population trains in the trial process, on ``cpus_per_trial`` CPUs (default: the cluster's
    CPUs shared by the concurrent trials, at least one) with as many torch threads. Ray engine: the trial is only the
    Train driver (a sliver of a CPU); its K workers need K x ``engine.placement.cpus_per_peer`` CPUs, and no more trials start
    than the cluster can host, or their worker groups would wait for each other forever.
    """
    cpus = float(cluster.get("CPU", 1))
    gpus = float(cluster.get("GPU", 0))
    if cfg.engine.name == "ray":
        # The trial (Train driver) holds a sliver of a CPU, so each worker gets 99 % of engine.placement.cpus_per_peer:
        # K workers at 1 CPU then fit beside their driver on K CPUs (RAY_NOTES.md, Tune with Train V2).
        worker_cpus = round(cfg.engine.placement.cpus_per_peer * WORKER_CPU_SHARE, 4)
        need = cfg.num_workers * worker_cpus + DRIVER_CPUS
        need_gpu = cfg.num_workers * cfg.engine.placement.gpus_per_peer
        fits = int((cpus + 1e-6) // need)
        if need_gpu:
            fits = min(fits, int((gpus + 1e-6) // need_gpu))
        if fits < 1:
            raise PlacementError(
                f"one population needs {need:g} CPU(s) and {need_gpu:g} GPU(s) ({cfg.num_workers} workers x "
                f"engine.placement.cpus_per_peer/gpus_per_peer); the cluster has {cpus:g} CPU(s), {gpus:g} GPU(s)"
            )
        concurrent = min(max_concurrent or fits, fits)
        note = f"{concurrent} trial(s) at once, each a Train driver with {cfg.num_workers} workers"
        if max_concurrent and max_concurrent > fits:
            note += f" (asked {max_concurrent}; the cluster hosts {fits})"
        return TrialResources({"cpu": DRIVER_CPUS}, concurrent, None, note, worker_cpus)
    if cpus_per_trial is None:
        cpus_per_trial = max(1.0, math.floor(cpus / (max_concurrent or cpus)))
    fits = max(1, int(cpus // cpus_per_trial))
    concurrent = min(max_concurrent or fits, fits)
    resources: dict[str, float] = {"cpu": cpus_per_trial}
    if gpus and cfg.train.device != "cpu":
        resources["gpu"] = min(1.0, gpus / concurrent)
    note = f"{concurrent} trial(s) at once, {cpus_per_trial:g} CPU(s) each"
    if max_concurrent and max_concurrent > fits:
        note += f" (asked {max_concurrent}; {cpus:g} CPU(s) host {fits})"
    return TrialResources(resources, concurrent, max(1, int(cpus_per_trial)), note)


# ---------------------------------------------------------------------------------------------------- Ray
@contextlib.contextmanager
def study_ray(cfg: ExperimentConfig, address: str | None = None):
    """Ray for the study: the RayEngine's session (an initialised Ray is used as it is; ``--address``,
    ``engine.session.address`` or ``RAY_ADDRESS`` is attached to; otherwise a private Ray on loopback, shut down at
    the end). A study of local-engine populations needs Ray too (each trial is a Tune actor): ``--address``."""
    from kdray.engines.ray_runtime import ray_session

    engine = cfg.engine
    # with a dashboard: each trial's Ray Train run keeps Train's placement-group cleaner (the study's job outlives
    # the trials), and the cleaner asks the dashboard whether a trial's controller is alive
    update: dict[str, Any] = {"dashboard": True}
    if address is not None:
        update["address"] = address
    engine = engine.model_copy(update={"session": engine.session.model_copy(update=update)})
    with ray_session(engine, cfg.num_workers) as how:
        yield how


# ------------------------------------------------------------------------------------------------- the study
def _clip_explore(space: SearchSpace):
    keys = list(space.perturb)

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        for k in keys:
            config[k] = space.params[k].clip(config[k])
        return config

    return explore


def _kill_quietly(actor) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor)


@contextlib.contextmanager
def tune_output(verbose: bool):
    """Tune's and Optuna's own terminal output only with ``train.verbose`` (``kdray tune --verbose``): Tune's new
    output engine prints its configuration box, the experiment path and a TensorBoard command line even at verbosity
    0 (the study's bars and kdray's lines say where everything is), and Optuna logs each study it creates."""
    import optuna

    saved_env, saved_level = os.environ.get("RAY_AIR_NEW_OUTPUT"), optuna.logging.get_verbosity()
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter, silent at verbosity 0
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env
        optuna.logging.set_verbosity(saved_level)


def _study_dir(cfg: ExperimentConfig, out: str | Path | None) -> Path:
    if out is None:
        out = Path("runs") / f"{cfg.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(out).resolve()


def _initial_points(
    space: SearchSpace, base: ExperimentConfig, settings: StudySettings
) -> list[dict[str, Any]]:
    points = []
    if settings.start_from_config:
        own = space.config_values(base)
        if own is not None:
            points.append(own)
    for extra in settings.extra_points:
        missing = sorted(set(space.keys) - set(extra))
        point = {**(space.config_values(base) or {}), **extra}
        if missing and any(k not in point for k in missing):
            raise StudyError(f"extra point {extra} lacks {missing}")
        points.append({k: point[k] for k in space.keys})
    return points[: settings.samples]


def _asha_or_fifo(settings: StudySettings, epochs: int, own: dict[str, Any] | None):
    """The scheduler of a searched (non-PBT) study; ``own``: the config's own values, which
    ``settings.keep_baseline`` lets train every epoch."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler != "asha":
        return FIFOScheduler()
    kwargs = dict(time_attr="epoch", max_t=epochs, grace_period=min(settings.grace_period, epochs),
                  reduction_factor=settings.reduction_factor)  # fmt: skip
    if settings.keep_baseline:
        from kdray.search.schedulers import BaselineASHA

        if own is None:  # run_study refuses this before Ray starts
            raise StudyError("--keep-baseline: the config's own values lie outside the space")
        return BaselineASHA(keep=[own], **kwargs)
    return ASHAScheduler(**kwargs)


def _build_tuner(plan: TrialPlan, space: SearchSpace, base: ExperimentConfig, settings: StudySettings,
                 res: TrialResources, study_dir: Path, verbose: bool):  # fmt: skip
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from kdray.search.progress import EpochBudget, StudyProgress

    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), res.resources)
    epochs = base.train.epochs
    points = _initial_points(space, base, settings)
    param_space: dict[str, Any] = {}
    if settings.scheduler == "pbt":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        random.seed(settings.seed)  # PBT draws its perturbations from Python's random module
        search_alg = BasicVariantGenerator(
            points_to_evaluate=points or None, max_concurrent=res.max_concurrent, random_state=settings.seed
        )
        param_space = {k: p.to_tune() for k, p in space.params.items()}
        scheduler = PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations={k: space.params[k].to_tune() for k in space.perturb},
            quantile_fraction=settings.quantile_fraction, resample_probability=settings.resample_probability,
            custom_explore_fn=_clip_explore(space), log_config=True,
        )  # fmt: skip
        keep = None  # every checkpoint stays: a donor's must outlive the exploits that copy it
    else:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = (
            # TPE models once n_startup_trials are done (Optuna's default 10): small studies would never get
            # there, so a third of the samples (3..10) start at random.
            optuna.samplers.TPESampler(
                seed=settings.seed, n_startup_trials=max(3, min(10, settings.samples // 3))
            )
            if settings.search == "tpe"
            else optuna.samplers.RandomSampler(seed=settings.seed)
        )
        metric, mode = (
            (["objective", "params"], ["max", "min"]) if settings.multi_objective else ("objective", "max")
        )
        search_alg = OptunaSearch(
            space={k: p.to_optuna() for k, p in space.params.items()},
            metric=metric, mode=mode, points_to_evaluate=points or None, sampler=sampler,
        )  # fmt: skip
        scheduler = _asha_or_fifo(settings, epochs, space.config_values(base))
        keep = 2
    tune_config = tune.TuneConfig(
        metric="objective", mode="max", search_alg=search_alg, scheduler=scheduler,
        num_samples=settings.samples, max_concurrent_trials=res.max_concurrent,
        # A reused actor skips the imports (seconds per trial); a Ray-engine trial's actor is not reused, so
        # the Train run of a stopped trial ends with its actor.
        reuse_actors=base.engine.name != "ray",
        trial_name_creator=lambda t: t.trial_id, trial_dirname_creator=lambda t: t.trial_id,
    )  # fmt: skip
    run_config = tune.RunConfig(
        name=TUNE_DIR, storage_path=str(study_dir),
        callbacks=[StudyProgress(str(study_dir), epochs, verbose, settings.epoch_budget or settings.samples * epochs,
                                 board=board_name(plan.study_name))],  # fmt: skip
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        failure_config=tune.FailureConfig(max_failures=0), verbose=0,
        stop=EpochBudget(settings.epoch_budget) if settings.epoch_budget else None,
    )  # fmt: skip
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _refuse_staged(raw: dict[str, Any], what: str) -> None:
    """A study searches one training run: a staged config (stages:, generations:) is refused with the way round."""
    from kdray.stages import is_staged

    if isinstance(raw, dict) and is_staged(raw):
        key = "stages" if "stages" in raw else "generations"
        raise StudyError(
            f"{what} has '{key}:', and kdray tune searches one training run, not a staged one. Tune one stage on "
            "its own: train the stages before it once (kdray train), then give that stage as a plain config whose "
            "frozen peers load their checkpoints (checkpoint: <run>/checkpoints/last.pt); docs/tune.md, 'Tuning "
            "one stage of a staged config'"
        )


def run_study(
    config: str | Path | dict[str, Any] | None = None,
    space: str | Path | dict[str, Any] | SearchSpace | None = None,
    *,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    settings: StudySettings | None = None,
    verbose: bool = True,
    library_output: bool = False,
) -> StudyResult:
    """Run (or resume) a study. Everything is checked (config, space, settings, tracking store, cluster) before
    any trial starts. ``verbose``: the study's bars and lines; ``library_output``: Ray Tune's and Optuna's own
    output too (``kdray tune --verbose``; also on with the config's ``train.verbose``)."""

    if resume is not None:
        study_dir = Path(resume).resolve()
        state = _read_json(study_dir / STUDY_FILE, None)
        if state is None:
            raise StudyError(f"--resume '{resume}': no {STUDY_FILE} there; is it a study folder?")
        raw = state["config"]
        space_obj = parse_space(state["space"], state.get("space_source", "<study>"))
        space_obj.source = state.get("space_source", space_obj.source)
        settings = StudySettings(**state["settings"])
    else:
        if config is None or space is None:
            raise StudyError("kdray tune: give a CONFIG and --space (or --resume STUDY_DIR)")
        settings = settings or StudySettings()
        if isinstance(config, dict):
            _refuse_staged(config, "the config")
            raw = apply_overrides(config, overrides)
        else:
            path = Path(config)
            if path.is_file():
                _refuse_staged(read_raw(path), f"'{config}'")
            load_config(path)  # a clear error for a missing or invalid file
            raw = apply_overrides(read_raw(path), overrides)
        space_obj = space if isinstance(space, SearchSpace) else load_space(space)
    settings.check()
    base = space_obj.check_against(raw)
    if settings.keep_baseline and space_obj.config_values(base) is None:
        raise StudyError(
            "--keep-baseline: the config's own values of the searched keys lie outside the space "
            f"'{space_obj.source}', so no trial runs them; widen the space or drop --keep-baseline"
        )
    if settings.scheduler == "pbt" and not space_obj.perturb:
        raise StudyError(
            f"--scheduler pbt: the space '{space_obj.source}' lists nothing under 'perturb' for PBT to change; "
            "name keys there (loss weights, temperature) or use --scheduler asha"
        )
    if resume is None:
        study_dir = _study_dir(base, out)
        if (study_dir / STUDY_FILE).exists():
            raise StudyError(
                f"--out '{study_dir}' already holds a study; continue it with --resume {study_dir}"
            )
        state = {}
    name = study_dir.name

    from kdray.search.mlflow_study import StudyTracking

    tracking = StudyTracking(base.tracking, study_dir)
    if tracking.enabled:
        tracking.tracker.check()  # before anything is written
    study_dir.mkdir(parents=True, exist_ok=True)

    with study_ray(base, settings.address):
        import ray

        res = plan_resources(base, ray.cluster_resources(), settings.max_concurrent, settings.cpus_per_trial)
        # a trial logs no MLflow models: the study logs the best trial's, once, in its own run (finish)
        forced: dict[str, Any] = {
            "train.progress": False, "train.eval_every": 1, "tracking.log_models": False, "tracking.register": None,
        }  # fmt: skip
        if res.threads and base.train.threads is None:
            forced["train.threads"] = res.threads
        if res.worker_cpus is not None:
            forced["engine.placement.cpus_per_peer"] = res.worker_cpus
        if tracking.enabled:
            forced["tracking.uri"] = tracking.uri
        parent = tracking.start(
            f"{name}", (state.get("mlflow") or {}).get("parent_run_id"), _study_params(settings, space_obj, res)
        ) if tracking.enabled else None  # fmt: skip
        plan = TrialPlan(
            name, str(study_dir), raw, tuple(space_obj.keys), settings.metric, forced, parent, os.getcwd()
        )
        state = {
            "name": name, "status": "running", "config": raw, "space": space_obj.to_dict(),
            "space_source": space_obj.source, "settings": asdict(settings), "resources": asdict(res),
            "mlflow": {"uri": tracking.uri, "experiment": base.tracking.experiment, "parent_run_id": parent},
            "started": state.get("started", time.time()),
        }  # fmt: skip
        _write_json(study_dir / STUDY_FILE, state)
        if verbose:
            print(
                f"study {name}: {settings.samples} trial(s), {settings.scheduler}"
                + ("" if settings.scheduler == "pbt" else f" + {settings.search}")
                + f", objective {settings.metric}"
                + (" and trained parameters (Pareto)" if settings.multi_objective else "")
                + f"; {res.note}; folder {study_dir}",
                flush=True,
            )
        from ray import tune

        from kdray.engines.ray_board import create_board

        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # keep the resumable state at most 1 s old
        tune_path = study_dir / TUNE_DIR
        status = "FAILED"
        cleanup = contextlib.ExitStack()
        try:
            cleanup.enter_context(tune_output(base.train.verbose or library_output))
            # the trials' live steps (the driver's per-trial bars)
            board = create_board(name=board_name(name))
            # a named actor would outlive the study on a kept cluster
            cleanup.callback(_kill_quietly, board)
            if tune.Tuner.can_restore(str(tune_path)):
                trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), res.resources)
                tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True)
            else:
                tuner = _build_tuner(plan, space_obj, base, settings, res, study_dir, verbose)
            fit_start = time.time()
            grid = tuner.fit()
            state["timing"] = {"fit_s": round(time.time() - fit_start, 2)}
            study = summarise_study(state, grid, base, space_obj, study_dir)
            unfinished = _unfinished_trials(grid, None if settings.epoch_budget else settings.samples)
            if unfinished:
                study.update(status="interrupted", unfinished_trials=unfinished, best=None)
                _write_json(study_dir / STUDY_FILE, study)
                status = "KILLED"  # the parent run ends KILLED below; --resume reopens it
                return StudyResult(study_dir, study)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            cleanup.close()
            if status != "FINISHED" and tracking.run_id:
                tracking.tracker.end(status)
    artifacts = write_outputs(study, base, study_dir)
    tracking.finish(study, artifacts, "FINISHED")
    if tracking.enabled:
        study["mlflow"]["children"] = len(tracking.child_runs())
        _write_json(study_dir / STUDY_FILE, study)
    return StudyResult(study_dir, study)


def _unfinished_trials(grid, samples: int | None) -> int:
    """Trials the study did not end (Ctrl-C, SIGINT, or SIGUSR1: Tune saves its state one last time and returns
    early). Read from that saved state (``ExperimentAnalysis``), where such trials are pending, running or paused
    (the returned grid's own statuses call the stopped trials terminated), plus, where the study runs ``samples``
    trials (no epoch budget that may end it sooner), those the searcher had not suggested yet."""
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(grid.experiment_path).trials
    unended = sum(t.status not in ("TERMINATED", "ERROR") for t in saved)
    return unended + max(0, (samples or 0) - len(saved))


def _study_params(settings: StudySettings, space: SearchSpace, res: TrialResources) -> dict[str, Any]:
    params = {f"study.{k}": v for k, v in asdict(settings).items() if k != "extra_points"}
    params["study.max_concurrent_trials"] = res.max_concurrent
    params["study.trial_resources"] = res.resources
    params.update({f"space.{k}": p.describe() for k, p in space.params.items()})
    params["space.perturb"] = space.perturb
    return params


# ------------------------------------------------------------------------------------------------ results
def _trial_rows(trial_dir: Path) -> list[dict[str, Any]]:
    """Epochs the trial trained, in order (replayed reports after a pause carry no new epoch)."""
    rows = [r for r in read_history(trial_dir / HISTORY_FILE) if not r.get("replay")]
    return [{k: v for k, v in r.items() if k not in ("replay", "time", "metrics")} for r in rows]


def _start_to_first_step(driver_start: float | None, own: dict[str, Any]) -> float | None:
    """Seconds from Tune starting the trial (driver clock) to its first training step: actor start or reuse,
    imports, config, data, models, MLflow run."""
    first = own.get("first_step_after_entry_s")
    incarnations = own.get("incarnations") or []
    if driver_start is None or first is None or not incarnations:
        return None
    return round(incarnations[0]["entered"] - driver_start + first, 3)


def summarise_study(
    state: dict[str, Any], grid, base: ExperimentConfig, space: SearchSpace, study_dir: Path
) -> dict[str, Any]:
    """study.json: every trial's values, per-epoch objective, status, and the best finished trial."""
    from kdray.search.mlflow_study import find_trial_run

    epochs = base.train.epochs
    trials = []
    driver_starts = {k: v.get("started") for k, v in _read_json(study_dir / PROGRESS_FILE, {}).items()}
    for result in grid:
        trial_id = Path(result.path).name
        metrics = result.metrics or {}
        trial_dir = study_dir / "trials" / trial_id
        rows = _trial_rows(trial_dir)
        own = _read_json(trial_dir / "status.json", {})
        last_epoch = int(metrics.get("epoch") or 0)
        if result.error is not None:
            status = "diverged" if own.get("status") == "diverged" else "failed"
        else:
            status = "finished" if last_epoch >= epochs else "stopped"
        error = None
        if result.error is not None:
            error = own.get("error") or str(result.error).strip().splitlines()[-1][:500]
        objective = metrics.get("objective")
        if objective is not None and not math.isfinite(objective):
            objective = None
        values = dict(result.config or {})
        trials.append(
            {
                "trial_id": trial_id,
                "status": status,
                "values": {k: values.get(k) for k in space.keys},
                "objective": objective,
                "params": int(metrics["params"]) if metrics.get("params") is not None else None,
                "best_objective": max((r["objective"] for r in rows if r.get("objective") is not None), default=None),
                "epoch": last_epoch,
                "epochs_trained": len(rows),
                "history": rows,
                "exploits": _read_json(trial_dir / "exploits.json", []),
                "error": error,
                "first_step_after_entry_s": own.get("first_step_after_entry_s"),
                "start_to_first_step_s": _start_to_first_step(driver_starts.get(trial_id), own),
                "incarnations": len(own.get("incarnations", [])),
                "started": (own.get("incarnations") or [{}])[0].get("entered"),
                "pid": (own.get("incarnations") or [{}])[0].get("pid"),  # the trial process (reused actors share it)
                "mlflow_run_id": find_trial_run(state["mlflow"]["uri"], state["mlflow"]["parent_run_id"], trial_dir),
                "dir": str(trial_dir),
            }
        )  # fmt: skip
    trials.sort(key=lambda t: (t["started"] or math.inf, t["trial_id"]))
    finished = [t for t in trials if t["status"] == "finished" and t["objective"] is not None]
    pool = finished or [t for t in trials if t["objective"] is not None]
    best = max(pool, key=lambda t: t["objective"]) if pool else None
    trained = sum(t["epochs_trained"] for t in trials)
    budget = len(trials) * epochs  # what these trials would have cost had every one run all its epochs
    front = pareto_front(
        [(t["trial_id"], t["objective"], t["params"]) for t in finished if t["params"] is not None]
    )
    for t in trials:
        t["pareto"] = t["trial_id"] in front
    # the config's own values (the first trial unless start_from_config is off): what the winner must beat
    own = space.config_values(base) if state["settings"].get("start_from_config", True) else None
    for t in trials:
        t["baseline"] = own is not None and same_values(t["values"], own)
    baseline = next((t for t in trials if t["baseline"]), None)
    return {
        **state,
        "status": "finished",
        "finished": time.time(),
        "metric": state["settings"]["metric"],
        "best": None if best is None else {
            "trial_id": best["trial_id"], "objective": best["objective"], "epoch": best["epoch"],
            "values": best["values"], "status": best["status"], "config": str(study_dir / "best.yaml"),
            "checkpoint": str(study_dir / "best.pt"),
        },
        "baseline": None if baseline is None else {
            k: baseline[k] for k in ("trial_id", "objective", "epoch", "status", "values")
        },
        "trials": trials,
        # finished trials no other finished trial beats on both accuracy and size, smallest first
        "pareto": sorted(
            ({"trial_id": t["trial_id"], "objective": t["objective"], "params": t["params"], "values": t["values"]}
             for t in trials if t["pareto"]),
            key=lambda t: t["params"],
        ),
        "compute": {
            "epochs_trained": trained, "epochs_budget": budget,
            "saved_share": round(1 - trained / budget, 4) if budget else 0.0,
        },
    }  # fmt: skip


def pareto_front(points: list[tuple[str, float, float]], tol: float = 1e-9) -> set[str]:
    """Ids of the points ``(id, objective, size)`` that no other point dominates (an objective at least as high and
    a size at least as small, one of them strictly). Objectives within ``tol`` are equal: accuracies that differ
    only by float rounding (a mean of the same counts summed in another order) do not make a bigger model win."""
    front = set()
    for pid, acc, size in points:
        dominated = any(
            a >= acc - tol and z <= size and (a > acc + tol or z < size)
            for other, a, z in points
            if other != pid
        )
        if not dominated:
            front.add(pid)
    return front


def write_outputs(
    study: dict[str, Any], base: ExperimentConfig, study_dir: Path
) -> list[tuple[Path, str | None]]:
    """study.json, best.yaml, best.pt, trials.csv, plots; returns the artifacts for the parent run."""
    from kdray.search.plots import plot_study

    artifacts: list[tuple[Path, str | None]] = []
    best = study["best"]
    if best is not None:
        trial_dir = study_dir / "trials" / best["trial_id"]
        best_cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
        best_cfg["name"] = f"{study['name']}-best"
        # Undo the study's own settings (tracking store, progress, evaluation, worker sliver); keep the thread
        # count, which the numbers depend on.
        mine = base.to_dict()
        best_cfg["tracking"] = copy.deepcopy(mine["tracking"])
        for section, key in (("train", "progress"), ("train", "eval_every")):
            best_cfg[section][key] = mine[section][key]
        best_cfg["engine"]["placement"]["cpus_per_peer"] = mine["engine"]["placement"]["cpus_per_peer"]
        header = (
            f"# Best trial {best['trial_id']} of study {study['name']} (kdray tune): {study['metric']} = "
            f"{best['objective']:.4f} after {best['epoch']} epoch(s).\n# Reproduce it: kdray train {study_dir / 'best.yaml'}\n"
        )
        if study["settings"]["scheduler"] == "pbt":
            header += (
                "# PBT changed the searched values during training (study.json holds the schedule); this file has\n"
                "# the final values, which `kdray train` uses from the first epoch.\n"
            )
        (study_dir / "best.yaml").write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
        copy_checkpoint(trial_dir / "checkpoints" / "last.pt", study_dir / "best.pt")
        artifacts += [(study_dir / "best.yaml", None), (study_dir / "best.pt", "checkpoints")]
    keys = list(study["space"]["params"])
    with (study_dir / "trials.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial_id", "status", "objective", "best_objective", "epoch", "epochs_trained", "params",
                         "pareto", *keys, "mlflow_run_id", "error"])  # fmt: skip
        for t in study["trials"]:
            writer.writerow([t["trial_id"], t["status"], t["objective"], t["best_objective"], t["epoch"],
                             t["epochs_trained"], t.get("params"), t.get("pareto", False),
                             *[t["values"].get(k) for k in keys], t["mlflow_run_id"], t["error"] or ""])  # fmt: skip
    _write_json(study_dir / STUDY_FILE, study)
    artifacts += [(study_dir / "trials.csv", None), (study_dir / STUDY_FILE, None)]
    artifacts += [(p, "plots") for p in plot_study(study, study_dir / "plots")]
    return artifacts
