"""The comparison drawn: each row's test accuracy (peer mean, mean ± std over seeds; the selected checkpoint and the
last epoch side by side), and each row's paired difference against the baseline (mean ± one standard error)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdray.compare.table import DIFFS, paired_diff, peer_mean, row_curves, stat


def _pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(records: Sequence[dict[str, Any]], labels: Sequence[str], baseline: str, path: Path) -> None:
    plt = _pyplot()
    labels = [lab for lab in labels if any(r["label"] == lab for r in records)]
    if not labels:
        return
    with_diffs = len(labels) > 1 and any(r["label"] == baseline for r in records)
    fig, axes = plt.subplots(1, 2 if with_diffs else 1, figsize=(11 if with_diffs else 6, 0.5 * len(labels) + 2),
                             squeeze=False)  # fmt: skip
    ax = axes[0][0]
    ys = range(len(labels))
    for offset, key, name in (
        (-0.17, "test_acc", "selected (best.pt)"),
        (0.17, "last_test_acc", "last epoch"),
    ):
        stats = [stat([peer_mean(r, key) for r in records if r["label"] == lab]) for lab in labels]
        shown = [(y + offset, s) for y, s in zip(ys, stats) if s is not None]
        if shown:
            ax.errorbar([100 * s["mean"] for _, s in shown], [y for y, _ in shown],
                        xerr=[100 * s["std"] for _, s in shown], fmt="o", capsize=3, label=name)  # fmt: skip
    ax.set(yticks=list(ys), yticklabels=labels, xlabel="test accuracy, peer mean (%): mean ± std over seeds")
    ax.invert_yaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if with_diffs:
        ax = axes[0][1]
        base = [r for r in records if r["label"] == baseline]
        for offset, title in ((-0.17, "peer mean (selected)"), (0.17, "peer mean (last epoch)")):
            points = []
            for y, lab in zip(ys, labels):
                d = paired_diff([r for r in records if r["label"] == lab], base, DIFFS[title])
                if d is not None and lab != baseline:
                    points.append((y + offset, 100 * d["mean"], 100 * (d["se"] or 0.0)))
            if points:
                ax.errorbar([p[1] for p in points], [p[0] for p in points], xerr=[p[2] for p in points], fmt="o",
                            capsize=3, label=title)  # fmt: skip
        ax.axvline(0, color="grey", linewidth=1)
        ax.set(
            yticks=list(ys), yticklabels=labels, xlabel=f"paired difference vs {baseline} (points): mean ± SE"
        )
        ax.invert_yaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_val_curves(records: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path | None:
    """Each row's validation accuracy per epoch (peer mean; the mean over seeds, a band of ± one std), its peak
    marked: where a network starts fitting label noise, its curve peaks and falls. None if no run has a curve."""
    from kdray.plots import save_figure

    rows = [(label, curves) for label in labels if (curves := row_curves(records, label))]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curves in rows:
        points = [stat(values) for values in zip(*curves)]
        mean = [100 * s["mean"] for s in points]
        std = [100 * s["std"] for s in points]
        epochs = range(1, len(mean) + 1)
        (line,) = ax.plot(epochs, mean, label=f"{label} ({len(curves)} seeds)", linewidth=1.4)
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)  # fmt: skip
        peak = max(range(len(mean)), key=mean.__getitem__)
        ax.plot([peak + 1], [mean[peak]], "v", color=line.get_color(), markersize=7)
    ax.set(xlabel="epoch", ylabel="validation accuracy, peer mean (%)",
           title="validation curves: mean ± std over seeds (▼ the mean curve's peak)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
