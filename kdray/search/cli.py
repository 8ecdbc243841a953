"""``kdray tune CONFIG --space tune_spaces/<method>.yaml``: search loss weights, temperature and learning rates."""

from __future__ import annotations

import argparse
import sys

from kdray.errors import KdrayError


def _cmd_tune(args: argparse.Namespace) -> int:
    from kdray.search.study import StudySettings, run_study

    if args.resume is None and (args.config is None or args.space is None):
        raise KdrayError("kdray tune: give a CONFIG and --space SPACE.yaml (or --resume STUDY_DIR)")
    if args.resume is not None and (args.config or args.space or args.set):
        raise KdrayError(
            "kdray tune --resume continues a study with the config, space and settings it started with "
            "(see its study.json); drop CONFIG, --space and --set"
        )
    settings = StudySettings(
        samples=args.samples, scheduler=args.scheduler, search=args.search, metric=args.metric,
        max_concurrent=args.max_concurrent, seed=args.seed, cpus_per_trial=args.cpus_per_trial,
        grace_period=args.grace_period, perturbation_interval=args.perturbation_interval,
        epoch_budget=args.epoch_budget, multi_objective=args.multi_objective, address=args.address,
        keep_baseline=args.keep_baseline,
    )  # fmt: skip
    result = run_study(
        args.config,
        args.space,
        overrides=args.set,
        out=args.out,
        resume=args.resume,
        settings=settings,
        library_output=args.verbose,
    )
    study, best = result.study, result.best
    counts = {}
    for t in study["trials"]:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    print(
        f"study {study['name']}: {len(study['trials'])} trial(s) ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"); {study['compute']['epochs_trained']}/{study['compute']['epochs_budget']} epochs trained"
    )
    if study.get("status") == "interrupted":
        print(
            f"kdray tune: interrupted with {study['unfinished_trials']} trial(s) unfinished; the study's state is "
            f"saved: continue it with kdray tune --resume {result.study_dir}",
            file=sys.stderr,
        )
        return 130
    if best is None:
        print("no trial produced a finite objective")
        return 1
    values = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["values"].items()
    )
    print(f"best {study['metric']} {best['objective']:.4f} (trial {best['trial_id']}): {values}")
    own = study.get("baseline")
    if own is not None and own["objective"] is not None:
        how = (
            "all its epochs" if own["status"] == "finished" else f"{own['status']} after epoch {own['epoch']}"
        )
        print(
            f"the config's own values: {study['metric']} {own['objective']:.4f} (trial {own['trial_id']}, {how})"
            + (
                "; --keep-baseline lets them train to the end"
                if own["status"] == "stopped" and not study["settings"].get("keep_baseline")
                else ""
            )
        )
    finished = [t for t in study["trials"] if t["status"] == "finished"]
    if (
        len(study["trials"]) > 1
        and len(finished) == 1
        and own is not None
        and finished[0].get("trial_id") == own["trial_id"]
    ):
        print(
            "note: only the config's own values trained to the end (the scheduler stopped every other trial early), "
            "and the best trial is chosen among finished ones, so the study could not pick other values: give "
            "more --samples, a later --grace-period, or --scheduler fifo"
        )
    if study["settings"].get("multi_objective"):
        print(f"Pareto front ({len(study['pareto'])} trial(s), smallest first; plots/pareto.png):")
        for t in study["pareto"]:
            print(
                f"  {t['trial_id']}: {study['metric']} {t['objective']:.4f} with {t['params']:,} parameters"
            )
    print(f"study folder: {result.study_dir}  (study.json, best.yaml, best.pt, trials.csv, plots/)")
    print(f"reproduce: kdray train {result.study_dir / 'best.yaml'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search loss weights / temperature / learning rates with Ray Tune",
        description=__doc__,
    )
    p.add_argument("config", nargs="?", help="experiment YAML (omit with --resume)")
    p.add_argument("--space", help="search space YAML, e.g. tune_spaces/dml.yaml")
    p.add_argument("--samples", type=int, default=16, help="number of trials (default 16)")
    p.add_argument("--scheduler", choices=["asha", "fifo", "pbt"], default="asha")
    p.add_argument(
        "--search",
        choices=["tpe", "random"],
        default="tpe",
        help="Optuna sampler (ASHA/FIFO; PBT samples randomly)",
    )
    p.add_argument(
        "--metric",
        choices=["min_peer", "mean_peer", "ensemble"],
        default="mean_peer",
        help="objective: the smallest or the mean validation accuracy of the trained peers, or the ensemble's",
    )
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster hosts)")
    p.add_argument(
        "--cpus-per-trial", type=float, help="CPUs per trial (local engine; default: shared evenly)"
    )
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument(
        "--keep-baseline",
        action="store_true",
        help="ASHA: never stop the config's own values (the first trial) early, so that the winner is compared "
        "with them after every epoch of the schedule",
    )
    p.add_argument("--perturbation-interval", type=int, default=1, help="PBT: epochs between perturbations")
    p.add_argument(
        "--epoch-budget",
        type=int,
        help="stop the study after this many epochs trained in all (a compute budget)",
    )
    p.add_argument(
        "--multi-objective",
        action="store_true",
        help="also minimise the trained peers' parameters (Optuna multi-objective; needs --scheduler fifo); "
        "study.json and plots/pareto.png give the Pareto front",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the search (the trials keep the config's seed)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    p.add_argument("--out", help="study folder (default runs/<name>-tune-<time>)")
    p.add_argument(
        "--address", help="the Ray cluster to run the trials on (HOST:PORT or auto; default: RAY_ADDRESS, else a "
        "private Ray on 127.0.0.1)",
    )  # fmt: skip
    p.add_argument(
        "--resume", metavar="STUDY_DIR", help="continue an interrupted study; finished trials are kept"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray Tune's and Optuna's own output (the trials' configs are unchanged)",
    )
    p.set_defaults(func=_cmd_tune)
