"""Peers of unequal numbers of workers: what the regrouping refuses (the maths: tests/engines/test_data_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from kdray.exchange import ExchangeError, LocalExchange
from kdray.exchange.regroup import RegroupedExchange


def _leader() -> RegroupedExchange:
    inner = LocalExchange()
    return RegroupedExchange(inner, peer=0, device=torch.device("cpu"), group=None, objects=None, ranks=[0])


def test_only_per_sample_signals_can_be_regrouped():
    ex = _leader()
    assert ex._rows("logit", {"logits": torch.zeros(8, 4), "feat": torch.zeros(8, 2, 3, 3)}) == 8
    assert ex._rows("logit", {}) == 0
    with pytest.raises(ExchangeError, match=r"phase 'logit': peer 0 publishes \{'logits': 8, 'temp': None\}"):
        ex._rows("logit", {"logits": torch.zeros(8, 4), "temp": torch.tensor(1.0)})
    with pytest.raises(ExchangeError, match="per-sample signals only"):
        ex._rows("logit", {"logits": torch.zeros(8, 4), "proto": torch.zeros(4, 16)})
    # one row per row of the phase's inputs, in the method's blocks
    assert ex._rows("div", {"logits": torch.zeros(8, 4)}, 2, torch.zeros(8, 1, 3, 3)) == 8
    with pytest.raises(ExchangeError, match=r"its inputs 16 rows: .*in 1 block\(s\): Method.input_blocks"):
        ex._rows("div", {"logits": torch.zeros(8, 4)}, 1, torch.zeros(16, 1, 3, 3))
    with pytest.raises(ExchangeError, match=r"in 2 block\(s\)"):
        ex._rows("div", {"logits": torch.zeros(7, 4)}, 2)


def test_the_first_worker_and_it_alone_exchanges_between_peers():
    with pytest.raises(ValueError, match="the first worker of a peer, and it alone"):
        RegroupedExchange(None, peer=0, device=torch.device("cpu"), group=None, objects=None, ranks=[0])
