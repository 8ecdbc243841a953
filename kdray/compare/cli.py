"""``kdray compare CONFIG... --seeds 0 1 2`` (or ``kdray compare STUDY.yaml``): see :mod:`kdray.compare`."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from kdray.errors import ConfigError, KdrayError


def _cmd_compare(args: argparse.Namespace) -> int:
    from kdray.compare.runner import run_compare
    from kdray.compare.study import from_configs, is_study_file, load_study, select_rows

    if len(args.files) == 1 and is_study_file(args.files[0]):
        study = load_study(args.files[0])
        if args.seeds:
            study.seeds = list(args.seeds)
        if args.rows:
            if args.baseline is not None:
                study.baseline = args.baseline
            study.rows = select_rows(study, args.rows)
    else:
        if args.rows:
            raise ConfigError("--rows", " ".join(args.rows), "row labels of a study file (given alone)")
        for f in args.files:
            if is_study_file(f):
                raise ConfigError(
                    "config", f, "a study file (with rows:) is given alone, without config files"
                )
        study = from_configs(args.files, args.seeds)
    if args.baseline is not None:
        study.baseline = args.baseline
    from kdray.compare.study import check

    check(study)
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", args.jobs, "a whole number >= 1")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads", args.threads, "a whole number >= 1")
    out = args.out or Path("runs") / (
        "compare-" + re.sub(r"[^A-Za-z0-9._-]+", "_", "-vs-".join(study.labels()))[:80]
    )
    command = ["kdray", "compare", *args.files, *(["--seeds", *map(str, args.seeds)] if args.seeds else [])]
    command += ["--rows", *args.rows] if args.rows else []
    for flag, value in (("--baseline", args.baseline), ("--out", str(out)), ("--jobs", args.jobs)):
        command += [flag, str(value)] if value is not None else []
    command += [item for kv in args.set for item in ("--set", kv)]
    result = run_compare(study, out, overrides=args.set, jobs=args.jobs, threads=args.threads,
                         command=shlex.join(command), show_progress=not args.no_progress)  # fmt: skip
    print(result["table"])
    print(f"trained {len(result['trained'])}, reused {result['reused']}; folder: {out} (table.md, table.json, "
          "compare.png, records.jsonl)")  # fmt: skip
    if result["failures"]:
        for line in result["failures"]:
            print(f"kdray: failed: {line}", file=sys.stderr)
        raise KdrayError(f"{len(result['failures'])} run(s) failed; fix and run the same command again")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="train configs x seeds, resumably and in parallel; tables of mean ± std and paired differences",
        description="Train every row (a config file, or a study file's rows) for every seed, each run in its own "
        "process, then write table.md / table.json (mean ± std per peer, peer mean, ensemble, ECE, the selected "
        "and the last epoch's test accuracy; paired differences against the baseline row), compare.png and "
        "records.jsonl. The same command again reuses the finished runs and resumes the interrupted ones.",
    )
    p.add_argument(
        "files", nargs="+", metavar="CONFIG", help="experiment YAMLs (one row each), or one study file"
    )
    p.add_argument("--seeds", type=int, nargs="+", help="the seeds (default 0 1 2, or the study file's)")
    p.add_argument(
        "--rows", nargs="+", metavar="LABEL",
        help="only these rows of the study file (the baseline among them), e.g. to add seeds to some rows",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every row"
    )
    p.add_argument("--out", help="output folder (default runs/compare-<labels>)")
    p.add_argument("--baseline", help="the row that paired differences subtract (default the first row)")
    p.add_argument(
        "--jobs", type=int, help="runs at once (default half the cores, at most the number of runs)"
    )
    p.add_argument("--threads", type=int, help="torch threads per run (default cores // jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)
