"""What a model sees of the data (:class:`DataSpec`), one batch (:class:`Batch`), and the derived seeds.

Every random draw of the data layer comes from a private generator seeded by a tuple such as
``("shuffle", seed, epoch)``; the global RNG is never read or advanced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: its input shape and number of classes, and the split sizes."""

    num_classes: int
    in_channels: int
    image_size: int
    train_len: int  # what is trained on (after data.train_size and the carved validation split)
    val_len: int  # the validation split carved from the training set (0: none)
    test_len: int
    name: str


@dataclass
class Batch:
    """Inputs, labels and the samples' positions in the split they came from (int64). ``pair``: for each sample,
    another sample of the same class (CS-KD's class-wise pairs), when the method asked for them."""

    x: Tensor
    y: Tensor
    index: Tensor
    pair: Batch | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        x = self.x.to(device) if dtype is None or not self.x.is_floating_point() else self.x.to(device, dtype)
        pair = self.pair.to(device, dtype) if self.pair is not None else None
        return Batch(x, self.y.to(device), self.index.to(device), pair)

    def __len__(self) -> int:
        return len(self.y)

    def shard(self, m: int, count: int) -> Batch:
        """The m-th of ``count`` equal, contiguous slices (a data-parallel worker's part of a global batch)."""
        if count == 1:
            return self
        n = len(self.y) // count
        part = slice(m * n, (m + 1) * n)
        pair = self.pair.shard(m, count) if self.pair is not None else None
        return Batch(self.x[part], self.y[part], self.index[part], pair)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as ``("shuffle", seed, epoch)``.

    A fixed formula (BLAKE2b of the tuple) rather than arithmetic, so that the shuffle and augmentation streams
    of different (seed, epoch, step) never collide, and it is the same in every process and Python version
    (``hash()`` of a str is salted per process).
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A private CPU generator for ``parts``: data loading never touches the global RNG."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator
