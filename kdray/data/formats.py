"""Readers: gzipped idx files (Fashion-MNIST), CIFAR's pickled batches, and ImageFolder scanning.

Every reader checks what it read against the format and names the file and the fix when it does not match.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import warnings
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdray.errors import DataError

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


# ------------------------------------------------------------------------------------------------ Fashion-MNIST
def read_idx(path: str | Path) -> Tensor:
    """Read a gzipped idx file of unsigned bytes: images (magic 2051) -> (N, rows, cols), labels (2049) -> (N,).

    Format: big-endian uint32 magic and count (images: then rows and cols), then the bytes
    (LeCun's MNIST page; Fashion-MNIST uses the same). The payload must be exactly as long as the header says.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}); delete it and fetch it again") from None
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if magic == IDX_IMAGES_MAGIC and len(raw) >= 16:
        header, shape = 16, struct.unpack(">III", raw[4:16])
    elif magic == IDX_LABELS_MAGIC and len(raw) >= 8:
        header, shape = 8, struct.unpack(">I", raw[4:8])
    else:
        raise DataError(
            f"{path}: not an idx file (magic number {magic}, header of {len(raw)} bytes; expected magic "
            f"{IDX_IMAGES_MAGIC} for images or {IDX_LABELS_MAGIC} for labels); delete it and fetch it again"
        )
    if len(raw) != header + prod(shape):
        raise DataError(
            f"{path}: the header announces shape {tuple(shape)} ({header + prod(shape)} bytes with the header) but "
            f"the file holds {len(raw)} bytes; it is truncated or corrupt, delete it and fetch it again"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(folder: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((train images N1HW uint8, labels int64), (test images, labels)) from the four idx files in ``folder``."""
    splits = []
    for prefix in ("train", "t10k"):
        images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or labels.dim() != 1:
            raise DataError(
                f"{images_path} / {labels_path}: images and labels files are swapped or mislabelled"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels"
            )
        if labels.numel() and int(labels.max()) >= 10:
            raise DataError(f"{labels_path}: label {int(labels.max())} is outside Fashion-MNIST's 0..9")
        splits.append((images.unsqueeze(1), labels.long()))
    return splits[0], splits[1]


# -------------------------------------------------------------------------------------------------------- CIFAR
def _cifar_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch may name: numpy's array and dtype reconstruction (numpy 1 and 2 module
    paths; protocol <= 4 and protocol 5), and ``_codecs.encode``, which Python 3 uses for bytes in protocol 2."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(
            f"_codecs.encode is allowed only for latin1 text, got encoding {encoding!r}"
        )
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's pickled batches and refuses any other global.

    CIFAR ships as pickles, and unpickling an arbitrary file runs arbitrary code. torchvision guards its
    ``pickle.load`` with MD5 checks of the official files, which also rejects any file that is not the official
    one (our test fixtures, re-packed copies); bypassing that check would leave a bare ``pickle.load``. This
    unpickler instead resolves only numpy's array/dtype constructors, so a malicious file can at worst fail to
    load; the result is then checked against CIFAR's layout (uint8 rows of 3072 pixels, integer labels).
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _cifar_pickle_globals()
        found = _CifarUnpickler._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"'{module}.{name}' is not allowed in a CIFAR batch")
        return found


def _read_cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # a malformed pickle raises nearly anything; all of it means "not a CIFAR batch"
        raise DataError(f"{path}: not a CIFAR batch ({type(exc).__name__}: {exc}); fetch it again") from None
    if isinstance(entry, dict):
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get(label_key) if isinstance(entry, dict) else None
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    ):
        raise DataError(f"{path}: expected a dict whose 'data' is a uint8 array of shape (N, 3072)")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise DataError(f"{path}: expected '{label_key}' with one label per image ({len(data)})")
    try:
        y = torch.tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: '{label_key}' are not integers ({exc})") from None
    # CIFAR rows are channel-major (1024 red, 1024 green, 1024 blue): a reshape gives CHW directly.
    return torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32), y


# ------------------------------------------------------------------------------------------------- ImageFolder
def _image_folder_splits(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DataError(
            f"ImageFolder root {root} does not exist; set data.root to a folder holding train/ and val/ "
            f"(each with one sub-folder of images per class) or the class folders themselves"
        )
    if (root / "train").is_dir():
        if not (root / "val").is_dir():
            raise DataError(
                f"found {root / 'train'} but no {root / 'val'}; add a val/ folder with the same classes"
            )
        return root / "train", root / "val"
    warnings.warn(
        f"{root} has no train/ and val/ split: its test split is the training images themselves (the test "
        "accuracy is a training accuracy); add train/ and val/ folders for a held-out test",
        stacklevel=3,
    )
    return root, root


def _image_folder_samples(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(str(folder))
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: {exc}; it needs one sub-folder of images per class") from None
    return found.classes, [(str(path), label) for path, label in found.samples]
