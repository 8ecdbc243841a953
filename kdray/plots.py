"""Learning curves as PNG: what people would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kdray.config import ExperimentConfig
from kdray.data.augment import NORMALISATION
from kdray.models.sync_bn import unsynced
from kdray.seeds import seed_for

if TYPE_CHECKING:
    from kdray.population import Population


def plot_curves(
    cfg: ExperimentConfig,
    history: list[dict[str, float]],
    path: Path,
    run_dir: Path | None = None,
    steps_per_epoch: int | None = None,
) -> Path:
    """Validation accuracy per epoch (each peer, the ensemble) and the training loss terms per peer: per step
    when the run logged per-step rows (``steps.jsonl``), else per epoch. The x axis is in epochs either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from kdray.metrics import read_step_rows

    epochs = [h["epoch"] for h in history]
    rows = read_step_rows(run_dir) if run_dir is not None and steps_per_epoch else []
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for p in cfg.peers:
        pts = [(h["epoch"], h[f"{p.name}/val_acc"]) for h in history if f"{p.name}/val_acc" in h]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", label=p.name if p.name == p.arch else f"{p.name} ({p.arch})")
        terms = sorted({k for h in history for k in h if k.startswith(f"{p.name}/loss_")})
        for term in terms:
            per_step = [(r["step"], r[term]) for r in rows if term in r]
            if per_step and steps_per_epoch:
                xs, ys = zip(*per_step)
                ax_loss.plot([x / steps_per_epoch for x in xs], ys, lw=1, label=term)
            else:
                ax_loss.plot(epochs, [h.get(term) for h in history], marker=".", label=term)
    ens = [(h["epoch"], h["ensemble/val_acc"]) for h in history if "ensemble/val_acc" in h]
    if ens:
        ax_acc.plot(*zip(*ens), "k--", marker="s", label="ensemble")
    split = "test (selection split)" if cfg.data.select_on == "test" else "validation"
    ax_acc.set(xlabel="epoch", ylabel=f"{split} accuracy", title=f"{cfg.name}: {cfg.method.name}")
    per = "running mean per logged step" if rows and steps_per_epoch else "epoch mean"
    ax_loss.set(xlabel="epoch", ylabel=f"training loss ({per})", title="loss terms per peer")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:  # nothing evaluated (select_on: last, no validation split)
        ax_acc.legend(fontsize=8)
    ax_loss.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay ``fig`` out, write it as a PNG atomically (a killed run never leaves half a picture), close it."""
    import io

    import matplotlib.pyplot as plt

    from kdray.checkpoint import write_atomic

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def save_image_grid(images, path: Path, columns: int = 8) -> Path:
    """Images (N x C x H x W, values in [0, 1]) as one grid PNG, written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from kdray.checkpoint import write_atomic

    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i in range(n):
        r, k = divmod(i, columns)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = images[i]
    fig = plt.figure(figsize=(columns * 0.6, rows * 0.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    ax.imshow(grid[0] if c == 1 else grid.permute(1, 2, 0), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def generator_preview(pop: Population, epoch: int) -> Tensor | None:
    """The method's images of this epoch (:meth:`Method.preview`) as displayable pixels in [0, 1], or None."""
    rng = torch.Generator().manual_seed(seed_for(pop.cfg.seed, "preview", epoch))
    shared = pop.shared.module if pop.shared else None
    with unsynced(shared):  # rank 0 alone draws the preview: no statistics summed over a peer's workers
        images = pop.method.preview(shared, rng)
    if images is None:
        return None
    images = images.detach().float().cpu()
    stats = NORMALISATION.get(pop.data.spec.name)
    if stats is not None:  # undo the dataset's normalisation
        mean = torch.tensor(stats[0]).view(1, -1, 1, 1)
        std = torch.tensor(stats[1]).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)
    lo, hi = images.amin(), images.amax()
    return (images - lo) / (hi - lo).clamp_min(1e-8)
