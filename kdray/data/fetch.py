"""Finding a dataset's files on disk, or fetching them: Fashion-MNIST (Debian package, torchvision) and CIFAR."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from kdray.data.formats import _read_cifar_batch
from kdray.errors import DataError

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


# ------------------------------------------------------------------------------------------------ Fashion-MNIST
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


# -------------------------------------------------------------------------------------------------------- CIFAR
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
