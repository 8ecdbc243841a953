"""The factory: :func:`build_data` turns a :class:`~kdray.config.DataConfig` into a :class:`DataModule`.

Order of operations on the training set: the first ``data.train_size`` samples; then ``data.label_noise`` corrupts
a seeded share of their labels; then ``data.val_split`` carves a seeded validation split off them (so the
validation labels are as noisy as the training labels, as they would be in practice; ``data.clean_val: true`` keeps
the validation split's true labels instead); what is left is trained on.
The test split is the dataset's own (its first ``data.test_size`` samples) and is never corrupted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kdray.config import DataConfig, LabelNoiseConfig
from kdray.data.augment import CROP_PADDING, NORMALISATION
from kdray.data.batches import DataSpec, seeded_generator
from kdray.data.fetch import load_cifar, locate_fashion_mnist
from kdray.data.formats import _image_folder_samples, _image_folder_splits, load_fashion_mnist
from kdray.data.modules import DataModule, ImageFolderData, InMemoryData, _ImageFiles
from kdray.data.synthetic import synthetic_split
from kdray.errors import ConfigError, DataError

IMAGEFOLDER_DEFAULT_SIZE = 64


def _first(split: tuple[Tensor, Tensor], n: int | None, key: str, name: str) -> tuple[Tensor, Tensor]:
    x, y = split
    if n is not None and n > len(y):
        raise DataError(
            f"{key} = {n} but '{name}' has only {len(y)} samples there; use at most {len(y)} or null"
        )
    return (x, y) if n is None else (x[:n], y[:n])


def corrupt_labels(
    labels: Tensor, cfg: LabelNoiseConfig | None, num_classes: int, seed: int
) -> tuple[Tensor, dict | None]:
    """``labels`` with ``round(rate * n)`` of them corrupted (seeded by the run seed), and the record of which:
    symmetric noise draws a *different* class uniformly, pair-flip noise maps class c to c + 1 (mod C)."""
    if cfg is None or cfg.rate == 0:
        return labels, None
    generator = seeded_generator("label_noise", seed)
    n = len(labels)
    chosen = torch.randperm(n, generator=generator)[: round(cfg.rate * n)].sort().values
    noisy = labels.clone()
    if cfg.kind == "symmetric":
        shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
    else:
        shift = torch.ones(len(chosen), dtype=torch.int64)
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    record = {
        "kind": cfg.kind,
        "rate": cfg.rate,
        "seed": seed,
        "corrupted": len(chosen),
        "of": n,
        "indices": chosen.tolist(),  # positions in the training set (after data.train_size, before val_split)
        "clean_labels": labels[chosen].tolist(),
        "noisy_labels": noisy[chosen].tolist(),
    }
    return noisy, record


def carve_validation(n: int, val_split: float | int | None, seed: int, name: str) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices) of a training set of ``n`` samples, both sorted; the validation split
    is ``val_split`` (a fraction < 1, or a count) drawn by a generator seeded by the run seed."""
    if not val_split:
        return torch.arange(n), torch.arange(0)
    count = round(val_split * n) if isinstance(val_split, float) and val_split < 1 else int(val_split)
    if not 0 < count < n:
        raise DataError(
            f"data.val_split = {val_split} carves {count} of the {n} training samples of '{name}'; it must leave "
            f"at least one sample on each side (a fraction in (0, 1) or a count in 1..{n - 1})"
        )
    perm = torch.randperm(n, generator=seeded_generator("val_split", seed))
    return perm[count:].sort().values, perm[:count].sort().values


def build_data(cfg: DataConfig, seed: int, with_train: bool = True) -> DataModule:
    """The :class:`DataModule` of ``cfg.dataset`` (see the module docstring for the order of operations).

    ``with_train`` False: a population without training data (its inputs come from a generator): the validation
    split is carved as usual, and nothing else of the training set is kept."""
    if cfg.image_size is not None and cfg.dataset != "imagefolder":
        raise ConfigError(
            "data.image_size",
            cfg.image_size,
            f"only an imagefolder dataset is resized; remove it for '{cfg.dataset}'",
        )
    common = {"seed": seed, "batch_size": cfg.batch_size, "val_batch_size": cfg.val_batch_size}
    name = cfg.dataset
    if name == "imagefolder":
        return _build_image_folder(cfg, seed, with_train)
    if name == "synthetic":
        syn = cfg.synthetic
        train = synthetic_split(syn, "train", syn.train_len)
        test = synthetic_split(syn, "val", syn.test_len)
        # No augmentation: the inputs are already normalised and a flipped random template is another image.
        padding, mean, std, num_classes = None, None, None, syn.num_classes
    else:
        if name == "fashion_mnist":
            train, test = load_fashion_mnist(locate_fashion_mnist(cfg.root, download=cfg.download))
            num_classes = 10
        else:
            train, test = load_cifar(cfg.root, name, cfg.download)
            num_classes = 10 if name == "cifar10" else 100
        padding = CROP_PADDING[name] if cfg.augment else None
        mean, std = NORMALISATION[name]
    x, y = _first(train, cfg.train_size, "data.train_size", name)
    test = _first(test, cfg.test_size, "data.test_size", name)
    clean = y
    y, noise = corrupt_labels(y, cfg.label_noise, num_classes, seed)
    train_ids, val_ids = carve_validation(len(y), cfg.val_split, seed, name)
    if not with_train:
        train_ids = train_ids[:0]
    val_y = (clean if cfg.clean_val else y)[val_ids]
    splits = {"train": (x[train_ids], y[train_ids]), "val": (x[val_ids], val_y), "test": test}
    spec = DataSpec(
        num_classes=num_classes,
        in_channels=x.shape[1],
        image_size=x.shape[-1],
        train_len=len(train_ids),
        val_len=len(val_ids),
        test_len=len(test[1]),
        name=name,
    )
    data = InMemoryData(spec, splits, crop_padding=padding, mean=mean, std=std, **common)
    data.noise = noise
    return data


def _build_image_folder(cfg: DataConfig, seed: int, with_train: bool) -> ImageFolderData:
    train_dir, test_dir = _image_folder_splits(Path(cfg.root).expanduser())
    classes, train = _image_folder_samples(train_dir)
    test_classes, test = _image_folder_samples(test_dir)
    if test_classes != classes:
        raise DataError(
            f"{test_dir} has classes {test_classes} but {train_dir} has {classes}; they must match"
        )
    for key, n, samples in (
        ("data.train_size", cfg.train_size, train),
        ("data.test_size", cfg.test_size, test),
    ):
        if n is not None and n > len(samples):
            raise DataError(f"{key} = {n} but the ImageFolder has only {len(samples)} images there")
    train, test = train[: cfg.train_size], test[: cfg.test_size]
    labels, noise = corrupt_labels(
        torch.tensor([label for _, label in train], dtype=torch.int64), cfg.label_noise, len(classes), seed
    )
    clean = train
    train = [(path, int(label)) for (path, _), label in zip(train, labels)]
    train_ids, val_ids = carve_validation(len(train), cfg.val_split, seed, "imagefolder")
    if not with_train:
        train_ids = train_ids[:0]
    size = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    padding = max(1, size // 8) if cfg.augment else None
    val = clean if cfg.clean_val else train
    files = {
        "train": _ImageFiles([train[i] for i in train_ids.tolist()], size, padding, seed),
        "val": _ImageFiles([val[i] for i in val_ids.tolist()], size, None, seed),
        "test": _ImageFiles(test, size, None, seed),
    }
    spec = DataSpec(len(classes), 3, size, len(train_ids), len(val_ids), len(test), "imagefolder")
    data = ImageFolderData(
        spec,
        files,
        seed=seed,
        batch_size=cfg.batch_size,
        val_batch_size=cfg.val_batch_size,
        num_workers=cfg.num_workers,
    )
    data.noise = noise
    data.test_is_train = train_dir == test_dir
    return data
