"""Data modules: the train and validation splits of one dataset, served as deterministic batches.

In-memory sets (Fashion-MNIST, CIFAR-10/100, synthetic) are held as uint8 (synthetic: float) tensors and a batch
is a slice, augmented vectorised on the batch: no DataLoader, no worker processes. An ImageFolder is decoded
from disk by a DataLoader whose batch sampler is built from the same permutation; its augmentation is seeded per
sample by ``(seed, epoch, index)`` so it does not depend on which worker process decodes the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdray.data.augment import NORMALISATION, normalise, pad_crop_flip
from kdray.data.batches import Batch, DataSpec, seeded_generator
from kdray.errors import DataError


class DataModule:
    """The train and validation splits of one dataset, served as deterministic batches.

    Training batches drop the last partial batch (every step has the same batch size on every peer);
    validation batches come in file order, unaugmented, and keep the last partial batch.
    """

    def __init__(self, spec: DataSpec, *, seed: int, batch_size: int, val_batch_size: int) -> None:
        if spec.train_len < batch_size:
            raise DataError(
                f"data.batch_size = {batch_size} but the training set of '{spec.name}' has only {spec.train_len} "
                f"samples (after data.train_size), so an epoch would have no step; use a batch size of at most "
                f"{spec.train_len} or more training samples"
            )
        self.spec = spec
        self.seed = seed
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size

    def steps_per_epoch(self) -> int:
        """Full batches per epoch: the last partial batch is dropped so every step has the same batch size."""
        return self.spec.train_len // self.batch_size

    def epoch_indices(self, epoch: int) -> Tensor:
        """The permutation of the training set used in ``epoch`` (int64); depends only on (seed, epoch)."""
        return torch.randperm(self.spec.train_len, generator=seeded_generator("shuffle", self.seed, epoch))

    def train_batches(self, epoch: int, start_step: int = 0, max_steps: int | None = None) -> Iterator[Batch]:
        """Batches ``start_step, start_step + 1, ...`` of ``epoch``: at most ``max_steps`` of them.

        The same as the tail of the full epoch from ``start_step`` (so a run resumed mid-epoch continues
        exactly); the skipped batches are never materialised.
        """
        perm = self.epoch_indices(epoch)
        for step in self._steps(start_step, max_steps):
            index = perm[step * self.batch_size : (step + 1) * self.batch_size]
            x, y = self._train_batch(index, epoch, step)
            yield Batch(x, y, index)

    def val_batches(self) -> Iterator[Batch]:
        """The validation split in order, unaugmented, the last partial batch included."""
        for start in range(0, self.spec.val_len, self.val_batch_size):
            index = torch.arange(start, min(start + self.val_batch_size, self.spec.val_len))
            x, y = self._val_batch(index)
            yield Batch(x, y, index)

    def _steps(self, start_step: int, max_steps: int | None) -> range:
        steps = self.steps_per_epoch()
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must be in [0, {steps}] (steps per epoch), got {start_step}")
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 or None, got {max_steps}")
        end = steps if max_steps is None else min(steps, start_step + max_steps)
        return range(start_step, end)

    def _train_batch(self, index: Tensor, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _val_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class InMemoryData(DataModule):
    """A dataset held in memory: batches are slices, augmented vectorised with a generator seeded per step.

    ``train_x``/``val_x`` are uint8 pixels (normalised per batch with ``mean``/``std``) or, when ``mean`` is
    None, float inputs that are already normalised. ``crop_padding`` None means no augmentation.
    """

    def __init__(
        self,
        spec: DataSpec,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        *,
        seed: int,
        batch_size: int,
        val_batch_size: int,
        crop_padding: int | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        super().__init__(spec, seed=seed, batch_size=batch_size, val_batch_size=val_batch_size)
        self.train_x, self.train_y = train
        self.val_x, self.val_y = val
        self.crop_padding = crop_padding
        self.mean, self.std = mean, std

    def _inputs(self, x: Tensor) -> Tensor:
        return x if self.mean is None else normalise(x, self.mean, self.std)

    def _train_batch(self, index: Tensor, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        x = self.train_x[index]
        if self.crop_padding:
            x = pad_crop_flip(x, self.crop_padding, seeded_generator("augment", self.seed, epoch, step))
        return self._inputs(x), self.train_y[index]

    def _val_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._inputs(self.val_x[index]), self.val_y[index]


class _ImageFiles(Dataset):
    """Decodes, resizes, augments and normalises one image; keyed by ``(epoch, index)``, epoch None for eval.

    The key carries the epoch so that a worker process needs no shared state to seed the augmentation.
    """

    def __init__(
        self, samples: list[tuple[str, int]], image_size: int, crop_padding: int | None, seed: int
    ) -> None:
        self.samples = samples
        self.image_size = image_size
        self.crop_padding = crop_padding
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int | None, int]) -> tuple[Tensor, int, int]:
        from PIL import Image

        epoch, i = key
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from None
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]
        if epoch is not None and self.crop_padding:
            x = pad_crop_flip(x, self.crop_padding, seeded_generator("augment-sample", self.seed, epoch, i))
        mean, std = NORMALISATION["imagefolder"]
        return normalise(x, mean, std)[0], label, i


class ImageFolderData(DataModule):
    """Class-per-folder images decoded by a DataLoader (``num_workers`` processes) in the epoch's order."""

    def __init__(
        self,
        spec: DataSpec,
        train: _ImageFiles,
        val: _ImageFiles,
        *,
        seed: int,
        batch_size: int,
        val_batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__(spec, seed=seed, batch_size=batch_size, val_batch_size=val_batch_size)
        self.train_files, self.val_files = train, val
        self.num_workers = num_workers

    def _loader(self, files: _ImageFiles, keys: list[list[tuple[int | None, int]]]) -> Iterator[Batch]:
        # An explicit generator: without one the DataLoader draws its worker base seed from the global RNG.
        loader = DataLoader(
            files, batch_sampler=keys, num_workers=self.num_workers, generator=seeded_generator("loader")
        )
        for x, y, index in loader:
            yield Batch(x, y, index)

    def train_batches(self, epoch: int, start_step: int = 0, max_steps: int | None = None) -> Iterator[Batch]:
        perm = self.epoch_indices(epoch).tolist()
        b = self.batch_size
        keys = [[(epoch, i) for i in perm[s * b : (s + 1) * b]] for s in self._steps(start_step, max_steps)]
        return self._loader(self.train_files, keys)

    def val_batches(self) -> Iterator[Batch]:
        n, b = self.spec.val_len, self.val_batch_size
        keys = [[(None, i) for i in range(s, min(s + b, n))] for s in range(0, n, b)]
        return self._loader(self.val_files, keys)
