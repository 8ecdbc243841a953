"""The comparison tables, from hand-made records: mean ± sample std (ddof 1) over seeds, paired differences by
seed with their standard error; and every table of docs/results.md regenerated from the committed JSONL."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from kdray.compare.table import (
    COMPARE_COLUMNS,
    diff_table,
    fmt,
    markdown_table,
    paired_diff,
    peer_mean,
    share_lines,
    stat,
    table_json,
)

REPO = Path(__file__).resolve().parents[2]


def rec(label, seed, a, b, last_a=None, last_b=None, ens=None, epoch=None, ece=0.01):
    return {
        "label": label,
        "seed": seed,
        "peers": {
            "a": {
                "arch": "resnet8",
                "test_acc": a,
                "test_ece": ece,
                "best_val_acc": 0.9,
                "last_test_acc": last_a,
            },
            "b": {
                "arch": "wrn_16_2",
                "test_acc": b,
                "test_ece": ece,
                "best_val_acc": 0.9,
                "last_test_acc": last_b,
            },
        },
        "ensemble_test_acc": ens,
        "best_epoch": epoch,
        "last_epoch": 10,
    }


# base: a = .80 .82 .84 (mean .82, sd .02), b = .70 .74 .72 (mean .72, sd .02); peer means .75 .78 .78
# (mean .77, sd sqrt(.0006 / 2) = .017321). x: peer means .78 .79 .80 at seeds 0 1 2, written out of seed order,
# plus a seed 3 the baseline lacks. Paired differences: .03 .01 .02 -> mean .02, sd .01, SE .01 / sqrt(3) = .005774.
BASE = [
    rec("base", 0, 0.80, 0.70, 0.79, 0.69, ens=0.81, epoch=3),
    rec("base", 1, 0.82, 0.74, 0.80, 0.70, ens=0.83, epoch=5),
    rec("base", 2, 0.84, 0.72, 0.81, 0.71, ens=0.85, epoch=10),
]
X = [
    rec("x", 2, 0.86, 0.74, 0.84, 0.74, ens=0.86, epoch=10),
    rec("x", 0, 0.83, 0.73, 0.80, 0.70, ens=0.84, epoch=10),
    rec("x", 3, 0.99, 0.99, 0.99, 0.99, ens=0.99, epoch=10),
    rec("x", 1, 0.83, 0.75, 0.80, 0.72, ens=0.84, epoch=10),
]


def test_mean_and_sample_std_by_hand() -> None:
    s = stat([0.80, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02) and s["n"] == 3  # ddof 1
    assert fmt([0.80, 0.82, 0.84]) == "82.00 ± 2.00"  # ddof 0 would say 1.63
    assert fmt([0.75, 0.78, 0.78]) == "77.00 ± 1.73"
    assert fmt([0.5]) == "50.00 ± 0.00" and fmt([]) == "-" and fmt([None]) == "-"


def test_paired_difference_pairs_by_seed_and_its_standard_error() -> None:
    d = paired_diff(X, BASE, peer_mean)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3  # seed 3 has no baseline run
    assert d["diffs"] == pytest.approx([0.03, 0.01, 0.02])
    assert d["mean"] == pytest.approx(0.02)
    assert d["se"] == pytest.approx(0.01 / math.sqrt(3))  # sd ddof 1; ddof 0 would give .004714
    one = paired_diff(X[:1], BASE, peer_mean)
    assert one["n"] == 1 and one["se"] is None
    assert paired_diff([rec("y", 7, 0.5, 0.5)], BASE, peer_mean) is None


def test_markdown_table_cells() -> None:
    lines = markdown_table(BASE + X, ["base", "x", "absent"], COMPARE_COLUMNS)
    assert lines[0] == (
        "| row | a (resnet8) | b (wrn_16_2) | peer mean | ensemble | ECE (peer mean) | last epoch: peer mean | "
        "last epoch: ensemble | selected epoch | seeds |"
    )
    assert lines[1] == "|---" * 10 + "|"
    # base last-epoch peer means .74 .75 .76: mean .75, sd .01; epochs 3 5 10: mean 6, sd sqrt(26 / 2) = 3.61
    assert lines[2] == (
        "| base | 82.00 ± 2.00 | 72.00 ± 2.00 | 77.00 ± 1.73 | 83.00 ± 2.00 | 1.00 ± 0.00 | 75.00 ± 1.00 | - | "
        "6.0 ± 3.6 of 10 | 3 |"
    )
    assert len(lines) == 4  # no line for a label without records
    assert lines[3].startswith("| x | ") and lines[3].endswith("| 4 |")


def test_diff_table_and_json() -> None:
    lines = diff_table(BASE + X, ["base", "x"], "base")
    assert (
        lines[0]
        == "| row - base | peer mean (selected) | peer mean (last epoch) | ensemble (selected) | paired seeds |"
    )
    # last epoch: x .75 .76 .79 vs base .74 .75 .76 -> .01 .01 .03: mean .016667, sd .011547, SE .006667
    # ensemble: .84 .84 .86 vs .81 .83 .85 -> .03 .01 .01: mean .016667, SE .006667
    assert lines[2] == "| x | +2.00 ± 0.58 | +1.67 ± 0.67 | +1.67 ± 0.67 | 3 |"
    table = table_json(BASE + X, ["base", "x"], "base")
    assert table["rows"][0]["peer_mean"]["std"] == pytest.approx(math.sqrt(0.0003))
    assert "diff" not in table["rows"][0]
    diff = table["rows"][1]["diff"]["peer_mean"]
    assert diff["mean"] == pytest.approx(0.02) and diff["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert table["rows"][1]["seeds"] == [0, 1, 2, 3]


def test_share_of_a_reference_run_of_the_same_seed() -> None:
    records = [
        {"label": "teacher", "seed": s, "peers": {"teacher": {"test_acc": t}}}
        for s, t in ((0, 0.8), (1, 0.9))
    ] + [
        {"label": "DFAD", "seed": s, "peers": {"student": {"test_acc": a}}, "val_curve": {"student": c}}
        for s, a, c in ((1, 0.45, [0.1, 0.5, 0.4, 0.45]), (0, 0.6, [0.2, 0.19, 0.3, 0.3]))
    ]
    lines = share_lines(records, ["DFAD"], "student", {"the teacher": ("teacher", "teacher")})
    # shares .6 / .8 = .75 and .45 / .9 = .5: mean .625, sd .17678; largest drops .01 and .1; drops > 2 points: 0, 1
    assert lines[-1] == "| DFAD | 62.50 ± 17.68 | 5.50 ± 6.36 | 0.5 | 2 |"


@pytest.mark.parametrize("study", ["adversarial", "discnorm", "selfkd", "generations", "datafree"])
def test_every_published_table_regenerates_from_its_jsonl(study: str) -> None:
    """Each table row of docs/results.md is what the formatting code makes of the committed records."""
    sys.path.insert(0, str(REPO))
    from benchmarks.accuracy_study import load, tables

    records = load(REPO / "benchmarks" / "results" / "studies" / f"{study}.jsonl")
    assert records
    made = [line for line in tables(study, records).splitlines() if line.startswith("|")]
    docs = set((REPO / "docs" / "results.md").read_text().splitlines())
    missing = [line for line in made if line not in docs]
    assert len(made) > 5 and not missing, missing[:3]


def test_a_published_row_by_hand() -> None:
    """One row of docs/results.md recomputed here from its records, without the formatting code."""
    path = REPO / "benchmarks" / "results" / "studies" / "selfkd.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines()]
    runs = [r for r in runs if r["regime"] == "small" and r["label"] == "baseline"]
    accs = [r["peers"]["net"]["test_acc"] for r in runs]
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" == "84.25 ± 0.66"
    assert "| baseline | 84.25 ± 0.66 | 84.25 ± 0.66 | - |" in (REPO / "docs" / "results.md").read_text()


def test_the_memorisation_table_finds_each_seeds_peak_and_its_fall_by_hand(tmp_path):
    from kdray.compare.plots import plot_val_curves
    from kdray.compare.table import mean_val_curve, memorisation_lines

    def curved(label, seed, a, b):
        return {**rec(label, seed, 0.8, 0.8), "val_curve": {"a": a, "b": b}}

    runs = [
        # seed 0: peer means 0.50, 0.70, 0.60 -> peak at epoch 2 (0.70), last 0.60, fall 10 points
        curved("ind", 0, [0.4, 0.8, 0.6], [0.6, 0.6, 0.6]),
        # seed 1: peer means 0.55, 0.60, 0.80 -> peak at the last epoch (3), fall 0
        curved("ind", 1, [0.5, 0.6, 0.8], [0.6, 0.6, 0.8]),
        curved("flat", 0, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        {**rec("nocurve", 0, 0.8, 0.8), "val_curve": {"a": [], "b": []}},
    ]
    assert mean_val_curve(runs[0]) == pytest.approx([0.5, 0.7, 0.6])
    assert mean_val_curve(runs[3]) is None
    assert mean_val_curve({**runs[0], "val_curve": {"a": [0.4, None, 0.6], "b": [0.6, 0.6, 0.6]}}) is None
    lines = memorisation_lines(runs, ["ind", "flat", "nocurve"])
    # epochs 2 and 3: mean 2.5, std 0.71; peaks 70 and 80: 75.00 ± 7.07; last 60 and 80; falls 10 and 0
    assert lines[3] == "| ind | 2.5 ± 0.7 of 3 | 75.00 ± 7.07 | 70.00 ± 14.14 | 5.00 ± 7.07 | 2 |"
    assert lines[4] == "| flat | 1.0 ± 0.0 of 3 | 50.00 ± 0.00 | 50.00 ± 0.00 | 0.00 ± 0.00 | 1 |"
    assert len(lines) == 5  # no line for the row without a curve
    assert memorisation_lines(runs[3:], ["nocurve"]) == []
    png = plot_val_curves(runs, ["ind", "flat", "nocurve"], tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_val_curves(runs[3:], ["nocurve"], tmp_path / "none.png") is None


@pytest.mark.parametrize(
    "study", ["selfkd_memorising", "online_memorising", "online_memorising_unequal", "ban_memorising"]
)
def test_the_memorising_regime_tables_regenerate_from_their_jsonl(study: str, tmp_path) -> None:
    """docs/results.md's memorising-regime tables are what `kdray compare` writes from the committed records."""
    from kdray.compare.runner import load_records, write_outputs
    from kdray.compare.study import load_study

    records = load_records(REPO / "benchmarks" / "results" / "studies" / f"{study}.jsonl")
    text = write_outputs(load_study(REPO / "configs" / "studies" / f"{study}.yaml"), records, tmp_path)
    made = [line for line in text.splitlines() if line.startswith("|")]
    docs = set((REPO / "docs" / "results.md").read_text().splitlines())
    missing = [line for line in made if line not in docs]
    assert len(made) > 10 and not missing, missing[:3]


def test_a_shorter_curve_of_an_unfinished_run_is_left_out_of_its_rows_curve_figures():
    from kdray.compare.table import memorisation_lines, row_curves

    runs = [
        {**rec("r", s, 0.8, 0.8), "val_curve": {"a": curve, "b": curve}}
        for s, curve in ((0, [0.5, 0.7, 0.6]), (1, [0.6, 0.8, 0.8]), (2, [0.9]))
    ]
    assert row_curves(runs, "r") == [[0.5, 0.7, 0.6], [0.6, 0.8, 0.8]]
    assert memorisation_lines(runs, ["r"])[3].endswith(
        "of 3 | 75.00 ± 7.07 | 70.00 ± 14.14 | 5.00 ± 7.07 | 2 |"
    )


def test_born_again_generations_are_differenced_against_generation_1_of_the_same_seed(tmp_path) -> None:
    """Generation k minus generation 1, seed by seed: seeds 0 and 1 give generation 2 alone +2 and +4 points (mean
    +3.00, sd 1.414, se 1.00) and the ensemble +1 and +1 (se 0.00); `kdray compare`'s table carries both tables."""
    from kdray.compare.runner import write_outputs
    from kdray.compare.study import Row, Study
    from kdray.compare.table import generation_diff_lines, generation_lines

    def staged(seed, alone, ens):
        return {
            **rec("ban", seed, alone[-1], alone[-1]),
            "generations": {"test_acc": alone, "ensemble_test_acc": ens},
        }

    runs = [
        staged(0, [0.70, 0.72, 0.71], [0.70, 0.71, 0.72]),
        staged(1, [0.60, 0.64, 0.66], [0.60, 0.61, 0.63]),
    ]
    lines = generation_diff_lines(runs)
    assert lines[3] == "| 2 | +3.00 ± 1.00 | +1.00 ± 0.00 | 2 |"
    assert lines[4] == "| 3 | +3.50 ± 2.50 | +2.50 ± 0.50 | 2 |"
    assert generation_diff_lines([rec("x", 0, 0.5, 0.5)]) == []
    study = Study(rows=[Row(label="ban", config=Path("c.yaml"))], seeds=[0, 1], baseline="ban")
    text = write_outputs(study, runs, tmp_path)
    assert "Generations of **ban**" in text
    assert all(line in text.splitlines() for line in generation_lines(runs)[1:] + lines[1:])


def test_paired_differences_appear_once_a_row_besides_the_baseline_has_runs(tmp_path) -> None:
    """A study whose other rows have not run yet gets no empty difference table (a header without a row)."""
    from kdray.compare.runner import write_outputs
    from kdray.compare.study import Row, Study

    study = Study(
        rows=[Row("base", Path("b.yaml")), Row("x", Path("x.yaml"))], seeds=[0, 1, 2], baseline="base"
    )
    alone = write_outputs(study, BASE, tmp_path)
    assert "Paired differences" not in alone and "| row - base |" not in alone
    both = write_outputs(study, BASE + X, tmp_path)
    assert "Paired differences against **base**" in both
    assert "| x | +2.00 ± 0.58 |" in both


def test_a_student_is_read_against_its_own_frozen_teacher_of_the_same_run(tmp_path) -> None:
    """Runs 0 and 1: students .72 / .74 at the selected epoch and .70 / .73 at the last, teachers .70 / .71: student
    minus teacher +2 and +3 points selected (mean +2.50, sd .707, se .50), 0 and +2 last (+1.00 ± 1.00)."""
    from kdray.compare.runner import teachers_of, write_outputs
    from kdray.compare.study import Row, Study
    from kdray.compare.table import teacher_lines

    def taught(seed, student, last, teacher):
        r = {**rec("self", seed, student, student, last, last), "teachers": {}}
        r["teachers"]["teacher"] = {"arch": "resnet8", "test_acc": teacher}
        return r

    runs = [taught(0, 0.72, 0.70, 0.70), taught(1, 0.74, 0.73, 0.71)]
    lines = teacher_lines(runs)
    assert lines[-1] == "| teacher (resnet8) | 70.50 ± 0.71 | +2.50 ± 0.50 | +1.00 ± 1.00 | 2 |"
    assert teacher_lines([rec("x", 0, 0.5, 0.5)]) == []
    text = write_outputs(Study([Row("self", Path("s.yaml"))], [0, 1], "self"), runs, tmp_path)
    assert "The frozen teachers of **self**" in text and lines[-1] in text.splitlines()
    # a run's frozen peers are its teachers; trained peers are not
    summary = {"peers": [{"name": "teacher", "arch": "resnet8", "frozen": True, "test_acc": 0.7},
                         {"name": "net", "arch": "resnet8", "test_acc": 0.72}]}  # fmt: skip
    assert teachers_of(summary) == {"teacher": {"arch": "resnet8", "test_acc": 0.7}}
