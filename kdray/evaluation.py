"""Evaluation of a population on a split: per-peer accuracy, loss and calibration error (ECE), and the trainable
peers' ensemble. Everything is kept as sums, so that processes holding disjoint peers add their parts up
(:func:`merge_eval`) and every rank gets the numbers one process would compute (:func:`summarise_eval`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.config import ExperimentConfig

if TYPE_CHECKING:
    from kdray.population import Population

ECE_BINS = 15  # as the calibration literature (Guo et al. 2017) and the PS-KD paper report it


def calibration_sums(probs: Tensor, labels: Tensor) -> Tensor:
    """Per confidence bin (15 equal-width bins of max-probability): the sample count, the summed confidence and
    the number correct, as a (3, 15) float64 tensor; sums, so that batches and processes add up."""
    conf, pred = probs.max(1)
    bins = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
    out = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=probs.device)
    out[0].index_add_(0, bins, torch.ones_like(conf, dtype=torch.float64))
    out[1].index_add_(0, bins, conf.double())
    out[2].index_add_(0, bins, (pred == labels).double())
    return out.cpu()


def expected_calibration_error(sums: Tensor) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| from :func:`calibration_sums`."""
    count, conf, correct = sums
    total = float(count.sum())
    return float((conf - correct).abs().sum()) / total if total else float("nan")


@torch.no_grad()
def evaluate(pop: Population, split: str) -> dict[str, Any]:
    """Each local peer's summed correct count and CE over ``split`` ("val" or "test"), plus the sum of the
    trainable peers' softmax outputs (for the ensemble). Sums, so that processes can add them up. The first worker
    of a data-parallel peer evaluates it; its other workers add nothing."""
    if pop.shard[0] != 0:
        return {"n": 0, "correct": {}, "loss": {}, "calibration": {}, "probs_sum": None, "labels": None}
    modes = [p.net.training for p in pop.peers]
    for p in pop.peers:
        p.net.eval()
    correct = {p.index: torch.zeros((), dtype=torch.float64) for p in pop.peers}
    loss = {p.index: torch.zeros((), dtype=torch.float64) for p in pop.peers}
    calibration = {p.index: torch.zeros(3, ECE_BINS, dtype=torch.float64) for p in pop.peers}
    prob_chunks: list[Tensor] = []
    labels: list[Tensor] = []
    n = 0
    for batch in pop.data.eval_batches(split):
        batch = batch.to(pop.device, pop.dtype)
        probs_sum = None
        for p in pop.peers:
            logits = p.net(batch.x)["logits"].float()
            correct[p.index] += (logits.argmax(1) == batch.y).sum().double().cpu()
            loss[p.index] += F.cross_entropy(logits, batch.y, reduction="sum").double().cpu()
            calibration[p.index] += calibration_sums(logits.softmax(1), batch.y)
            if not p.frozen:
                pr = logits.softmax(1)
                probs_sum = pr if probs_sum is None else probs_sum + pr
        if probs_sum is not None:
            prob_chunks.append(probs_sum.cpu())
        labels.append(batch.y.cpu())
        n += len(batch.y)
    for p, mode in zip(pop.peers, modes):
        p.net.train(mode)
    return {
        "n": n,
        "correct": correct,
        "loss": loss,
        "calibration": calibration,
        "probs_sum": torch.cat(prob_chunks) if prob_chunks else None,
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
    }


def merge_eval(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluation sums of processes holding disjoint peers, as if one process held them all (rank order = peer
    order, so the ensemble's float sums are the same as in one process)."""
    probs_sum = None
    for part in parts:
        if part["probs_sum"] is not None:
            probs_sum = part["probs_sum"] if probs_sum is None else probs_sum + part["probs_sum"]
    return {
        "n": parts[0]["n"],
        "correct": {k: v for p in parts for k, v in p["correct"].items()},
        "loss": {k: v for p in parts for k, v in p["loss"].items()},
        "calibration": {k: v for p in parts for k, v in p["calibration"].items()},
        "probs_sum": probs_sum,
        "labels": parts[0]["labels"],
    }


def summarise_eval(cfg: ExperimentConfig, ev: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """Summed evaluation counts -> per-peer accuracy and loss, and the trainable peers' ensemble accuracy."""
    out: dict[str, float] = {}
    n = max(ev["n"], 1)
    for k, c in ev["correct"].items():
        name = cfg.peers[k].name
        out[f"{name}/{prefix}_acc"] = float(c) / n
        out[f"{name}/{prefix}_loss"] = float(ev["loss"][k]) / n
        out[f"{name}/{prefix}_ece"] = expected_calibration_error(ev["calibration"][k])
    if ev.get("probs_sum") is not None:
        probs = ev["probs_sum"] / sum(1 for p in cfg.peers if not p.frozen)
        out[f"ensemble/{prefix}_acc"] = float((probs.argmax(1) == ev["labels"]).double().mean())
        out[f"ensemble/{prefix}_ece"] = expected_calibration_error(calibration_sums(probs, ev["labels"]))
    return out
