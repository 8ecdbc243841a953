"""The factory: :func:`build_data` turns a :class:`~kdray.config.DataConfig` into a :class:`DataModule`."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from kdray.config import DataConfig
from kdray.data.augment import CROP_PADDING, NORMALISATION
from kdray.data.batches import DataSpec
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


def build_data(cfg: DataConfig, seed: int) -> DataModule:
    """The :class:`DataModule` of ``cfg.dataset``: the first ``train_size``/``val_size`` samples, ``seed``'s order."""
    if cfg.image_size is not None and cfg.dataset != "imagefolder":
        raise ConfigError(
            "data.image_size",
            cfg.image_size,
            f"only an imagefolder dataset is resized; remove it for '{cfg.dataset}'",
        )
    common = {"seed": seed, "batch_size": cfg.batch_size, "val_batch_size": cfg.val_batch_size}
    name = cfg.dataset
    if name == "imagefolder":
        return _build_image_folder(cfg, seed)
    if name == "synthetic":
        syn = cfg.synthetic
        train = synthetic_split(syn, "train", syn.train_len)
        val = synthetic_split(syn, "val", syn.val_len)
        # No augmentation: the inputs are already normalised and a flipped random template is another image.
        padding, mean, std, num_classes = None, None, None, syn.num_classes
    else:
        if name == "fashion_mnist":
            train, val = load_fashion_mnist(locate_fashion_mnist(cfg.root, download=cfg.download))
            num_classes = 10
        else:
            train, val = load_cifar(cfg.root, name, cfg.download)
            num_classes = 10 if name == "cifar10" else 100
        padding = CROP_PADDING[name] if cfg.augment else None
        mean, std = NORMALISATION[name]
    train = _first(train, cfg.train_size, "data.train_size", name)
    val = _first(val, cfg.val_size, "data.val_size", name)
    spec = DataSpec(
        num_classes=num_classes,
        in_channels=train[0].shape[1],
        image_size=train[0].shape[-1],
        train_len=len(train[1]),
        val_len=len(val[1]),
        name=name,
    )
    return InMemoryData(spec, train, val, crop_padding=padding, mean=mean, std=std, **common)


def _build_image_folder(cfg: DataConfig, seed: int) -> ImageFolderData:
    train_dir, val_dir = _image_folder_splits(Path(cfg.root).expanduser())
    classes, train = _image_folder_samples(train_dir)
    val_classes, val = _image_folder_samples(val_dir)
    if val_classes != classes:
        raise DataError(f"{val_dir} has classes {val_classes} but {train_dir} has {classes}; they must match")
    for key, n, samples in (("data.train_size", cfg.train_size, train), ("data.val_size", cfg.val_size, val)):
        if n is not None and n > len(samples):
            raise DataError(f"{key} = {n} but the ImageFolder has only {len(samples)} images there")
    train, val = train[: cfg.train_size], val[: cfg.val_size]
    size = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    padding = max(1, size // 8) if cfg.augment else None
    spec = DataSpec(len(classes), 3, size, len(train), len(val), "imagefolder")
    return ImageFolderData(
        spec,
        _ImageFiles(train, size, padding, seed),
        _ImageFiles(val, size, None, seed),
        seed=seed,
        batch_size=cfg.batch_size,
        val_batch_size=cfg.val_batch_size,
        num_workers=cfg.num_workers,
    )
