"""Born-again networks: multi-generation self-distillation (Furlanello, Lipton, Tschannen, Itti, Anandkumar, "Born
Again Neural Networks", ICML 2018), built on stages.

A config with ``generations:`` trains N generations of the same population in one run::

    peers: [{name: net, arch: resnet8}]          # generation 1: this population, with the config's own method
    method: {name: independent}
    generations:
      count: 4                                  # generations 1..4
      labels: true                              # false: the students learn from the teacher's soft targets only
      method: {name: kd, temperature: 1.0, weights: {ce: 1.0, kd: 1.0}}    # generations 2..N (this is the default)
      teacher_checkpoint: last                  # best: each generation teaches from its selected epoch (best.pt)

Generation 1 is the config itself (its method: ``independent``, or a DML population of K peers). Generation k + 1
trains fresh peers of the same architectures with the ``generations.method`` (Hinton KD by default) from *every*
peer of generation k, frozen, in eval mode, loaded from its final weights (``last.pt``, as in the paper, where each
generation trains to the end of its schedule; ``teacher_checkpoint: best`` hands on its selected epoch, ``best.pt``,
instead: the two differ where a generation fits label noise late in training); with K peers each student
learns from the mean of the K teachers' KL terms, and no mutual term is added inside generations 2..N. The paper's
BAN students learn from the teacher's soft targets only (``labels: false``: the CE weight is 0); with
``labels: true`` they also see the labels. A ``generations.method`` named ``kd`` is merged over the default above
(``{temperature: 2}`` keeps CE 1 and KD 1).

Every generation is trained from scratch: its students get initial weights of their own (``init_seed: k`` for
generation k, or the peer's ``init_seed + k - 1``), while the run seed, and with it the carved validation split, the
batch order and the augmentation, stays the same for every generation (a different validation split would contain
the previous generations' training images).

Each finished generation stores the mean softmax of its peers on the validation and test splits
(``stages/gen<k>/predictions.pt``, from its selected checkpoint ``best.pt``); the report holds every generation's
accuracy and the born-again ensemble of generations 1..k (the mean of the stored softmaxes), and ``generations.png``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from kdray.errors import ConfigError, KdrayError
from kdray.plots import save_figure

DEFAULT_METHOD = {"name": "kd", "temperature": 1.0, "weights": {"ce": 1.0, "kd": 1.0}}
PREDICTIONS = "predictions.pt"
MAX_GENERATIONS = 100  # 100 full trainings in one run; a larger count is a slip (2**63 would fill any memory)


def expand_generations(raw: dict[str, Any]) -> dict[str, Any]:
    """The staged config that ``generations:`` stands for (stages ``gen1`` .. ``gen<N>``)."""
    gens = raw.get("generations")
    if isinstance(gens, int) and not isinstance(gens, bool):
        gens = {"count": gens}  # ``generations: 4`` is ``generations: {count: 4}``
    if not isinstance(gens, dict):
        raise ConfigError(
            "generations", gens, "a count such as 4, or a mapping such as {count: 4, labels: true}"
        )
    unknown = sorted(set(gens) - {"count", "labels", "method", "teacher_checkpoint"})
    if unknown:
        raise ConfigError(
            f"generations.{unknown[0]}",
            gens[unknown[0]],
            "accepted keys: count, labels, method, teacher_checkpoint",
        )
    count = gens.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 2 <= count <= MAX_GENERATIONS:
        raise ConfigError(
            "generations.count", count,
            f"an integer from 2 (generation 1 and at least one more) to {MAX_GENERATIONS} (each generation trains "
            "the population from scratch; the count is checked before its stages are written out)",
        )  # fmt: skip
    if "stages" in raw:
        raise ConfigError("generations", "with stages", "give either generations: or stages:, not both")
    peers = raw.get("peers")
    if not isinstance(peers, list) or not peers:
        raise ConfigError("peers", peers, "a list of peers, each a mapping such as {arch: resnet8}")
    for i, p in enumerate(peers):
        if not isinstance(p, dict):
            raise ConfigError(f"peers[{i}]", p, "a mapping such as {arch: resnet8}")
        if p.get("frozen"):
            raise ConfigError(
                f"peers[{i}].frozen",
                True,
                "generations need a population of trainable peers (no frozen teacher)",
            )
    if not isinstance(raw.get("method"), dict):
        raise ConfigError(
            "method", raw.get("method"), "generation 1's method, a mapping such as {name: independent}"
        )
    labels = gens.get("labels", True)
    if not isinstance(labels, bool):
        raise ConfigError(
            "generations.labels", labels, "true (CE + KD) or false (the teacher's soft targets only)"
        )
    which = gens.get("teacher_checkpoint", "last")
    if which not in ("last", "best"):
        raise ConfigError(
            "generations.teacher_checkpoint", which,
            "last (each generation teaches from its final weights, last.pt) or best (from its selected epoch, "
            "best.pt, chosen on data.select_on)",
        )  # fmt: skip
    method = gens.get("method") or {}
    if not isinstance(method, dict):
        raise ConfigError("generations.method", method, "a method mapping such as {name: kd, temperature: 2}")
    # a KD method: the user's settings over the born-again defaults (CE 1, KD 1, T 1)
    if method.get("name", "kd") == "kd":
        method = {**DEFAULT_METHOD, **copy.deepcopy(method),
                  "weights": {**DEFAULT_METHOD["weights"], **(method.get("weights") or {})}}  # fmt: skip
    else:
        method = copy.deepcopy(method)
    if not labels:
        method.setdefault("weights", {})["ce"] = 0.0
    names = [p.get("name") or f"peer{i}" for i, p in enumerate(peers)]
    base = {k: v for k, v in raw.items() if k != "generations"}
    base.pop("peers")
    first_method = base.pop("method")
    stages = [
        {"name": "gen1", "method": first_method, "peers": [{**p, "name": n} for p, n in zip(peers, names)]}
    ]
    for k in range(2, count + 1):
        teachers = [
            {
                **p,
                "name": f"gen{k - 1}_{n}",
                "frozen": True,
                "from_stage": f"gen{k - 1}",
                "from_stage_checkpoint": which,
                "checkpoint_peer": n,
            }
            for p, n in zip(peers, names)
        ]
        # fresh students, from initial weights of their own (the run seed, and with it the validation split, the
        # batch order and the augmentation, stays the generation 1's)
        students = [{**p, "name": n, "init_seed": _init_seed(p, k)} for p, n in zip(peers, names)]
        stages.append({"name": f"gen{k}", "method": copy.deepcopy(method), "peers": teachers + students})
    return {**base, "stages": stages}


def _init_seed(peer: dict[str, Any], k: int) -> int:
    """Generation k's initial-weight seed for a peer: k, or the peer's own ``init_seed`` + k - 1."""
    own = peer.get("init_seed")
    return k if own is None else int(own) + k - 1


def store_predictions(stage_dir: Path) -> dict[str, torch.Tensor]:
    """The generation's mean softmax on both splits and the labels, from its selected checkpoint (``best.pt``, else
    ``last.pt``), written once (atomically) and read back from then on."""
    import io

    from kdray.checkpoint import write_atomic
    from kdray.errors import CheckpointError

    path = stage_dir / PREDICTIONS
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - damaged: recompute it from the checkpoint
            path.unlink()
    from kdray.run import predict

    checkpoints = stage_dir / "checkpoints"
    chosen = checkpoints / "best.pt" if (checkpoints / "best.pt").is_file() else checkpoints / "last.pt"
    if not chosen.is_file():
        raise CheckpointError(f"generation folder {stage_dir} has no checkpoint to predict with")
    stored: dict[str, torch.Tensor] = {}
    for split in ("val", "test"):
        stored[f"{split}_probs"], stored[f"{split}_labels"] = predict(chosen, split)
    buf = io.BytesIO()
    torch.save(stored, buf)
    write_atomic(path, buf.getvalue())
    return stored


def ensemble_accuracies(probs: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Each generation's accuracy, and the accuracy of the ensemble of generations 1..k (the mean of their
    softmaxes) for every k."""
    alone = [float((p.argmax(1) == labels).double().mean()) for p in probs]
    ensemble = []
    total = torch.zeros_like(probs[0])
    for k, p in enumerate(probs, start=1):
        total = total + p
        ensemble.append(float(((total / k).argmax(1) == labels).double().mean()))
    return alone, ensemble


def generation_report(out_dir: Path, names: list[str]) -> dict[str, Any]:
    """Per generation: its accuracy on val and test and the born-again ensemble's up to it; ``generations.png``."""
    stored = [store_predictions(out_dir / "stages" / name) for name in names]
    report: dict[str, Any] = {"generations": names}
    for split in ("val", "test"):
        for name, s in zip(names, stored):
            if not torch.equal(s[f"{split}_labels"], stored[0][f"{split}_labels"]):
                raise KdrayError(
                    f"generation {name} was evaluated on other {split} samples than {names[0]} (a changed seed or "
                    "data setting?): the ensemble of generations needs the same samples in the same order"
                )
        alone, ensemble = ensemble_accuracies(
            [s[f"{split}_probs"] for s in stored], stored[0][f"{split}_labels"]
        )
        report[f"{split}_acc"], report[f"ensemble_{split}_acc"] = alone, ensemble
    plot_generations(report, out_dir / "generations.png")
    return report


def plot_generations(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, len(report["generations"]) + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("val", "--"), ("test", "-")):
        ax.plot(ks, report[f"{split}_acc"], style, marker="o", label=f"generation alone ({split})")
        ax.plot(ks, report[f"ensemble_{split}_acc"], style, marker="s", label=f"ensemble of 1..k ({split})")
    ax.set(xlabel="generation", ylabel="accuracy", title="born-again generations")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
