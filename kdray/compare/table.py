"""The tables of a comparison: mean +- std over seeds per row, and paired differences against a baseline row.

A *record* is one finished run, as ``kdray compare`` (and ``benchmarks/accuracy_study.py``) write it, one JSON line
each::

    {"label": "dml", "seed": 0,
     "peers": {"a": {"arch": "resnet8", "test_acc": 0.84, "test_ece": 0.01, "best_val_acc": 0.87,
                     "last_test_acc": 0.83}, ...},
     "ensemble_test_acc": 0.85, "last_ensemble_test_acc": 0.84, "best_epoch": 29, "last_epoch": 40, ...}

``test_acc`` is the selected checkpoint's (``best.pt``) test accuracy, ``last_test_acc`` the last epoch's (older
records have no ``last_*`` keys: their cells read "-").

Statistics: the mean over seeds and the **sample** standard deviation (``statistics.stdev``, ddof = 1; 0 for one
seed). A paired difference against the baseline takes, for every seed both rows ran, d_s = x_row,s - x_base,s; it
reports the mean of d and its standard error sd(d) / sqrt(n) (sd with ddof = 1; none for n < 2). Accuracies are
shown in percent, differences in percentage points.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

Record = dict[str, Any]

DDOF = 1  # the standard deviation over seeds is the sample one (statistics.stdev)


# ------------------------------------------------------------------------------------------------------- numbers
def stat(values: Sequence[float | None]) -> dict[str, Any] | None:
    """``{"mean", "std", "n"}`` of the values that are not None (std: ddof 1, 0.0 for one value); None if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "n": len(values)}


def fmt(values: Sequence[float | None]) -> str:
    """Accuracies (fractions) as ``"mean ± std"`` in percent with two decimals; ``"-"`` when there are none."""
    s = stat(values)
    return "-" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def peer_mean(record: Record, key: str = "test_acc") -> float | None:
    """The mean of ``key`` over a run's peers (None if a peer lacks it)."""
    values = [p.get(key) for p in record["peers"].values()]
    return None if not values or None in values else statistics.mean(values)


def mean_se(diffs: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "se", "n"}`` of differences (``se`` = sd(d, ddof 1) / sqrt(n), None for one difference)."""
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"mean": statistics.mean(diffs), "se": se, "n": len(diffs)}


def paired_diff(
    runs: Sequence[Record], baseline: Sequence[Record], value: Callable[[Record], float | None]
) -> dict[str, Any] | None:
    """The paired difference ``value(run) - value(baseline run)`` over the seeds both have: ``{"mean", "se", "n",
    "seeds", "diffs"}`` (``se`` = sd(d, ddof 1) / sqrt(n), None for one pair); None when no seed pairs up."""
    base = {r["seed"]: value(r) for r in baseline}
    pairs = sorted(
        (r["seed"], value(r) - base[r["seed"]])
        for r in runs
        if base.get(r["seed"]) is not None and value(r) is not None
    )
    if not pairs:
        return None
    diffs = [d for _, d in pairs]
    return {**mean_se(diffs), "seeds": [s for s, _ in pairs], "diffs": diffs}


def fmt_diff(diff: dict[str, Any] | None) -> str:
    """A paired difference in percentage points: ``"+0.94 ± 0.05"`` (± one standard error)."""
    if diff is None:
        return "-"
    se = "n/a" if diff["se"] is None else f"{100 * diff['se']:.2f}"
    return f"{100 * diff['mean']:+.2f} ± {se}"


# -------------------------------------------------------------------------------------------------------- tables
def peer_names(records: Sequence[Record]) -> list[str]:
    """Every peer name of the records, in order of first appearance (a teacher-student study has both)."""
    return list(dict.fromkeys(n for r in records for n in r["peers"]))


def peer_titles(records: Sequence[Record]) -> dict[str, str]:
    """``name (arch)``, with a non-default ``width`` said (it is part of the network's name)."""
    arch = {n: r["peers"][n]["arch"] for r in records for n in r["peers"]}
    for peer in (records[0].get("config") or {}).get("peers", []) if records else []:
        width = (peer.get("arch_kwargs") or {}).get("width")
        if width is not None and peer.get("name") in arch:
            arch[peer["name"]] += f", width {width}"
    return {n: f"{n} ({a})" for n, a in arch.items()}


def _ensemble(runs: Sequence[Record], peers: Sequence[str], key: str = "ensemble_test_acc") -> str:
    return fmt([r.get(key) for r in runs]) if len(peers) > 1 else "-"


def _epochs(runs: Sequence[Record]) -> str:
    s = stat([r.get("best_epoch") for r in runs])
    if s is None:
        return "-"
    last = {r.get("last_epoch") for r in runs}
    of = f" of {last.pop()}" if len(last) == 1 and None not in last else ""
    return f"{s['mean']:.1f} ± {s['std']:.1f}{of}"


def selection_score(record: Record) -> float | None:
    """The number the run selected its epoch on: the trainable peers' mean validation accuracy at the selected
    epoch (``summary['best']['metric']``; recomputed from the curves for records written before it was kept). Not
    the mean of each peer's own best epoch, which two peers rarely reach together."""
    if record.get("selection_score") is not None:
        return record["selection_score"]
    epoch, curves = record.get("best_epoch"), record.get("val_curve")
    if not epoch or not curves:
        return None
    values = [
        curve[epoch - 1] for curve in curves.values() if len(curve) >= epoch and curve[epoch - 1] is not None
    ]
    return sum(values) / len(values) if values else None


# The columns after the per-peer ones: title -> cell of (a row's runs, the peers those runs have).
COLUMNS: dict[str, Callable[[Sequence[Record], Sequence[str]], str]] = {
    "peer mean": lambda runs, peers: fmt([peer_mean(r) for r in runs]),
    "ensemble": lambda runs, peers: _ensemble(runs, peers),
    "ECE (peer mean)": lambda runs, peers: fmt([peer_mean(r, "test_ece") for r in runs]),
    "selected val acc": lambda runs, peers: fmt([selection_score(r) for r in runs]),
    "last epoch: peer mean": lambda runs, peers: fmt([peer_mean(r, "last_test_acc") for r in runs]),
    "last epoch: ensemble": lambda runs, peers: _ensemble(runs, peers, "last_ensemble_test_acc"),
    "selected epoch": lambda runs, peers: _epochs(runs),
    "seeds": lambda runs, peers: str(len(runs)),
}
STUDY_COLUMNS = ("peer mean", "ensemble", "ECE (peer mean)", "selected val acc", "seeds")
COMPARE_COLUMNS = (
    "peer mean", "ensemble", "ECE (peer mean)", "last epoch: peer mean", "last epoch: ensemble", "selected epoch",
    "seeds",
)  # fmt: skip


def markdown_table(
    records: Sequence[Record], labels: Sequence[str], columns: Sequence[str] = COMPARE_COLUMNS
) -> list[str]:
    """One markdown row per label (in the order given; labels without records are left out): each peer's test
    accuracy (mean ± std over seeds, percent), then ``columns`` (names of :data:`COLUMNS`)."""
    names = peer_names(records)
    titles = peer_titles(records)
    head = " | ".join(titles[n] for n in names) if len(names) > 1 else "test acc"
    lines = [f"| row | {head} | {' | '.join(columns)} |", "|---" * (len(names) + len(columns) + 1) + "|"]
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        if not runs:
            continue
        peers = [n for n in names if n in runs[0]["peers"]]
        cells = [fmt([r["peers"][n]["test_acc"] for r in runs]) if n in peers else "-" for n in names]
        cells += [COLUMNS[c](runs, peers) for c in columns]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines


# What a paired-difference table compares: title -> the number of one run.
DIFFS: dict[str, Callable[[Record], float | None]] = {
    "peer mean (selected)": peer_mean,
    "peer mean (last epoch)": lambda r: peer_mean(r, "last_test_acc"),
    "ensemble (selected)": lambda r: r.get("ensemble_test_acc") if len(r["peers"]) > 1 else None,
}


def diff_table(records: Sequence[Record], labels: Sequence[str], baseline: str) -> list[str]:
    """Each row minus ``baseline``, paired by seed: mean difference ± its standard error, in points."""
    base = [r for r in records if r["label"] == baseline]
    lines = [
        f"| row - {baseline} | {' | '.join(DIFFS)} | paired seeds |",
        "|---" * (len(DIFFS) + 2) + "|",
    ]
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        if label == baseline or not runs:
            continue
        diffs = [paired_diff(runs, base, fn) for fn in DIFFS.values()]
        n = max((d["n"] for d in diffs if d), default=0)
        lines.append(f"| {label} | {' | '.join(fmt_diff(d) for d in diffs)} | {n} |")
    return lines


def table_json(records: Sequence[Record], labels: Sequence[str], baseline: str | None) -> dict[str, Any]:
    """The numbers of both tables, unformatted (fractions; std with ddof 1; paired differences with their SE)."""
    base = [r for r in records if r["label"] == baseline]
    rows = []
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        if not runs:
            continue
        peers = list(runs[0]["peers"])
        row: dict[str, Any] = {
            "label": label,
            "seeds": sorted(r["seed"] for r in runs),
            "peers": {
                n: {
                    "test_acc": stat([r["peers"][n]["test_acc"] for r in runs]),
                    "last_test_acc": stat([r["peers"][n].get("last_test_acc") for r in runs]),
                }
                for n in peers
            },
            "peer_mean": stat([peer_mean(r) for r in runs]),
            "ensemble": stat([r.get("ensemble_test_acc") for r in runs]) if len(peers) > 1 else None,
            "ece_peer_mean": stat([peer_mean(r, "test_ece") for r in runs]),
            "last_peer_mean": stat([peer_mean(r, "last_test_acc") for r in runs]),
            "last_ensemble": stat([r.get("last_ensemble_test_acc") for r in runs])
            if len(peers) > 1
            else None,
            "selected_epoch": stat([r.get("best_epoch") for r in runs]),
            "last_epoch": stat([r.get("last_epoch") for r in runs]),
        }
        if baseline is not None and label != baseline and base:
            row["diff"] = {
                "peer_mean": paired_diff(runs, base, peer_mean),
                "last_peer_mean": paired_diff(runs, base, DIFFS["peer mean (last epoch)"]),
                "ensemble": paired_diff(runs, base, DIFFS["ensemble (selected)"]),
            }
        rows.append(row)
    return {"baseline": baseline, "std": f"sample standard deviation over seeds (ddof {DDOF})", "rows": rows}


# --------------------------------------------------------------------------------------------- study extras
def generation_lines(records: Sequence[Record]) -> list[str]:
    """Born-again generations: each generation alone and the ensemble of generations 1..k (test accuracy)."""
    gens = [r for r in records if r.get("generations")]
    if not gens:
        return []
    k = len(gens[0]["generations"]["test_acc"])
    lines = ["", "| generation | alone (test) | ensemble of 1..k (test) |", "|---|---|---|"]
    for i in range(k):
        alone = fmt([r["generations"]["test_acc"][i] for r in gens])
        ens = fmt([r["generations"]["ensemble_test_acc"][i] for r in gens])
        lines.append(f"| {i + 1} | {alone} | {ens} |")
    return lines


def generation_diff_lines(records: Sequence[Record]) -> list[str]:
    """Born-again generations against generation 1 (the plain baseline) of the same seed: each later generation
    alone and the ensemble of generations 1..k, at test, in points (mean ± standard error, as ``paired_diff``)."""
    gens = [r for r in records if r.get("generations")]
    if not gens:
        return []
    k = len(gens[0]["generations"]["test_acc"])
    head = "| generation - generation 1 (same seed) | alone (test) | ensemble of 1..k (test) | paired seeds |"
    lines = ["", head, "|---|---|---|---|"]
    for i in range(1, k):
        cols = []
        for key in ("test_acc", "ensemble_test_acc"):
            cols.append(
                fmt_diff(mean_se([r["generations"][key][i] - r["generations"][key][0] for r in gens]))
            )
        lines.append(f"| {i + 1} | {cols[0]} | {cols[1]} | {len(gens)} |")
    return lines


def teacher_lines(records: Sequence[Record]) -> list[str]:
    """A row whose runs learn from frozen teachers (TF-KD's self-teacher, KD): each teacher's test accuracy, and the
    student (its peer mean) minus its own teacher of the same run, at the selected and the last epoch, in points
    (mean ± standard error over the runs, as ``paired_diff``)."""
    runs = [r for r in records if r.get("teachers")]
    if not runs:
        return []
    lines = [
        "",
        "| teacher (frozen) | teacher (test) | student - teacher: selected | student - teacher: last epoch | runs |",
        "|---|---|---|---|---|",
    ]
    for name in runs[0]["teachers"]:
        have = [r for r in runs if (r["teachers"].get(name) or {}).get("test_acc") is not None]
        cols = []
        for key in ("test_acc", "last_test_acc"):
            diffs = [
                peer_mean(r, key) - r["teachers"][name]["test_acc"]
                for r in have
                if peer_mean(r, key) is not None
            ]
            cols.append(fmt_diff(mean_se(diffs)) if diffs else "-")
        title = f"{name} ({runs[0]['teachers'][name]['arch']})"
        teacher = fmt([r["teachers"][name]["test_acc"] for r in have])
        lines.append(f"| {title} | {teacher} | {cols[0]} | {cols[1]} | {len(have)} |")
    return lines


def largest_drop(curve: Sequence[float]) -> float:
    """The largest fall of validation accuracy from one evaluation to the next (0 if it never falls)."""
    return max([0.0, *(a - b for a, b in zip(curve, curve[1:]))])


def share_lines(
    records: Sequence[Record],
    labels: Sequence[str],
    peer: str,
    references: dict[str, tuple[str, str]],
    drop: float = 0.02,
) -> list[str]:
    """A student's test accuracy as a share of reference runs of the same seed (``references``: column title ->
    (label, peer)), and the dips of its validation curve (the largest fall; how many falls exceed ``drop``)."""
    by = {(r["label"], r["seed"]): r for r in records}
    titles = " | ".join(f"share of {title} (test)" for title in references)
    out = [
        "",
        f"| {peer} | {titles} | largest val drop between evaluations (points) | evaluations with a drop > "
        f"{100 * drop:g} points | seeds |",
        "|---" * (len(references) + 4) + "|",
    ]
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        refs = {t: [by.get((lab, r["seed"])) for r in runs] for t, (lab, _) in references.items()}
        if not runs or any(None in v for v in refs.values()):
            continue
        acc = [r["peers"][peer]["test_acc"] for r in runs]
        shares = [
            fmt([a / ref["peers"][references[t][1]]["test_acc"] for a, ref in zip(acc, refs[t])])
            for t in references
        ]
        curves = [r["val_curve"][peer] for r in runs]
        drops = fmt([largest_drop(c) for c in curves])
        big = statistics.mean(sum(a - b > drop for a, b in zip(c, c[1:])) for c in curves)
        out.append(f"| {label} | {' | '.join(shares)} | {drops} | {big:.1f} | {len(runs)} |")
    return out


def mean_val_curve(run: Record) -> list[float] | None:
    """A run's validation accuracy per epoch, averaged over its peers; None without a curve (no validation split,
    or an epoch a peer was not evaluated)."""
    curves = list((run.get("val_curve") or {}).values())
    if not curves or not curves[0] or any(len(c) != len(curves[0]) or None in c for c in curves):
        return None
    return [statistics.mean(values) for values in zip(*curves)]


def row_curves(records: Sequence[Record], label: str) -> list[list[float]]:
    """A row's per-seed validation curves (peer mean), those of its most common length only (a run stopped early
    has a shorter curve: it is left out of the row's curve figures rather than drawn against the others)."""
    curves = [c for r in records if r["label"] == label and (c := mean_val_curve(r)) is not None]
    if not curves:
        return []
    common = statistics.mode(len(c) for c in curves)
    return [c for c in curves if len(c) == common]


def memorisation_lines(records: Sequence[Record], labels: Sequence[str]) -> list[str]:
    """Per row, where its validation accuracy (peer mean, per seed) peaks and how far it has fallen by the last
    epoch: the sign of a network fitting its label noise. Each number is a mean ± std over seeds of that seed's
    own peak; nothing for rows without a validation curve."""
    out = [
        "",
        "| row | epoch of the val peak | val at the peak | val at the last epoch | fall from the peak (points) | "
        "seeds |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        curves = row_curves(records, label)
        if not curves:
            continue
        peaks = [max(range(len(c)), key=c.__getitem__) for c in curves]
        epochs = stat([p + 1 for p in peaks])
        fall = stat([c[p] - c[-1] for c, p in zip(curves, peaks)])
        out.append(
            f"| {label} | {epochs['mean']:.1f} ± {epochs['std']:.1f} of {len(curves[0])} "
            f"| {fmt([c[p] for c, p in zip(curves, peaks)])} | {fmt([c[-1] for c in curves])} "
            f"| {100 * fall['mean']:.2f} ± {100 * fall['std']:.2f} | {len(curves)} |"
        )
    return out if len(out) > 3 else []
