"""A study's pictures: optimisation history, parameter importances, and PBT's schedule of each perturbed value."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kdray.plots import save_figure

STATUS_COLOURS = {"finished": "tab:blue", "stopped": "tab:orange", "diverged": "tab:red", "failed": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, study: dict[str, Any], trials: list, xlabel: str, title: str, path: Path) -> Path:
    """A trial-objective plot's legend (one entry per status present), labels, grid; saved and closed."""
    for status, colour in STATUS_COLOURS.items():
        if any(t["status"] == status for t in trials):
            ax.scatter([], [], color=colour, label=status)
    ax.set(xlabel=xlabel, ylabel=f"objective ({study['metric']})", title=f"{study['name']}: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_history(study: dict[str, Any], path: Path) -> Path | None:
    """Each trial's final objective in start order, coloured by status, and the best so far (finished trials)."""
    trials = study["trials"]
    if not trials:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    best, best_line = -math.inf, []
    for i, t in enumerate(trials):
        y = t["objective"]
        if y is not None:
            ax.scatter(i, y, color=STATUS_COLOURS.get(t["status"], "grey"), zorder=3)
            if t["status"] == "finished":
                best = max(best, y)
        else:
            ax.scatter(i, 0, color="tab:red", marker="x", zorder=3)
        best_line.append(best if best > -math.inf else None)
    xs = [i for i, b in enumerate(best_line) if b is not None]
    if xs:
        ax.step(xs, [best_line[i] for i in xs], where="post", color="k", label="best finished")
    return _finish(plt, fig, ax, study, trials, "trial (start order)", "history", path)


def param_importances(study: dict[str, Any]) -> dict[str, float]:
    """Optuna's importance evaluator over the trials that reported an objective (an empty dict when fewer than two
    trials or no variation)."""
    import optuna

    from kdray.search.space import parse_space

    space = parse_space(study["space"])
    dists = {k: p.to_optuna() for k, p in space.params.items()}
    done = [
        t
        for t in study["trials"]
        if t["objective"] is not None and all(v is not None for v in t["values"].values())
    ]
    if len(done) < 2 or len({t["objective"] for t in done}) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(direction="maximize")
    for t in done:
        params = {k: space.params[k].clip(v) for k, v in t["values"].items()}
        ostudy.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t["objective"]))
    try:
        return dict(optuna.importance.get_param_importances(ostudy))
    except (RuntimeError, ValueError):
        return {}


def plot_importances(study: dict[str, Any], path: Path) -> Path | None:
    imp = param_importances(study)
    if not imp:
        return None
    plt = _pyplot()
    keys = sorted(imp, key=imp.get)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(keys) + 1.5))
    ax.barh(keys, [imp[k] for k in keys], color="tab:blue")
    ax.set(
        xlabel="importance (share of the objective's variance)",
        title=f"{study['name']}: parameter importances",
    )
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def plot_pbt_schedule(study: dict[str, Any], key: str, path: Path) -> Path | None:
    """The value of ``key`` in each trial, epoch by epoch; a marker where the trial copied another (exploit)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for t in study["trials"]:
        pts = [(r["epoch"], r[f"hp/{key}"]) for r in t["history"] if r.get(f"hp/{key}") is not None]
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts), marker=".", label=t["trial_id"])
        for e in t["exploits"]:
            after = [v for ep, v in pts if ep > e["epoch"]]
            if after:
                ax.scatter(e["epoch"] + 1, after[0], marker="*", s=120, color=line.get_color(), zorder=3)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="epoch", ylabel=key, title=f"{study['name']}: PBT schedule of {key} (* = exploit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_pareto(study: dict[str, Any], path: Path) -> Path | None:
    """Objective against the trained peers' parameters, every trial with a size; the Pareto front as a staircase."""
    trials = [t for t in study["trials"] if t.get("params") is not None and t["objective"] is not None]
    if not trials:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        ax.scatter(
            t["params"] / 1e6,
            t["objective"],
            color=STATUS_COLOURS.get(t["status"], "grey"),
            edgecolor="k" if t.get("pareto") else "none",
            s=60 if t.get("pareto") else 30,
            zorder=3,
        )
    front = study.get("pareto") or []
    if front:
        ax.step(
            [t["params"] / 1e6 for t in front],
            [t["objective"] for t in front],
            where="post",
            color="k",
            label="Pareto front (finished)",
        )
        for t in front:
            ax.annotate(t["trial_id"][-5:], (t["params"] / 1e6, t["objective"]), fontsize=7)
    xlabel = "parameters of the trained peers (millions)"
    return _finish(plt, fig, ax, study, trials, xlabel, "accuracy vs size", path)


def plot_study(study: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [plot_history(study, folder / "history.png"), plot_importances(study, folder / "importances.png")]
    if study["settings"].get("multi_objective"):
        paths.append(plot_pareto(study, folder / "pareto.png"))
    if study["settings"]["scheduler"] == "pbt":
        for key in study["space"]["perturb"]:
            paths.append(plot_pbt_schedule(study, key, folder / f"pbt_{key}.png"))
    return [p for p in paths if p is not None]
