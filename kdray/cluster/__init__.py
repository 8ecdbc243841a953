"""Running kdray on a Ray cluster: ``kdray cluster check`` (a cluster-launcher file, before ``ray up``) and
``kdray submit`` (a training run, as a Ray job, to a cluster that is up).

The runbook is ``docs/cluster.md``. Nothing here imports Ray until a command runs, so ``kdray --help`` stays fast.
"""

from __future__ import annotations

import argparse

from kdray.cluster.check import check_cluster
from kdray.cluster.problems import ClusterCheckError
from kdray.cluster.submit import build_entrypoint, build_runtime_env, submit_job

__all__ = [
    "ClusterCheckError",
    "add_parser",
    "add_submit_parser",
    "build_entrypoint",
    "build_runtime_env",
    "check_cluster",
    "submit_job",
]


def _set_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _cmd_check(args: argparse.Namespace) -> int:
    if args.set and not args.config:
        from kdray.errors import KdrayError

        raise KdrayError("kdray cluster check: --set changes the experiment, so it needs --config EXPERIMENT")
    report = check_cluster(args.file, config=args.config, overrides=args.set)
    print(report.render())
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cluster", help="Ray cluster files: check one before `ray up`")
    sub = p.add_subparsers(dest="cluster_command", required=True)
    c = sub.add_parser(
        "check",
        help="validate a cluster.yaml as `ray up` does, then kdray's rules (storage, capacity, Ray version)",
        description=(
            "Validate FILE exactly as `ray up` does before it touches a cloud (Ray's schema and defaults), then "
            "kdray's rules: storage every node reaches, room for the experiment's population and placement, the "
            "Ray version in the setup commands. Exits 2 naming each problem. See docs/cluster.md."
        ),
    )
    c.add_argument("file", help="a Ray cluster-launcher YAML (e.g. cluster.yaml, deploy/onprem.yaml)")
    c.add_argument("--config", metavar="EXPERIMENT", help="also check that this experiment fits the cluster")
    _set_option(c, "override a key of the experiment, as for `kdray train` (repeatable)")
    c.set_defaults(func=_cmd_check)


def _cmd_submit(args: argparse.Namespace) -> int:
    return submit_job(
        address=args.address,
        config=args.config,
        overrides=args.set,
        out=args.out,
        working_dir=args.working_dir,
        pip=args.pip,
        with_deps=args.with_deps,
        env=args.env,
        job_id=args.job_id,
        wait=not args.no_wait,
        timeout_s=args.timeout,
    )


def add_submit_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run `kdray train CONFIG` on a Ray cluster through the Ray Jobs API",
        description=(
            "Validate CONFIG here, then submit `python -m kdray train CONFIG ...` as a Ray job: the working "
            "directory travels in the job's runtime_env (without .venv, runs/, data/, .git, ...). Prints the job id "
            "and follows the job's logs until it ends, unless --no-wait. Exit code: 0 if the job succeeded, 1 if "
            "it failed or was stopped."
        ),
    )
    p.add_argument("config", help="experiment YAML, inside --working-dir (it travels with the job)")
    p.add_argument(
        "--address",
        help="the cluster's Jobs API, e.g. http://127.0.0.1:8265 through `ray dashboard cluster.yaml` "
        "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)",
    )
    _set_option(p, "override a config key (repeatable); checked here before submitting")
    p.add_argument("--out", help="run folder on the cluster, e.g. /mnt/kdray/runs/NAME (shared storage)")
    p.add_argument("--working-dir", default=".", help="the folder shipped with the job (default: .)")
    p.add_argument(
        "--with-deps",
        action="store_true",
        help="also install kdray's pinned dependencies (torch, mlflow, optuna, ...) in the job's runtime_env; "
        "only for clusters whose nodes lack them (slow: a venv per node)",
    )
    p.add_argument(
        "--pip", action="append", default=[], metavar="REQ", help="an extra pip requirement (repeatable)"
    )
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="an env var of the job")
    p.add_argument("--job-id", help="the submission id (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=None, help="give up following after this many seconds")
    p.set_defaults(func=_cmd_submit)
