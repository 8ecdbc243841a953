"""Accuracy studies on Fashion-MNIST, in regimes where distillation has room to help. Produces every number of
docs/results.md.

Studies (``--study``):

- ``adversarial`` (issue 11): independent vs DML vs AFD vs ACN in five regimes: a small training subset trained long,
  20% and 40% symmetric label noise, an unequal pair (ResNet-8 + WRN-16-2) and a ring of three;
- ``discnorm``: AFD's discriminator normalisation (spectral, none, DCGAN with joint batches, kdray 0.1's BatchNorm),
  which chose the default;
- ``selfkd`` (issue 12): baseline vs label smoothing vs PS-KD vs CS-KD vs TF-KD (self, reg) vs AI-KD and its
  ablations, one ResNet-8, in the small-subset and noisy-label regimes; the teachers of TF-KD self and AI-KD are
  the baseline runs of the same seed (a stage 1 shared instead of retrained);
- ``generations`` (issue 16): born-again generations 1..4 and their ensembles;
- ``datafree`` (issue 13): DFAD vs MAD from a kdray-trained teacher (rows appear once the methods exist).

Every run selects on a validation split carved from the training set (``data.val_split``) and evaluates the test
split once, at the end, on its selected checkpoint (``best.pt``); both are recorded. Each finished run appends one
JSON line to ``<out>/<study>.jsonl`` (a run already there is skipped: the study can be stopped and continued);
``--report`` prints markdown tables (mean +- sample std over seeds) and draws accuracy-over-epochs plots.

    python benchmarks/accuracy_study.py --study adversarial --seeds 0 1 2 --workers 2
    python benchmarks/accuracy_study.py --study adversarial --report > /tmp/adversarial.md
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OPTIMIZER = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}

# Regimes: (training subset incl. the carved validation split, validation count, epochs, label noise)
REGIMES = {
    "small": {"train_size": 2200, "val_split": 200, "epochs": 40, "noise": None},
    "noise20": {"train_size": 11000, "val_split": 1000, "epochs": 12, "noise": 0.2},
    "noise40": {"train_size": 11000, "val_split": 1000, "epochs": 12, "noise": 0.4},
    "unequal": {"train_size": 11000, "val_split": 1000, "epochs": 10, "noise": None},
    "ring3": {"train_size": 11000, "val_split": 1000, "epochs": 10, "noise": None},
    # data-free: the teacher trains on 10k images; the students see none (12 epochs of 25 generator steps)
    "datafree": {"train_size": 11000, "val_split": 1000, "epochs": 12, "noise": None, "steps_per_epoch": 25},
}
TEACHER14 = {"name": "teacher", "arch": "resnet14", "arch_kwargs": {"width": 16}}
STUDENT8 = {"name": "student", "arch": "resnet8"}
GEN = {"nz": 256, "ngf": 32, "student_steps": 5, "discrepancy": "l1"}
PAIR = [{"name": "a", "arch": "resnet8"}, {"name": "b", "arch": "resnet8"}]
UNEQUAL = [{"name": "small", "arch": "resnet8"}, {"name": "large", "arch": "wrn_16_2"}]
RING3 = [
    {"name": "p1", "arch": "resnet8"},
    {"name": "p2", "arch": "resnet14"},
    {"name": "p3", "arch": "resnet8", "arch_kwargs": {"width": 8}},
]
ONE = [{"name": "net", "arch": "resnet8"}]
# Tuned rows: a method's weights searched by ``kdray tune`` on the validation split of a tuning seed (not one of the
# study's seeds), the same compute budget for every method, then trained on the study's seeds like any other row.
# ASHA (with TPE) because it spends the budget on more configurations than FIFO; its grace period is a quarter of
# the schedule because after one epoch of a decaying learning rate the ranking is poor (docs/tune.md).
TUNE = {"seed": 100, "samples": 12, "budget_runs": 4, "grace_fraction": 0.25}


@dataclass(frozen=True)
class Row:
    """One line of a table: a method (with its settings) on a population, in a regime."""

    study: str
    regime: str
    label: str
    method: dict[str, Any]
    peers: list[dict[str, Any]] = field(default_factory=list)
    teacher_from: str | None = (
        None  # the label of the row (same regime and seed) whose best.pt is the teacher
    )
    generations: int | None = None
    # (study, label) of a row whose finished run of the same regime and seed has this row's exact config (but its
    # name): its record is copied, marked "reused_from", instead of training the same thing again
    same_as: tuple[str, str] | None = None
    tune_space: str | None = (
        None  # tuned row: the space (``tune_spaces/<method>.yaml``) searched before training
    )
    # control row of a tuned one: (label of the tuned row in this regime, the keys of its winner to take, or None
    # for all), then ``overrides`` on top; it answers which of the winner's values made the difference
    borrow: tuple[str, tuple[str, ...] | None] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def tuned_kind(self) -> bool:
        return bool(self.tune_space or self.borrow)

    @property
    def key(self) -> str:
        return f"{self.regime}/{self.label}"


def online_peers(regime: str) -> list[dict[str, Any]]:
    """The population an online-distillation regime trains: its own in `unequal` and `ring3`, else two ResNet-8s."""
    return {"unequal": UNEQUAL, "ring3": RING3}.get(regime, PAIR)


def _rows() -> list[Row]:
    rows = []
    for regime in ("small", "noise20", "noise40", "unequal", "ring3"):
        peers = online_peers(regime)
        for name in ("independent", "dml", "afd", "acn"):
            if regime in ("unequal", "ring3") and name == "acn":
                continue  # ACN's study is on pairs (the generator's pairwise objective)
            method: dict[str, Any] = {"name": name}
            if name == "afd":  # the discriminator the discnorm study chose, spelled out
                method.update(disc_norm="dcgan", disc_batch="joint")
            same = ("discnorm", "afd-dcgan-joint") if name == "afd" and regime == "small" else None
            rows.append(Row("adversarial", regime, name, method, peers, same_as=same))
        for name in ("dml", "afd", "acn"):
            if regime in ("unequal", "ring3") and name == "acn":
                continue
            method = {
                "name": name,
                **({"disc_norm": "dcgan", "disc_batch": "joint"} if name == "afd" else {}),
            }
            rows.append(
                Row(
                    "adversarial",
                    regime,
                    f"{name} tuned",
                    method,
                    peers,
                    tune_space=str(REPO / "tune_spaces" / f"{name}.yaml"),
                )
            )
    # AFD's winner under label noise all but switches the adversary off (weight 0.018) and almost triples the learning rate;
    # in the unequal pair it keeps a weak adversary (0.26) and raises the learning rate to 0.18: two controls tell the
    # adversary, the logit loss and the learning rate apart
    afd = {"name": "afd", "disc_norm": "dcgan", "disc_batch": "joint"}
    for regime in ("noise20", "noise40", "unequal"):
        rows += [
            Row("adversarial", regime, "independent at afd tuned lr", {"name": "independent"}, online_peers(regime),
                borrow=("afd tuned", ("train.optimizer.lr",))),
            Row("adversarial", regime, "afd tuned adversary off", afd, online_peers(regime),
                borrow=("afd tuned", None), overrides={"method.weights.adv": 0.0}),
        ]  # fmt: skip
    for norm, batch in (
        ("spectral", "separate"),
        ("none", "separate"),
        ("dcgan", "joint"),
        ("batch", "separate"),
    ):
        rows.append(Row("discnorm", "small", f"afd-{norm}-{batch}", {"name": "afd", "disc_norm": norm,
                                                                      "disc_batch": batch}, PAIR))  # fmt: skip
    for regime in ("small", "noise40"):
        teacher = [{"name": "teacher", "arch": "resnet8", "frozen": True}]
        rows += [
            Row("selfkd", regime, "baseline", {"name": "independent"}, ONE),
            Row(
                "selfkd", regime, "label smoothing 0.1", {"name": "independent", "label_smoothing": 0.1}, ONE
            ),
            Row("selfkd", regime, "PS-KD", {"name": "pskd"}, ONE),
            Row("selfkd", regime, "CS-KD", {"name": "cskd"}, ONE),
            Row("selfkd", regime, "TF-KD self", {"name": "tfkd", "mode": "self"}, teacher + ONE, "baseline"),
            Row(
                "selfkd",
                regime,
                "TF-KD reg",
                {
                    "name": "tfkd",
                    "mode": "reg",
                    "temperature": 20.0,
                    "multiplier": 10.0,
                    "weights": {"ce": 0.9, "reg": 0.1},
                },
                ONE,
            ),  # fmt: skip
            Row("selfkd", regime, "AI-KD", {"name": "aikd"}, teacher + ONE, "baseline"),
            Row(
                "selfkd",
                regime,
                "AI-KD w/o progressive",
                {"name": "aikd", "progressive": False},
                teacher + ONE,
                "baseline",
            ),  # fmt: skip
            Row(
                "selfkd",
                regime,
                "AI-KD w/o deterministic",
                {"name": "aikd", "deterministic": False},
                teacher + ONE,
                "baseline",
            ),  # fmt: skip
            Row(
                "selfkd",
                regime,
                "AI-KD w/o adversarial",
                {"name": "aikd", "adversarial": False},
                teacher + ONE,
                "baseline",
            ),  # fmt: skip
        ]
    frozen14 = {**TEACHER14, "frozen": True}
    rows += [
        Row("datafree", "datafree", "teacher", {"name": "independent"}, [TEACHER14]),
        Row("datafree", "datafree", "KD with real data", {"name": "kd"}, [frozen14, STUDENT8], "teacher"),
        Row("datafree", "datafree", "DFAD", {"name": "dfad", **GEN}, [frozen14, STUDENT8], "teacher"),
        Row(
            "datafree",
            "datafree",
            "MAD",
            {"name": "mad", "ema_batch": "half", **GEN},
            [frozen14, STUDENT8],
            "teacher",
        ),  # fmt: skip
    ]
    rows.append(
        Row(
            "generations",
            "noise40",
            "born-again gen 4 of 4",
            {"name": "independent"},
            ONE,
            generations=4,
        )
    )
    rows.append(
        Row(
            "generations",
            "small",
            "born-again gen 4 of 4",
            {"name": "independent"},
            ONE,
            generations=4,
        )
    )
    return rows


ROWS = _rows()


def config(
    row: Row, seed: int, args: argparse.Namespace, tuned: dict[str, Any] | None = None
) -> dict[str, Any]:
    regime = REGIMES[row.regime]
    data = {
        "dataset": "fashion_mnist",
        "root": args.data,
        "batch_size": 128,
        "train_size": regime["train_size"],
        "val_split": regime["val_split"],
    }
    if regime["noise"]:
        data["label_noise"] = {"kind": "symmetric", "rate": regime["noise"]}
    raw = {
        "name": f"{row.study}-{row.regime}-{row.label}".replace(" ", "_").replace("/", "_"),
        "seed": seed,
        "data": data,
        "peers": copy.deepcopy(row.peers),
        "method": copy.deepcopy(row.method),
        "train": {
            "epochs": args.epochs or regime["epochs"],
            "optimizer": dict(OPTIMIZER),
            "schedule": {"name": "cosine", "warmup_epochs": 1},
            "device": args.device,
            "progress": False,
            "threads": args.threads,
        },
        "tracking": {"enabled": False},
    }
    if row.generations:
        raw["generations"] = {"count": row.generations}
    if row.method["name"] in ("dfad", "mad"):  # no training data: an epoch is a number of generated batches
        raw["train"]["steps_per_epoch"] = regime["steps_per_epoch"]
        raw["train"]["schedule"] = {"name": "cosine"}
    elif "steps_per_epoch" in regime and row.label != "teacher":
        raw["train"]["epochs"] = args.epochs or 5  # KD with real data: a normal schedule on the training set
    if row.label == "teacher":
        raw["train"]["epochs"] = args.epochs or 5
    from kdray.config import set_key

    for key, value in (tuned or {}).items():
        set_key(raw, key, value)
    return raw


def tune_folder(row: Row, args: argparse.Namespace) -> Path:
    return Path(args.out) / "runs" / row.study / f"tune-{row.regime}-{row.label}".replace(" ", "_")


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the data folder's absolute path, which differs between clones."""
    return {**config, "data": {k: v for k, v in config.get("data", {}).items() if k != "root"}}


def tuned_values(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """The best finished trial's values of ``kdray tune`` for a tuned row (run, continued or read back).

    The study trains the row's own config on the tuning seed, selects on its validation split (the mean peer
    validation accuracy at the last epoch) and never sees the test split; its folder keeps study.json,
    trials.csv and the plots."""
    from dataclasses import asdict

    from kdray.search.study import StudySettings, run_study

    folder = tune_folder(row, args)
    base = config(row, TUNE["seed"], args)
    epochs = base["train"]["epochs"]
    settings = StudySettings(
        samples=TUNE["samples"],
        scheduler="asha",
        search="tpe",
        metric="mean_peer",
        # at most 2 at once: ASHA's first rung must not eat the budget before any trial can finish
        max_concurrent=min(args.workers, 2),
        seed=0,
        grace_period=max(1, round(epochs * TUNE["grace_fraction"])),
        epoch_budget=TUNE["budget_runs"] * epochs,
    )
    state = json.loads((folder / "study.json").read_text()) if (folder / "study.json").is_file() else None
    # the study folder is not committed (it holds every trial's checkpoints): its winner is, so that a fresh
    # clone trains the tuned seeds without tuning again
    kept_path = Path(args.out) / f"{row.study}_tuned.json"
    kept = json.loads(kept_path.read_text()) if kept_path.is_file() else {}
    mine = kept.get(row.key)
    if (
        state is None
        and mine
        and _portable(mine["config"]) == _portable(base)
        and _settings(mine["settings"]) == asdict(settings)
    ):
        return mine["best"]
    if state is not None and (state["config"] != base or _settings(state["settings"]) != asdict(settings)):
        raise RuntimeError(
            f"{folder} holds a tuning study of another config or budget (a smoke run with --epochs?); move it "
            "away to tune this one"
        )
    if state is None:
        state = run_study(base, row.tune_space, out=folder, settings=settings).study
    elif state.get("status") != "finished":
        state = run_study(resume=folder).study
    best = state.get("best")
    if not best or best.get("status") != "finished":
        raise RuntimeError(
            f"the tuning study of {row.key} has no trial that trained all {epochs} epochs within its budget "
            f"({folder}); its best is {best}"
        )
    result = {"values": dict(best["values"]), "trial_id": best["trial_id"], "objective": best["objective"]}
    kept[row.key] = {"config": base, "settings": asdict(settings), "best": result}
    kept_path.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    return result


def _settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """Recorded study settings with the settings added since at their defaults (a kept winner stays valid)."""
    from dataclasses import asdict

    from kdray.search.study import StudySettings

    return {**asdict(StudySettings()), **recorded}


def borrow_source(row: Row) -> Row:
    """The tuned row (same study and regime) whose winner a control row borrows."""
    return next(
        r for r in ROWS if r.study == row.study and r.regime == row.regime and r.label == row.borrow[0]
    )


def borrowed_values(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """A control row's values: the named keys of its tuned row's winner (tuning it first if need be), then the
    row's overrides."""
    keys = row.borrow[1]
    best = tuned_values(borrow_source(row), args)
    values = {k: v for k, v in best["values"].items() if keys is None or k in keys}
    return {**best, "values": {**values, **row.overrides}}


def run_folder(row: Row, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.out) / "runs" / row.study / f"{row.regime}-{row.label}-s{seed}".replace(" ", "_")


def run_one(
    row: Row, seed: int, args: argparse.Namespace, tuned: dict[str, Any] | None = None
) -> dict[str, Any]:
    import kdray

    sys.path.insert(0, str(REPO))  # run as a script: the repository root is not on the path
    from benchmarks.step_timing import machine_name

    raw = config(row, seed, args, tuned["values"] if tuned else None)
    if row.teacher_from:
        teacher_row = next(
            r for r in ROWS if r.study == row.study and r.regime == row.regime and r.label == row.teacher_from
        )
        teacher_ckpt = run_folder(teacher_row, seed, args) / "checkpoints" / "best.pt"
        if not teacher_ckpt.is_file():
            raise RuntimeError(f"teacher run {teacher_row.key} seed {seed} has not finished")
        raw["peers"][0]["checkpoint"] = str(teacher_ckpt)
        raw["peers"][0].setdefault("checkpoint_peer", teacher_row.peers[0]["name"])
    out = run_folder(row, seed, args)
    resume = out if (out / "checkpoints" / "last.pt").is_file() or (out / "stages.yaml").is_file() else None
    t0 = time.time()
    result = kdray.train(raw if resume is None else None, out=None if resume else out, resume=resume)
    s = result.summary
    record = {
        "study": row.study, "regime": row.regime, "label": row.label, "seed": seed,
        "peers": {p["name"]: {k: p.get(k) for k in ("arch", "best_val_acc", "test_acc", "test_ece")}
                  for p in s["peers"] if not p["frozen"]},
        "ensemble_test_acc": s.get("ensemble_test_acc"),
        "best_epoch": s["best"]["epoch"],
        "selection_score": s["best"]["metric"],
        "val_curve": {p["name"]: [h.get(f"{p['name']}/val_acc") for h in s["history"]] for p in s["peers"]
                      if not p["frozen"]},
        "wall_s": round(time.time() - t0, 1),
        "machine": machine_name(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": raw,
    }  # fmt: skip
    if "staged" in s and s["staged"].get("generations"):
        record["generations"] = s["staged"]["generations"]
    if tuned is not None:
        record["tuned"] = tuned_record(row, tuned, args)
    return record


def tuned_record(row: Row, tuned: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What a run's record says of the values it trained with: the winner, its study, the tuning budget."""
    source = borrow_source(row) if row.borrow else row
    record = {**tuned, "study": str(tune_folder(source, args)), **TUNE}
    if row.borrow:
        record["borrowed_from"] = source.label
    return record


def done_keys(path: Path) -> set[tuple[str, int]]:
    keys = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            keys.add((f"{r['regime']}/{r['label']}", r["seed"]))
    return keys


def _resolved(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's config with every default filled in and no name: two runs train the same thing iff these agree."""
    from kdray.config import validate

    return {**validate(raw).to_dict(), "name": ""}


def default_row(row: Row) -> Row | None:
    """The defaults row of a tuned row (``dml`` for ``dml tuned``), in the same study and regime."""
    label = row.label.removesuffix(" tuned")
    return next((r for r in ROWS if (r.study, r.regime, r.label) == (row.study, row.regime, label)), None)


def reuse(
    row: Row, seed: int, args: argparse.Namespace, path: Path, tuned: dict[str, Any] | None = None
) -> bool:
    """Copy a record that trained exactly this row's config for this seed into ``path``: ``row.same_as``'s, or for
    a tuned row whose winner is its method's defaults, the defaults row's (training it again would repeat it)."""
    if row.same_as is not None:
        study, label = row.same_as
        want = config(row, seed, args)
    elif tuned is not None and row.tune_space and (defaults := default_row(row)) is not None:
        study, label = row.study, defaults.label
        want = config(row, seed, args, tuned["values"])
    else:
        return False
    for record in load(Path(args.out) / f"{study}.jsonl"):
        if (record["regime"], record["label"], record["seed"]) != (row.regime, label, seed):
            continue
        if _resolved(record["config"]) != _resolved(want):
            return False
        copied = {**record, "study": row.study, "label": row.label, "reused_from": f"{study}/{label}"}
        copied["config"] = want
        if tuned is not None:
            copied["tuned"] = tuned_record(row, tuned, args)
        with path.open("a") as fh:
            fh.write(json.dumps(copied) + "\n")
        print(f"{row.key} seed {seed}: reused {study}/{label} (same config)", flush=True)
        return True
    return False


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.study}.jsonl"
    rows = [r for r in ROWS if r.study == args.study and (not args.regimes or r.regime in args.regimes)]
    rows = [r for r in rows if r.tuned_kind == args.tuned]
    rows = [r for r in rows if not args.labels or r.label in args.labels]
    done = done_keys(path)
    todo = [(r, s) for r in rows for s in args.seeds if (r.key, s) not in done]
    todo = [(r, s) for r, s in todo if not reuse(r, s, args, path)]
    # tuned rows: their studies first, one at a time (each runs args.workers trials at once)
    tuned = {key: tuned_values(r, args) for key, r in {r.key: r for r, _ in todo if r.tune_space}.items()}
    for row in {r.key: r for r, _ in todo if r.borrow}.values():
        tuned[row.key] = borrowed_values(row, args)
    todo = [(r, s) for r, s in todo if not (r.tune_space and reuse(r, s, args, path, tuned[r.key]))]
    # teachers first: a row that needs another row's checkpoint waits for it
    first = [(r, s) for r, s in todo if not r.teacher_from]
    later = [(r, s) for r, s in todo if r.teacher_from]
    t0 = time.time()
    for batch in (first, later):
        # spawned, not forked: this process may have run Ray (the tuning studies)
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, r, s, args, tuned.get(r.key)): (r.key, s) for r, s in batch}
            for fut in as_completed(futures):
                key = futures[fut]
                try:
                    record = fut.result()
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                    print(f"FAILED {key}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                record["command"] = " ".join(["python", *sys.argv])
                with path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                accs = ", ".join(f"{n} {p['test_acc']:.4f}" for n, p in record["peers"].items())
                print(
                    f"[{time.time() - t0:6.0f}s] {key} seed {key[1]}: test {accs} ({record['wall_s']} s)",
                    flush=True,
                )


# ------------------------------------------------------------------------------------------------------ report
# The tables are kdray's (kdray.compare.table, tested); this script adds each study's regime headers and notes.
def load(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def tables(study: str, records: list[dict[str, Any]]) -> str:
    """The markdown of one study's records: per regime, a table of every row (mean ± sample std over seeds), the
    tuned rows' values, born-again generations; the data-free students' shares."""
    from kdray.compare.table import STUDY_COLUMNS, generation_lines, markdown_table, share_lines

    lines = []
    for regime in dict.fromkeys(r["regime"] for r in records):
        group = [r for r in records if r["regime"] == regime]
        labels = [row.label for row in ROWS if row.study == study and row.regime == regime]
        lines += [f"\n**{regime}** ({describe(regime, group[0]['config'])})\n",
                  *markdown_table(group, labels, STUDY_COLUMNS)]  # fmt: skip
        for label in labels:
            tuned_run = next((r for r in group if r["label"] == label and r.get("tuned")), None)
            if tuned_run:
                tuned = tuned_run["tuned"]
                values = ", ".join(f"`{k}` {v:.3g}" if isinstance(v, float) else f"`{k}` {v}"
                                   for k, v in tuned["values"].items())  # fmt: skip
                origin = (f"{tuned['borrowed_from']}'s winner" if tuned.get("borrowed_from")
                          else f"kdray tune, seed {tuned['seed']}'s validation split")  # fmt: skip
                if tuned_run.get("reused_from"):
                    origin += f"; the method's defaults, so the runs are row {tuned_run['reused_from']}'s"
                lines.append(f"\n{label}: {values} ({origin})")
        lines += generation_lines(group)
    if study == "datafree":
        lines += share_lines(records, ("DFAD", "MAD"), "student",
                             {"the teacher": ("teacher", "teacher"),
                              "KD with real data": ("KD with real data", "student")})  # fmt: skip
    return "\n".join(lines)


def report(args: argparse.Namespace) -> str:
    records = load(Path(args.out) / f"{args.study}.jsonl")
    text = tables(args.study, records)
    if args.study == "generations":
        plot_generations(records, Path(args.out) / "generations_by_generation.png")
    if args.study == "datafree":
        plot_dips(records, Path(args.out) / "datafree_dips.png")
    plot(records, Path(args.out) / f"{args.study}.png")
    return text


def _pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dips(records: list[dict[str, Any]], path: Path) -> None:
    """Student validation accuracy over generator steps, DFAD and MAD, every seed: the dips MAD targets."""
    plt = _pyplot()

    runs = [r for r in records if r["label"] in ("DFAD", "MAD")]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in runs:
        steps = r["config"]["train"]["steps_per_epoch"]
        curve = r["val_curve"]["student"]
        color = "tab:red" if r["label"] == "DFAD" else "tab:blue"
        ax.plot([steps * (e + 1) for e in range(len(curve))], curve, color=color, alpha=0.75,
                label=f"{r['label']} seed {r['seed']}", linestyle=("-", "--", ":")[r["seed"] % 3])  # fmt: skip
    ax.set(xlabel="generator steps", ylabel="student validation accuracy",
           title="Data-free students from a ResNet-14 teacher (Fashion-MNIST)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_generations(records: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy by generation, alone and as the ensemble of generations 1..k (mean +- std over seeds)."""
    plt = _pyplot()

    runs = [r for r in records if r.get("generations")]
    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    if not regimes:
        return
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.8 * len(regimes), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        group = [r for r in runs if r["regime"] == regime]
        k = min(len(r["generations"]["test_acc"]) for r in group)
        for key, label in (("test_acc", "generation alone"), ("ensemble_test_acc", "ensemble of 1..k")):
            values = [[100 * r["generations"][key][i] for r in group] for i in range(k)]
            mean = [statistics.mean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(range(1, k + 1), mean, yerr=std, marker="o", capsize=3, label=label)
        ax.set(title=f"{regime} ({len(group)} seeds)", xlabel="generation", ylabel="test accuracy (%)",
               xticks=range(1, k + 1))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(regime: str, raw: dict[str, Any]) -> str:
    r = REGIMES[regime]
    if regime == "datafree":
        return (f"teacher and KD: {r['train_size'] - r['val_split']} training images, {r['val_split']} validation, "
                f"5 epochs; DFAD and MAD: no training images, {r['epochs']} epochs of {r['steps_per_epoch']} "
                "generator steps, selected on the same validation images")  # fmt: skip
    noise = f", {int(100 * r['noise'])}% symmetric label noise" if r["noise"] else ""
    epochs = raw["train"]["epochs"]
    return f"{r['train_size'] - r['val_split']} training images, {r['val_split']} validation, {epochs} epochs{noise}"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()

    regimes = list(dict.fromkeys(r["regime"] for r in records))
    if not regimes:
        return
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 3.6), squeeze=False)
    # one colour per row in every panel
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(r["label"] for r in records))}
    for ax, regime in zip(axes[0], regimes):
        group = [r for r in records if r["regime"] == regime]
        for label in dict.fromkeys(r["label"] for r in group):
            runs = [r for r in group if r["label"] == label]
            epochs = min(len(c) for r in runs for c in r["val_curve"].values())
            mean = [
                statistics.mean(statistics.mean(c[e] for c in r["val_curve"].values()) for r in runs)
                for e in range(epochs)
            ]
            ax.plot(range(1, epochs + 1), mean, label=label, color=colours[label])
        ax.set(title=regime, xlabel="epoch", ylabel="validation accuracy (peer mean, seed mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, choices=sorted({r.study for r in ROWS}))
    parser.add_argument("--regimes", nargs="*", help="only these regimes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", nargs="*", help="only these rows (e.g. 'dml tuned')")
    parser.add_argument(
        "--epochs", type=int, default=None, help="override every regime's epochs (smoke runs)"
    )
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 1))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--tuned",
        action="store_true",
        help="run the tuned rows instead (kdray tune on the validation split of seed "
        f"{TUNE['seed']} first, {TUNE['budget_runs']} runs' worth of epochs per method)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "studies"))
    parser.add_argument(
        "--report", action="store_true", help="print the tables of the finished runs and plot"
    )
    args = parser.parse_args()
    if args.report:
        print(report(args))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
