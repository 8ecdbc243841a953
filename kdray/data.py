"""Data: every peer sees the same batches, in the same order, with the same augmentation.

A training batch is a pure function of ``(seed, epoch, step)``: the epoch's permutation comes from a
``torch.Generator`` seeded by ``(seed, epoch)`` and the augmentation of step ``s`` from one seeded by
``(seed, epoch, s)``. Nothing here reads or advances the global RNG, so the in-process engine, each Ray worker
and a run resumed in the middle of an epoch all build bit-identical inputs, and the trainer's own random stream
(dropout, initialisation) is the same whether data was loaded or not. Every batch carries the sample indices,
because per-sample memories (PS-KD's last-epoch predictions) are keyed by them.

In-memory sets (Fashion-MNIST, CIFAR-10/100, synthetic) are held as uint8 (synthetic: float) tensors and a batch
is a slice, augmented vectorised on the batch: no DataLoader, no worker processes. An ImageFolder is decoded
from disk by a DataLoader whose batch sampler is built from the same permutation; its augmentation is seeded per
sample by ``(seed, epoch, index)`` so it does not depend on which worker process decodes the image.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import struct
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdray.config import DataConfig, SyntheticConfig
from kdray.errors import ConfigError, DataError

# Per-channel (mean, std) of the training split, for the usual normalisation; ImageFolder gets ImageNet's.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Zero padding of the random crop: 4 px for 32x32 CIFAR and 2 px for 28x28 Fashion-MNIST (1/8 and 1/14 of the
# side); an ImageFolder pads image_size // 8.
CROP_PADDING = {"fashion_mnist": 2, "cifar10": 4, "cifar100": 4}
IMAGEFOLDER_DEFAULT_SIZE = 64

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Where Debian's dataset-fashion-mnist installs the files (a module constant so tests can point it elsewhere).
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_IN_PACKAGE = "usr/share/datasets/fashion-mnist"  # the same folder, inside the .deb
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049

# The synthetic set is drawn from this fixed seed, not the run seed, so runs with different seeds see the same data.
SYNTHETIC_DATA_SEED = 20_240_601
SYNTHETIC_SIGNAL, SYNTHETIC_NOISE = 0.6, 0.8  # 0.6^2 + 0.8^2 = 1: inputs have roughly unit variance


# ---------------------------------------------------------------------------------------------- batches, seeds
@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: its input shape and number of classes."""

    num_classes: int
    in_channels: int
    image_size: int
    train_len: int
    val_len: int
    name: str


@dataclass
class Batch:
    """Inputs, labels and the samples' positions in the (possibly subset) split they came from (int64)."""

    x: Tensor
    y: Tensor
    index: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.index.to(device))


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


# ------------------------------------------------------------------------------------------------ augmentation
def pad_crop_flip(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Random crop of a zero-padded image and random horizontal flip, vectorised over the batch ``x`` (NCHW).

    Pad-and-crop plus horizontal flip is the standard augmentation for CIFAR in the KD papers we follow (DML,
    AFD, PS-KD, CRD's benchmark); we apply the same to Fashion-MNIST, where flipping a garment keeps its class.
    Offsets and flips are drawn from ``generator`` only, in a fixed order (row offsets, column offsets, flips).
    """
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    # Reading the crop's columns right to left is the flip: one gather does both.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 NCHW pixels -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - mean_t).div_(std_t)


# ----------------------------------------------------------------------------------------------- data modules
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


def _has_fashion_mnist(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FASHION_MNIST_FILES)


def _fetch_fashion_mnist_with_apt(target: Path) -> str | None:
    """Download the Debian package and unpack it without installing it; None on success, else why not."""
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        return "apt-get or dpkg-deb is not on PATH"
    print(
        f"kdray: fetching Fashion-MNIST with 'apt-get download {FASHION_MNIST_PACKAGE}' into {target}",
        flush=True,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="kdray-fashion-mnist-") as tmp:
            got = subprocess.run(
                [apt, "download", FASHION_MNIST_PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=900
            )
            debs = sorted(Path(tmp).glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
            if got.returncode != 0 or not debs:
                lines = (got.stderr or got.stdout).strip().splitlines()
                return f"'apt-get download' failed: {lines[-1] if lines else f'exit {got.returncode}'}"
            unpacked = Path(tmp) / "unpacked"
            subprocess.run(
                [dpkg, "-x", str(debs[0]), str(unpacked)], check=True, capture_output=True, timeout=900
            )
            source = unpacked / FASHION_MNIST_IN_PACKAGE
            if not _has_fashion_mnist(source):
                return f"the package does not hold {', '.join(FASHION_MNIST_FILES)} in /{FASHION_MNIST_IN_PACKAGE}"
            target.mkdir(parents=True, exist_ok=True)
            for name in FASHION_MNIST_FILES:
                # Copy then rename: an interrupted copy must not leave a truncated file that looks complete.
                partial = target / f"{name}.partial"
                shutil.copyfile(source / name, partial)
                partial.replace(target / name)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _fetch_fashion_mnist_with_torchvision(root: Path) -> str | None:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # offline machines fail in many ways (URLError, RuntimeError, timeouts)
        return f"{type(exc).__name__}: {exc}"
    return None


def locate_fashion_mnist(root: str | Path, download: bool = True) -> Path:
    """The folder holding Fashion-MNIST's four idx ``.gz`` files, fetching them if allowed.

    Looks in ``<root>/fashion-mnist/``, then ``/usr/share/datasets/fashion-mnist/`` (Debian's
    ``dataset-fashion-mnist``), then ``<root>/FashionMNIST/raw/`` (where torchvision downloads). If absent and
    ``download``: ``apt-get download`` + ``dpkg-deb -x`` of the Debian package into ``<root>/fashion-mnist/``
    (no root rights, works wherever the Debian mirror is reachable), then torchvision's downloader.
    """
    root = Path(root).expanduser()
    target = root / "fashion-mnist"
    torchvision_raw = root / "FashionMNIST" / "raw"
    candidates = [target, SYSTEM_FASHION_MNIST, torchvision_raw]
    for folder in candidates:
        if _has_fashion_mnist(folder):
            return folder
    attempts = []
    if download:
        reason = _fetch_fashion_mnist_with_apt(target)
        if reason is None and _has_fashion_mnist(target):
            return target
        attempts.append(f"apt-get download {FASHION_MNIST_PACKAGE}: {reason}")
        reason = _fetch_fashion_mnist_with_torchvision(root)
        if reason is None and _has_fashion_mnist(torchvision_raw):
            return torchvision_raw
        attempts.append(f"torchvision download: {reason or 'finished without the .gz files'}")
    else:
        attempts.append("no download tried (data.download is false)")
    raise DataError(
        f"Fashion-MNIST not found: looked for {', '.join(FASHION_MNIST_FILES)} in "
        f"{', '.join(str(c) for c in candidates)}; {'; '.join(attempts)}. Fix: run "
        f"'apt-get install {FASHION_MNIST_PACKAGE}' (it installs them in {SYSTEM_FASHION_MNIST}), "
        f"or copy the four files into {target}"
    )


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


def load_cifar(
    root: str | Path, name: str, download: bool
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 from torchvision's folder layout under ``root``.

    torchvision (its URL, file list and checksummed ``download_and_extract_archive``) only fetches the archive;
    the batches are read by :class:`_CifarUnpickler`, never by a bare ``pickle.load``.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, label_key, num_classes = (
        (CIFAR10, "labels", 10) if name == "cifar10" else (CIFAR100, "fine_labels", 100)
    )
    root = Path(root).expanduser()
    folder = root / cls.base_folder

    def missing() -> list[str]:
        return [f for f, _ in cls.train_list + cls.test_list if not (folder / f).is_file()]

    why = "data.download is false"
    if missing() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
            why = "the download finished without them"
        except Exception as exc:  # offline machines fail in many ways (URLError, timeouts, bad checksum)
            why = f"the download failed ({type(exc).__name__}: {exc})"
    if missing():
        raise DataError(
            f"{name}: expected {', '.join(missing())} in {folder} ({why}). Download {cls.url} on a connected "
            f"machine, extract it and copy its '{cls.base_folder}' folder to {folder}"
        )
    splits = []
    for file_list in (cls.train_list, cls.test_list):
        parts = [_read_cifar_batch(folder / f, label_key) for f, _ in file_list]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
            raise DataError(
                f"{folder}: labels span {int(y.min())}..{int(y.max())}, {name} has 0..{num_classes - 1}"
            )
        splits.append((x, y))
    return splits[0], splits[1]


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
        f"{root} has no train/ and val/ split: validating on the training images themselves", stacklevel=3
    )
    return root, root


def _image_folder_samples(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(str(folder))
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: {exc}; it needs one sub-folder of images per class") from None
    return found.classes, [(str(path), label) for path, label in found.samples]


# ---------------------------------------------------------------------------------------------------- synthetic
def synthetic_templates(cfg: SyntheticConfig) -> Tensor:
    """One fixed, smooth, unit-variance image per class (K, C, S, S), from the fixed data seed."""
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    coarse = torch.randn(
        k, c, max(2, s // 4), max(2, s // 4), generator=seeded_generator("synthetic", SYNTHETIC_DATA_SEED)
    )
    # Smooth, image-like templates (coarse noise upsampled) so a convolutional network can pick them up.
    templates = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    flat = templates.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view(k, c, s, s)


def synthetic_split(cfg: SyntheticConfig, split: str, length: int) -> tuple[Tensor, Tensor]:
    """``x = 0.6 * template[y] + 0.8 * noise``: class-conditional Gaussians, learnable by construction."""
    templates = synthetic_templates(cfg)
    generator = seeded_generator("synthetic", SYNTHETIC_DATA_SEED, split)
    y = torch.randint(cfg.num_classes, (length,), generator=generator)
    noise = torch.randn(length, *templates.shape[1:], generator=generator)
    return SYNTHETIC_SIGNAL * templates[y] + SYNTHETIC_NOISE * noise, y


# -------------------------------------------------------------------------------------------------------- build
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
