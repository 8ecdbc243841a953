"""How Ray workers tell the driver what is happening: typed events posted to a small actor the driver drains.

Workers post fire-and-forget (``board.post.remote(event)``): a live progress event a few times a second per rank,
a per-step row every ``train.log_every_steps`` steps, and rank 0's start, first step, epoch ends and finish. The
driver drains the board a few times a second (progress bar, MLflow, epoch callbacks) and raises the stop flag
the workers poll when the user asks the run to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkersStarted:
    """Every worker of a (re)started group is built and about to train: where each peer runs."""

    placement: list[dict[str, Any]]


@dataclass(frozen=True)
class FirstStep:
    time: float  # unix time the first step of this attempt ended


@dataclass(frozen=True)
class Live:
    """One rank's running means since its previous Live event (the driver's progress bar)."""

    rank: int
    epoch: int
    steps_done: int  # steps of the epoch done
    steps: int  # steps per epoch
    means: dict[str, float]
    exchange_ms: float | None  # this rank's exchange time per step over the window
    step_ms: float | None = None  # this rank's wall time per step over the window


@dataclass(frozen=True)
class StepRow:
    """One rank's per-step row (its own peer's keys) at a global step."""

    rank: int
    step: int
    row: dict[str, float]


@dataclass(frozen=True)
class EpochDone:
    epoch: int
    metrics: dict[str, float]
    checkpoint: str | None


@dataclass(frozen=True)
class Ended:
    """The workers ended together on an error every rank reached at the same point (a stop request, a diverged
    epoch: both are decided on all-gathered values). It is not a failure: Ray Train would restart the group for it
    (and with ``max_failures: -1`` never stop), so the workers return and the driver raises it."""

    error: Exception


@dataclass(frozen=True)
class Finished:
    history: list[dict[str, float]]
    best: dict[str, Any]
    peer_params: dict[str, int]
    steps_per_epoch: int


class ProgressBoard:
    """The actor (0 CPUs): a list of events since the last drain, and a stop flag."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.stop = False

    def post(self, event: Any) -> None:
        self.events.append(event)

    def drain(self) -> list[Any]:
        events, self.events = self.events, []
        return events

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def node_ip(self) -> str:
        """Where the board runs (``ray_run.json`` records it: a run's driver lives as long as this node)."""
        import ray

        return ray.util.get_node_ip_address()


def create_board(namespace: str | None = None, name: str | None = None):
    """A board actor; a named one (``name``) is found by processes that were not handed it (Tune trials). It lives on
    the head node (a cluster that loses its head is gone anyway): on another node it would die with that node and
    take the run's driver with it, even where the workers could restart on the nodes left
    (``fault_tolerance.max_failures``). The affinity is hard: a soft one let Ray place the board on a worker node
    when the head was slow to lease it a worker process (seen on a loaded 2-core loopback cluster, whose head starts
    one worker at a time), and losing that node then ended the run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"namespace": namespace}
    try:
        heads = [
            n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"]
        ]
    except Exception:  # noqa: BLE001 - no node list: Ray places it
        heads = []
    if heads:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=heads[0], soft=False)
    if name is not None:
        options.update(name=name, get_if_exists=True)
    return ray.remote(num_cpus=0)(ProgressBoard).options(**options).remote()
