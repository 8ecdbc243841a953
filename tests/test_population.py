"""The population's parts that both engines share: per-peer costs and the balanced thread counts."""

from __future__ import annotations

import pytest

from kdray.config import load_config
from kdray.engines.threads import balanced_threads, worker_threads
from kdray.errors import ConfigError
from kdray.models import count_flops, create_model
from kdray.population import Population


def test_forward_flops_of_a_linear_model_by_hand():
    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1 * 4 * 4, 10))
    assert count_flops(model, (1, 4, 4)) == 2 * 16 * 10  # one multiply and one add per weight
    assert count_flops(create_model("resnet14", 10, 1), (1, 28, 28)) > 2 * count_flops(
        create_model("resnet8", 10, 1), (1, 28, 28)
    )


def test_balance_shares_the_cpus_out_in_proportion_to_cost(tiny_raw):
    tiny_raw["peers"] = [
        {"arch": "resnet8", "arch_kwargs": {"width": 4}},
        {"arch": "resnet8", "arch_kwargs": {"width": 16}},  # ~16x the multiply-adds of width 4
    ]
    tiny_raw["train"].pop("threads", None)
    tiny_raw["engine"] = {"name": "ray", "placement": {"cpus_per_peer": 4, "balance": "threads"}}
    cfg = load_config(tiny_raw)
    pop = Population(cfg, local_ids=[1])
    costs = [p.flops for p in pop.spec.peers]
    assert costs[1] > 10 * costs[0]
    threads = balanced_threads(cfg, pop.spec)
    # shares 0.47 and 7.53 of 8 CPUs: the small peer keeps one thread (it waits at the exchange most of each step)
    # and the large one gets all eight
    assert threads == [1, 8]
    assert worker_threads(cfg, pop.spec, 1) == 8  # the worker of peer 1 runs with its share
    with pytest.raises(ConfigError, match="train.threads"):
        load_config(tiny_raw, ["train.threads=2"])


# (forward FLOPs per peer, cpus_per_peer, threads expected)
BALANCE_CASES = [
    # ResNet-8 + WRN-16-2 on two CPUs: shares 0.22 and 1.78 round to 1 and 2
    ([18.7, 154.0], 1, [1, 2]),
    # the main job's pair: 0.63 and 1.37
    ([18.7, 40.4], 1, [1, 1]),
    # three equal peers on two CPUs: one thread each, as without balancing
    ([1.0, 1.0, 1.0], 2 / 3, [1, 1, 1]),
    # 1.33 each rounds to 1: the CPU left over goes to a largest remainder
    ([1.0, 1.0, 1.0], 4 / 3, [2, 1, 1]),
    # exactly in proportion
    ([3.0, 1.0], 2, [3, 1]),
]


@pytest.mark.parametrize(("flops", "cpus", "expected"), BALANCE_CASES)
def test_balanced_threads_rounds_each_share_to_the_nearest_thread(flops, cpus, expected):
    from types import SimpleNamespace

    spec = SimpleNamespace(peers=[SimpleNamespace(flops=f, frozen=False) for f in flops])
    cfg = SimpleNamespace(engine=SimpleNamespace(placement=SimpleNamespace(cpus_per_peer=cpus)))
    assert balanced_threads(cfg, spec) == expected
