"""Data modules: the train, validation and test splits of one dataset, served as deterministic batches.

The validation split is carved from the training set by :func:`kdray.data.build.build_data` (seeded, disjoint
from what is trained on); the test split is the dataset's own. Evaluation names the split it reads.

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

SPLITS = ("val", "test")


class DataModule:
    """The splits of one dataset, served as deterministic batches.

    Training batches drop the last partial batch (every step has the same batch size on every peer);
    evaluation batches come in order, unaugmented, and keep the last partial batch. ``train_len`` 0 means no
    training set (a population fed by a generator): only evaluation batches are served.
    """

    def __init__(self, spec: DataSpec, *, seed: int, batch_size: int, val_batch_size: int) -> None:
        if 0 < spec.train_len < batch_size:
            raise DataError(
                f"data.batch_size = {batch_size} but the training set of '{spec.name}' has only {spec.train_len} "
                f"samples (after data.train_size and data.val_split), so an epoch would have no step; use a batch "
                f"size of at most {spec.train_len} or more training samples"
            )
        self.spec = spec
        self.seed = seed
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.noise: dict | None = None  # what data.label_noise corrupted (set by build_data)
        # an ImageFolder with no train/ and val/ split: its test split is the training images (set by build_data)
        self.test_is_train = False

    def steps_per_epoch(self) -> int:
        """Full batches per epoch: the last partial batch is dropped so every step has the same batch size."""
        return self.spec.train_len // self.batch_size

    def epoch_indices(self, epoch: int) -> Tensor:
        """The permutation of the training set used in ``epoch`` (int64); depends only on (seed, epoch)."""
        return torch.randperm(self.spec.train_len, generator=seeded_generator("shuffle", self.seed, epoch))

    def train_labels(self) -> Tensor:
        """Every training sample's label (int64), in index order (the labels trained on: noisy if asked)."""
        raise NotImplementedError

    def train_batches(
        self, epoch: int, start_step: int = 0, max_steps: int | None = None, pairs: bool = False
    ) -> Iterator[Batch]:
        """Batches ``start_step, start_step + 1, ...`` of ``epoch``: at most ``max_steps`` of them.

        The same as the tail of the full epoch from ``start_step`` (so a run resumed mid-epoch continues
        exactly); the skipped batches are never materialised. ``pairs``: each batch also carries, for every
        sample, another training sample of the same class drawn by a generator seeded by (seed, epoch, step)
        (a class with a single sample pairs it with itself).
        """
        perm = self.epoch_indices(epoch)
        for step in self._steps(start_step, max_steps):
            index = perm[step * self.batch_size : (step + 1) * self.batch_size]
            batch = self._train_batch(index, epoch, step, "augment")
            if pairs:
                partner = self._partners(index, seeded_generator("pairs", self.seed, epoch, step))
                batch.pair = self._train_batch(partner, epoch, step, "augment-pair")
            yield batch

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """The ``val`` or ``test`` split in order, unaugmented, the last partial batch included."""
        n = self.split_len(split)
        for start in range(0, n, self.val_batch_size):
            yield self._eval_batch(split, torch.arange(start, min(start + self.val_batch_size, n)))

    def split_len(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.spec.val_len if split == "val" else self.spec.test_len

    def _partners(self, index: Tensor, generator: torch.Generator) -> Tensor:
        if not hasattr(self, "_by_class"):
            labels = self.train_labels()
            order = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels, minlength=self.spec.num_classes)
            starts = torch.cumsum(counts, 0) - counts
            self._by_class = (order, starts, counts)
        order, starts, counts = self._by_class
        y = self.train_labels()[index]
        n = counts[y]
        # a uniform draw among the class's other samples: draw among n - 1, skip over the sample itself
        r = (torch.rand(len(index), generator=generator) * (n - 1).clamp_min(1)).long()
        rank_self = torch.empty_like(order)
        rank_self[order] = torch.arange(len(order))
        own = rank_self[index] - starts[y]
        pick = torch.where(n > 1, r + (r >= own).long(), own)
        return order[starts[y] + pick]

    def _steps(self, start_step: int, max_steps: int | None) -> range:
        steps = self.steps_per_epoch()
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must be in [0, {steps}] (steps per epoch), got {start_step}")
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 or None, got {max_steps}")
        end = steps if max_steps is None else min(steps, start_step + max_steps)
        return range(start_step, end)

    def _train_batch(self, index: Tensor, epoch: int, step: int, stream: str) -> Batch:
        raise NotImplementedError

    def _eval_batch(self, split: str, index: Tensor) -> Batch:
        raise NotImplementedError


class InMemoryData(DataModule):
    """A dataset held in memory: batches are slices, augmented vectorised with a generator seeded per step.

    ``splits`` maps "train", "val", "test" to (x, y); x is uint8 pixels (normalised per batch with
    ``mean``/``std``) or, when ``mean`` is None, float inputs that are already normalised. ``crop_padding`` None
    means no augmentation.
    """

    def __init__(
        self,
        spec: DataSpec,
        splits: dict[str, tuple[Tensor, Tensor]],
        *,
        seed: int,
        batch_size: int,
        val_batch_size: int,
        crop_padding: int | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        super().__init__(spec, seed=seed, batch_size=batch_size, val_batch_size=val_batch_size)
        self.splits = splits
        self.crop_padding = crop_padding
        self.mean, self.std = mean, std

    def _inputs(self, x: Tensor) -> Tensor:
        return x if self.mean is None else normalise(x, self.mean, self.std)

    def train_labels(self) -> Tensor:
        return self.splits["train"][1]

    def _train_batch(self, index: Tensor, epoch: int, step: int, stream: str) -> Batch:
        x, y = self.splits["train"]
        x = x[index]
        if self.crop_padding:
            x = pad_crop_flip(x, self.crop_padding, seeded_generator(stream, self.seed, epoch, step))
        return Batch(self._inputs(x), y[index], index)

    def _eval_batch(self, split: str, index: Tensor) -> Batch:
        x, y = self.splits[split]
        return Batch(self._inputs(x[index]), y[index], index)


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
        files: dict[str, _ImageFiles],
        *,
        seed: int,
        batch_size: int,
        val_batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__(spec, seed=seed, batch_size=batch_size, val_batch_size=val_batch_size)
        self.files = files
        self.num_workers = num_workers

    def _loader(self, files: _ImageFiles, keys: list[list[tuple[int | None, int]]]) -> Iterator[Batch]:
        # An explicit generator: without one the DataLoader draws its worker base seed from the global RNG.
        loader = DataLoader(
            files, batch_sampler=keys, num_workers=self.num_workers, generator=seeded_generator("loader")
        )
        for x, y, index in loader:
            yield Batch(x, y, index)

    def train_labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.files["train"].samples], dtype=torch.int64)

    def train_batches(
        self, epoch: int, start_step: int = 0, max_steps: int | None = None, pairs: bool = False
    ):
        if (
            pairs
        ):  # the per-sample path: one loader per batch is slow, but pairs need the partner's index first
            yield from super().train_batches(epoch, start_step, max_steps, pairs=True)
            return
        perm = self.epoch_indices(epoch).tolist()
        b = self.batch_size
        keys = [[(epoch, i) for i in perm[s * b : (s + 1) * b]] for s in self._steps(start_step, max_steps)]
        yield from self._loader(self.files["train"], keys)

    def _train_batch(self, index: Tensor, epoch: int, step: int, stream: str) -> Batch:
        # ImageFolder augmentation is seeded per sample: the partner of a pair draws under another epoch tag
        tag = epoch if stream == "augment" else f"{stream}-{epoch}"
        return next(self._loader(self.files["train"], [[(tag, int(i)) for i in index]]))

    def eval_batches(self, split: str) -> Iterator[Batch]:
        n, b = self.split_len(split), self.val_batch_size
        keys = [[(None, i) for i in range(s, min(s + b, n))] for s in range(0, n, b)]
        return self._loader(self.files[split], keys)
