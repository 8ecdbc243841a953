"""``kdray train | eval | export | compare | methods | models | tune | cluster | submit``.

Bad input (a config key, a missing file, a corrupt checkpoint, an unreachable tracking server) prints one line naming
what to fix and exits 2; no traceback, nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kdray.errors import KdrayError

# Sub-commands that live in their own modules register through this table: name -> "module:function" taking
# the subparsers object and returning nothing (they call ``set_defaults(func=...)``).
EXTRA_COMMANDS: dict[str, str] = {
    "tune": "kdray.search.cli:add_parser",
    "tracking": "kdray.tracking:add_parser",
    "cluster": "kdray.cluster:add_parser",
    "submit": "kdray.cluster:add_submit_parser",
    "ray": "kdray.engines.ray_service:add_parser",
    "compare": "kdray.compare.cli:add_parser",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from kdray.api import train

    if args.config is None and args.resume is None:
        raise KdrayError("kdray train: give a CONFIG file (or --resume RUN_DIR to continue a run)")
    overrides = [*args.set, *(["train.verbose=true"] if args.verbose else [])]
    result = train(args.config, overrides=overrides, out=args.out, resume=args.resume)
    s = result.summary
    if "staged" in s:
        for stage in s["staged"]["stages"]:
            accs = ", ".join(
                f"{p['name']} {p['test_acc']:.4f}" for p in stage["peers"] if p.get("test_acc") is not None
            )
            print(f"stage {stage['name']} ({stage['method']}): test_acc {accs}")
        print(f"run folder: {Path(s['staged']['stages'][-1]['run_folder']).parent.parent}")
        return 0
    selected = "test_acc (selection split)" if s["selection"]["split"] == "test" else "val_acc"
    accs = ", ".join(
        f"{p['name']} ({p['arch']}) {p['val_acc']:.4f}" for p in s["peers"] if p["val_acc"] is not None
    )
    print(
        f"done in {s['wall_s']:.1f} s: {selected} {accs}"
        + (f"; ensemble {s['ensemble_acc']:.4f}" if s["ensemble_acc"] else "")
    )
    test = s.get("test")
    if test:
        accs = ", ".join(f"{name} {acc:.4f}" for name, acc in test["peers"].items())
        ens = f"; ensemble {test['ensemble_acc']:.4f}" if test.get("ensemble_acc") is not None else ""
        print(
            f"test split, evaluated once ({test['checkpoint']}, epoch {test['epoch']}): test_acc {accs}{ens}"
        )
        last = test.get("last")
        if last and not last.get("same_as_selected"):
            accs = ", ".join(f"{name} {acc:.4f}" for name, acc in last["peers"].items())
            ens = f"; ensemble {last['ensemble_acc']:.4f}" if last.get("ensemble_acc") is not None else ""
            print(f"test split, last epoch (last.pt, epoch {last['epoch']}): test_acc {accs}{ens}")
    print(f"run folder: {result.out_dir}  (summary.json, curves.png, checkpoints/)")
    if s.get("mlflow_run_id"):
        print(f"mlflow run: {s['mlflow_run_id']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from kdray.api import evaluate

    report = evaluate(args.checkpoint, overrides=args.set, split=args.split)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        split = report["split"]
        print(f"{report['checkpoint']} (epoch {report['epoch']}), {split} split")
        for p in report["peers"]:
            print(
                f"  {p['name']:>12} {p['arch']:<14} {split}_acc {p['acc']:.4f}  {split}_loss {p['loss']:.4f}"
            )
        if report["ensemble_acc"] is not None:
            print(f"  {'ensemble':>12} {'':<14} {split}_acc {report['ensemble_acc']:.4f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from kdray.exporter import export

    report = export(
        args.source,
        peer=args.peer,
        format=args.format,
        out=args.out,
        checkpoint=args.checkpoint,
        force=args.force,
        overrides=args.set,
        tolerance=args.tolerance,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = report["metadata"]
    print(
        f"{report['path']}: peer {report['peer']} ({meta['arch']}, {meta['params']} params) of "
        f"{report['checkpoint']} (epoch {report['epoch']}), {report['format']}"
    )
    if "max_abs_diff" in report:
        print(
            f"  checked on {report['checked_on']} test inputs: max |difference from torch| "
            f"{report['max_abs_diff']:.3g} (tolerance {report['tolerance']:g} of the largest logit)"
        )
    norm = meta["normalisation"]
    shape = "x".join(str(d) for d in meta["input_shape"])
    how = f"normalised (x / 255 - {norm['mean']}) / {norm['std']}" if norm else "as the run's data gave them"
    print(f"  input: float32 N x {shape}, {how}; output: N x {meta['num_classes']} logits")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from kdray.data import locate_fashion_mnist

    folder = locate_fashion_mnist(args.root, download=not args.no_download)
    print(f"Fashion-MNIST: {folder}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from kdray.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        first = next(iter(doc.strip().splitlines()), "")
        print(f"{name:<12} terms={','.join(cls.terms):<24} {first}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    if args.timm is not None:
        from kdray.models.timm_models import PREFIX, timm_names

        names = timm_names(args.timm)
        if not names:
            raise KdrayError(
                f"--timm '{args.timm}': no timm model matches (fnmatch wildcards, e.g. 'resnet*')"
            )
        for name in names:
            print(PREFIX + name)
        return 0
    from kdray.models import list_models

    for name in list_models():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a population")
    p.add_argument("config", nargs="?", help="experiment YAML (optional with --resume)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    p.add_argument("--out", help="run folder (default runs/<name>-<time>)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in this folder from checkpoints/last.pt"
    )
    p.add_argument(
        "--verbose", action="store_true", help="also show Ray's and MLflow's own INFO logs (train.verbose)"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a saved population")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. data.root=/data")
    p.add_argument(
        "--split", choices=["val", "test"], default="val",
        help="val: the validation split carved from the training set (default); test: the test split",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="write one peer as ONNX, TorchScript, safetensors or an MLflow model")
    p.add_argument(
        "source", metavar="RUN_OR_CHECKPOINT", help="a run folder, its checkpoints/, or a checkpoint"
    )
    p.add_argument("--peer", help="which peer (default: the only trainable one)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors", "mlflow"])
    p.add_argument("--out", required=True, help="the file (a folder for mlflow) to write; never overwritten")
    p.add_argument(
        "--checkpoint", choices=["best", "last"],
        help="of a run folder: best.pt (the selected epoch; the default when it exists) or last.pt",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--tolerance", type=float, default=1e-4,
        help="onnx, torchscript: the largest accepted difference from torch, as a share of the largest logit",
    )  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. data.root=/data")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("data", help="find (or fetch) Fashion-MNIST, the offline real dataset")
    p.add_argument("dataset", choices=["fashion_mnist"])
    p.add_argument("--root", default="data", help="data root (default: data)")
    p.add_argument("--no-download", action="store_true", help="only look; never fetch")
    p.set_defaults(func=_cmd_data)

    sub.add_parser("methods", help="list the methods").set_defaults(func=_cmd_methods)
    p = sub.add_parser("models", help="list the architectures (tv:<name> and timm:<name> are accepted too)")
    p.add_argument(
        "--timm", metavar="PATTERN", nargs="?", const="",
        help="list the timm models matching PATTERN (fnmatch, e.g. 'resnet*'; none: all) as timm:<name>",
    )  # fmt: skip
    p.set_defaults(func=_cmd_models)

    for target in EXTRA_COMMANDS.values():
        module, _, func = target.partition(":")
        try:
            adder: Callable = getattr(importlib.import_module(module), func)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but a dependency is missing: that is a real error
                raise
            continue
        adder(sub)
    return parser


# The commands whose runs use Ray in this process (``compare``: in its child processes, which inherit the
# environment); not ``submit`` (its RAY_ADDRESS is the Jobs API's, not the service's GCS) nor ``cluster`` / ``ray``
# (they look at clusters, they do not join one).
RUNS_ON_RAY = ("train", "tune", "compare")


def main(argv: list[str] | None = None) -> int:
    from kdray.engines.ray_service import attach_environment

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in RUNS_ON_RAY:  # a running `kdray ray start`: attach to it (before Ray is imported)
        os.environ.update(attach_environment())
    try:
        return int(args.func(args) or 0)
    except KdrayError as exc:
        print(f"kdray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
