"""Shared fixtures: tiny synthetic populations, a private MLflow store per test, Fashion-MNIST when present."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Small, fast and deterministic everywhere.
torch.set_num_threads(1)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "dataset": "synthetic",
        "batch_size": 16,
        "val_batch_size": 64,
        "val_split": 32,
        "synthetic": {"num_classes": 4, "channels": 1, "image_size": 12, "train_len": 128, "test_len": 64},
    },
    "peers": [
        {"arch": "resnet8", "arch_kwargs": {"width": 4}},
        {"arch": "resnet8", "arch_kwargs": {"width": 4}},
    ],
    "method": {"name": "dml"},
    "train": {
        "epochs": 1,
        "device": "cpu",
        "progress": False,
        "optimizer": {"name": "sgd", "lr": 0.05},
    },
    "tracking": {"enabled": False},
}


@pytest.fixture
def tiny_raw() -> dict:
    """A raw config dict for a 2-peer DML population on a 4-class synthetic set (fast on CPU): 96 training samples
    (6 steps of 16), 32 carved for validation, 64 test samples."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    """A data root holding Fashion-MNIST, or skip (set KDRAY_DATA, or run `kdray data fashion_mnist`)."""
    from kdray.data import locate_fashion_mnist
    from kdray.errors import DataError

    root = Path(os.environ.get("KDRAY_DATA", REPO / "data"))
    try:
        locate_fashion_mnist(root, download=False)
    except DataError as exc:
        pytest.skip(f"Fashion-MNIST not found: {exc}")
    return root
