"""Data: every peer sees the same batches, in the same order, with the same augmentation.

A training batch is a pure function of ``(seed, epoch, step)``: the epoch's permutation comes from a
``torch.Generator`` seeded by ``(seed, epoch)`` and the augmentation of step ``s`` from one seeded by
``(seed, epoch, s)``. Nothing here reads or advances the global RNG, so the in-process engine, each Ray worker
and a run resumed in the middle of an epoch all build bit-identical inputs, and the trainer's own random stream
(dropout, initialisation) is the same whether data was loaded or not. Every batch carries the sample indices,
because per-sample memories (PS-KD's last-epoch predictions) are keyed by them.

The package, one module per concern (dependencies point one way, towards :mod:`batches`):

- :mod:`kdray.data.batches`: :class:`DataSpec`, :class:`Batch` and the derived seeds;
- :mod:`kdray.data.augment`: pad-crop-flip augmentation and normalisation;
- :mod:`kdray.data.modules`: :class:`DataModule`, in memory or decoded from an ImageFolder;
- :mod:`kdray.data.formats`: readers (idx files, CIFAR's pickled batches, ImageFolder scanning);
- :mod:`kdray.data.fetch`: locating or fetching Fashion-MNIST and CIFAR;
- :mod:`kdray.data.synthetic`: the synthetic class-conditional set;
- :mod:`kdray.data.build`: :func:`build_data`, the factory from a :class:`~kdray.config.DataConfig`.
"""

from __future__ import annotations

from kdray.data.batches import Batch, DataSpec
from kdray.data.build import build_data
from kdray.data.fetch import locate_fashion_mnist
from kdray.data.modules import DataModule

__all__ = ["Batch", "DataModule", "DataSpec", "build_data", "locate_fashion_mnist"]
