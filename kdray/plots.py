"""Learning curves as PNG: what people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

from kdray.config import ExperimentConfig


def plot_curves(cfg: ExperimentConfig, history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for p in cfg.peers:
        pts = [(h["epoch"], h[f"{p.name}/val_acc"]) for h in history if f"{p.name}/val_acc" in h]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", label=p.name if p.name == p.arch else f"{p.name} ({p.arch})")
        terms = sorted({k for h in history for k in h if k.startswith(f"{p.name}/loss_")})
        for term in terms:
            ys = [h.get(term) for h in history]
            ax_loss.plot(epochs, ys, marker=".", label=term)
    ens = [(h["epoch"], h["ensemble/val_acc"]) for h in history if "ensemble/val_acc" in h]
    if ens:
        ax_acc.plot(*zip(*ens), "k--", marker="s", label="ensemble")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title=f"{cfg.name}: {cfg.method.name}")
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="loss terms per peer")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_loss.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
