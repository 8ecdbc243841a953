"""The population's parts that both engines share: per-peer costs and the balanced thread counts."""

from __future__ import annotations

import pytest

from kdray.config import load_config
from kdray.errors import ConfigError
from kdray.models import count_flops, create_model
from kdray.population import Population, balanced_threads


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
    assert sum(threads) == 8 and threads == [1, 7]  # the large peer gets the CPUs; each at least one
    import torch

    assert torch.get_num_threads() == 7  # the worker of peer 1 runs with its share
    torch.set_num_threads(1)
    with pytest.raises(ConfigError, match="train.threads"):
        load_config(tiny_raw, ["train.threads=2"])
