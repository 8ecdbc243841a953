"""The data layer: batches are a pure function of (seed, epoch, step); every loader refuses bad input clearly."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdray.config import DataConfig, SyntheticConfig
from kdray.data import Batch, DataSpec, build_data, locate_fashion_mnist
from kdray.data import fetch as data_fetch
from kdray.data.augment import NORMALISATION, normalise, pad_crop_flip
from kdray.data.batches import seeded_generator
from kdray.data.fetch import FASHION_MNIST_FILES, load_cifar
from kdray.data.formats import load_fashion_mnist, read_idx
from kdray.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------------- fake datasets
CIFAR10_PER_BATCH, CIFAR10_TEST = 8, 12  # 5 x 8 = 40 training images


def cifar_images(n: int, offset: int) -> np.ndarray:
    """CIFAR rows (3072 bytes, channel-major) whose pixel p of channel c is (offset + image + 50 c + p) % 256."""
    rows = np.zeros((n, 3, 1024), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            rows[i, c] = (offset + i + 50 * c + np.arange(1024)) % 256
    return rows.reshape(n, 3072)


def write_pickle(path: Path, obj: object, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_fake_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        n, offset = CIFAR10_PER_BATCH, b * CIFAR10_PER_BATCH
        batch = {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": [(offset + i) % 10 for i in range(n)],
            "data": cifar_images(n, offset),
            "filenames": [f"img{offset + i}.png" for i in range(n)],
        }
        write_pickle(folder / f"data_batch_{b + 1}", batch, protocol=2)  # the real files are protocol 2
    test = {"batch_label": "testing batch 1 of 1", "labels": [9 - i % 10 for i in range(CIFAR10_TEST)]}
    test.update(data=cifar_images(CIFAR10_TEST, 100), filenames=[f"t{i}.png" for i in range(CIFAR10_TEST)])
    write_pickle(folder / "test_batch", test, protocol=2)
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}, protocol=2)
    return folder


def write_fake_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, offset in (("train", 30, 0), ("test", 7, 200)):
        split = {
            "filenames": [f"{name}{i}.png" for i in range(n)],
            "batch_label": name,
            "fine_labels": [(7 * i + offset) % 100 for i in range(n)],
            "coarse_labels": [i % 20 for i in range(n)],
            "data": cifar_images(n, offset),
        }
        write_pickle(folder / name, split, protocol=5)  # a re-pickled copy: numpy's protocol-5 path
    write_pickle(
        folder / "meta", {"fine_label_names": list(map(str, range(100))), "coarse_label_names": []}, 5
    )
    return folder


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(
        struct.pack(">I", d) for d in array.shape[1:]
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)


def write_image_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count if split == "train" else 2):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png"
                )


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_fake_cifar10(tmp_path)
    return tmp_path


def cifar_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        **{
            "dataset": "cifar10",
            "root": str(root),
            "download": False,
            "batch_size": 8,
            "val_batch_size": 5,
            "val_split": None,  # these tests read the files: nothing carved unless a test asks
            "select_on": "test",
            **kw,
        }
    )


def carved_ids(n: int, count: int, seed: int) -> list[int]:
    """The validation indices build_data carves (the same seeded permutation)."""
    return sorted(torch.randperm(n, generator=seeded_generator("val_split", seed))[:count].tolist())


def all_batches(dm, epoch: int, **kw) -> list[Batch]:
    return list(dm.train_batches(epoch, **kw))


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.equal(p.x, q.x) and torch.equal(p.y, q.y) and torch.equal(p.index, q.index)


# ----------------------------------------------------------------------------------------------- determinism
def test_same_seed_and_epoch_give_identical_batches_from_separate_modules(cifar_root):
    first = build_data(cifar_cfg(cifar_root), seed=3)
    second = build_data(cifar_cfg(cifar_root), seed=3)
    assert_same_batches(all_batches(first, 2), all_batches(second, 2))
    assert first.steps_per_epoch() == 40 // 8 == len(all_batches(first, 2))


def test_epoch_and_seed_change_the_order_and_augmentation(cifar_root):
    dm = build_data(cifar_cfg(cifar_root), seed=3)
    assert not torch.equal(dm.epoch_indices(0), dm.epoch_indices(1))
    assert not torch.equal(dm.epoch_indices(0), build_data(cifar_cfg(cifar_root), seed=4).epoch_indices(0))
    # The same sample in two epochs gets different crops/flips: compare sample 0 wherever it lands.
    views = []
    for epoch in (0, 1):
        for batch in dm.train_batches(epoch):
            hit = (batch.index == 0).nonzero()
            if len(hit):
                views.append(batch.x[hit[0, 0]])
    assert len(views) == 2 and not torch.equal(views[0], views[1])  # 40 samples, 5 full steps: all seen


def test_start_step_yields_exactly_the_tail_of_the_epoch(cifar_root):
    dm = build_data(cifar_cfg(cifar_root), seed=0)
    full = all_batches(dm, 5)
    assert_same_batches(all_batches(dm, 5, start_step=3), full[3:])
    assert_same_batches(all_batches(dm, 5, start_step=1, max_steps=2), full[1:3])
    assert all_batches(dm, 5, start_step=dm.steps_per_epoch()) == []
    with pytest.raises(ValueError, match="start_step"):
        all_batches(dm, 5, start_step=dm.steps_per_epoch() + 1)


def test_start_step_does_not_touch_the_skipped_batches(cifar_root, monkeypatch):
    dm = build_data(cifar_cfg(cifar_root), seed=0)
    seen = []
    original = dm._train_batch
    monkeypatch.setattr(
        dm,
        "_train_batch",
        lambda index, epoch, step, stream: seen.append(step) or original(index, epoch, step, stream),
    )
    all_batches(dm, 0, start_step=3)
    assert seen == [3, 4]


def test_data_loading_leaves_the_global_rng_untouched(cifar_root, tmp_path):
    write_image_folder(tmp_path / "images", {"a": 3, "b": 3})
    modules = [
        build_data(cifar_cfg(cifar_root), seed=0),
        build_data(DataConfig(dataset="synthetic", batch_size=16), seed=0),
        build_data(
            DataConfig(dataset="imagefolder", root=str(tmp_path / "images"), batch_size=2, image_size=16), 0
        ),
        build_data(cifar_cfg(cifar_root, val_split=0.25, select_on="val", label_noise={"rate": 0.5}), seed=0),
    ]
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    for dm in modules:
        all_batches(dm, 1)
        all_batches(dm, 1, pairs=True)
        list(dm.eval_batches("test"))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


# ------------------------------------------------------------------------------------- epochs, subsets, content
def test_each_index_at_most_once_per_epoch_and_drop_last(cifar_root):
    dm = build_data(cifar_cfg(cifar_root, batch_size=7), seed=1)
    assert dm.steps_per_epoch() == 40 // 7 == 5
    indices = torch.cat([b.index for b in dm.train_batches(0)])
    assert len(indices) == 35 and len(indices.unique()) == 35
    assert sorted(dm.epoch_indices(0).tolist()) == list(range(40))
    assert torch.equal(indices, dm.epoch_indices(0)[:35])
    assert all(b.index.dtype == torch.int64 and b.y.dtype == torch.int64 for b in dm.train_batches(0))


def test_train_size_and_test_size_take_the_first_samples(cifar_root):
    dm = build_data(cifar_cfg(cifar_root, train_size=20, test_size=7, augment=False), seed=1)
    assert (dm.spec.train_len, dm.spec.test_len, dm.steps_per_epoch()) == (20, 7, 2)
    mean, std = NORMALISATION["cifar10"]
    raw = torch.from_numpy(cifar_images(40, 0)).reshape(40, 3, 32, 32)
    for batch in dm.train_batches(0):
        assert int(batch.index.max()) < 20
        assert torch.equal(batch.y, batch.index % 10)
        assert torch.equal(batch.x, normalise(raw[batch.index], mean, std))
    val = list(dm.eval_batches("test"))
    assert [len(b.index) for b in val] == [5, 2]  # the last partial batch is kept
    assert torch.equal(torch.cat([b.index for b in val]), torch.arange(7))


def test_augmentation_is_pad_crop_flip_with_the_drawn_offsets():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).reshape(2, 3, 5, 5)
    out = pad_crop_flip(x, 2, seeded_generator("t", 1))
    g = seeded_generator("t", 1)  # replay the draws: rows, columns, flips
    dy, dx, flip = (
        torch.randint(0, 5, (2,), generator=g),
        torch.randint(0, 5, (2,), generator=g),
        torch.rand(2, generator=g),
    )
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        crop = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 5]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] < 0.5 else crop)
    unpadded = pad_crop_flip(x, 0, seeded_generator("t", 2))
    assert all(torch.equal(unpadded[i], x[i]) or torch.equal(unpadded[i], x[i].flip(-1)) for i in range(2))


def test_augment_false_turns_augmentation_off(cifar_root):
    on = build_data(cifar_cfg(cifar_root), seed=0)
    off = build_data(cifar_cfg(cifar_root, augment=False), seed=0)
    a, b = all_batches(on, 0), all_batches(off, 0)
    assert all(torch.equal(p.index, q.index) for p, q in zip(a, b))
    assert not all(torch.equal(p.x, q.x) for p, q in zip(a, b))
    assert all(p.x.shape == q.x.shape == (8, 3, 32, 32) for p, q in zip(a, b))


def test_batch_to_moves_every_tensor():
    batch = Batch(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), torch.tensor([3, 4])).to("cpu")
    assert batch.x.device.type == batch.y.device.type == batch.index.device.type == "cpu"


def test_bad_sizes_are_refused_with_the_key(cifar_root):
    with pytest.raises(DataError, match="data.batch_size = 64"):
        build_data(cifar_cfg(cifar_root, batch_size=64), seed=0)
    with pytest.raises(DataError, match="data.train_size = 41"):
        build_data(cifar_cfg(cifar_root, train_size=41), seed=0)
    with pytest.raises(ConfigError, match="data.image_size"):
        build_data(cifar_cfg(cifar_root, image_size=64), seed=0)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST
def test_read_idx_parses_images_and_labels(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "img.gz", images, 2051)
    write_idx(tmp_path / "lab.gz", np.array([7, 0, 255]), 2049)
    got = read_idx(tmp_path / "img.gz")
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 4)
    assert torch.equal(got, torch.from_numpy(images.astype(np.uint8)))
    assert read_idx(tmp_path / "lab.gz").tolist() == [7, 0, 255]


def test_read_idx_refuses_corrupt_files(tmp_path):
    write_idx(tmp_path / "bad_magic.gz", np.zeros(4), 2050)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 10, 28, 28) + bytes(100))  # header says 10 x 28 x 28
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="magic number 2050"):
        read_idx(tmp_path / "bad_magic.gz")
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(DataError, match="not a readable gzip"):
        read_idx(tmp_path / "plain.gz")


def test_fashion_mnist_from_root_folder(tmp_path):
    write_fake_fashion_mnist(tmp_path / "fashion-mnist")
    assert locate_fashion_mnist(tmp_path, download=False) == tmp_path / "fashion-mnist"
    dm = build_data(DataConfig(root=str(tmp_path), download=False, batch_size=16, val_batch_size=4), seed=0)
    assert dm.spec == DataSpec(10, 1, 28, 36, 4, 10, "fashion_mnist")  # 10% of 40 carved for validation
    batch = next(dm.train_batches(0))
    assert batch.x.shape == (16, 1, 28, 28) and batch.x.dtype == torch.float32
    train_ids = torch.tensor([i for i in range(40) if i not in carved_ids(40, 4, seed=0)])
    assert torch.equal(batch.y, train_ids[batch.index] % 10)  # index: position in the training split


def test_locate_fashion_mnist_names_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(data_fetch, "SYSTEM_FASHION_MNIST", tmp_path / "system" / "fashion-mnist")
    with pytest.raises(DataError) as err:
        locate_fashion_mnist(tmp_path / "root", download=False)
    message = str(err.value)
    for path in (tmp_path / "root" / "fashion-mnist", tmp_path / "system" / "fashion-mnist"):
        assert str(path) in message
    assert "apt-get install dataset-fashion-mnist" in message and "train-images-idx3-ubyte.gz" in message


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a package")
def test_locate_fashion_mnist_unpacks_the_debian_package(tmp_path, monkeypatch, capsys):
    # A fake apt-get that "downloads" a locally built dataset-fashion-mnist package: no network.
    tree = tmp_path / "pkg"
    write_fake_fashion_mnist(tree / "usr/share/datasets/fashion-mnist")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: fake\n"
    )
    deb = tmp_path / "dataset-fashion-mnist_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(tree), str(deb)], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(f'#!/bin/sh\n[ "$1" = download ] && cp "{deb}" .\n')
    apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(data_fetch, "SYSTEM_FASHION_MNIST", tmp_path / "absent")

    found = locate_fashion_mnist(tmp_path / "root", download=True)
    assert found == tmp_path / "root" / "fashion-mnist"
    assert sorted(p.name for p in found.iterdir()) == sorted(FASHION_MNIST_FILES)
    assert "apt-get download dataset-fashion-mnist" in capsys.readouterr().out
    assert read_idx(found / "t10k-labels-idx1-ubyte.gz").tolist() == [i % 10 for i in range(10)]


@pytest.mark.realdata
def test_real_fashion_mnist():
    try:
        folder = locate_fashion_mnist(os.environ.get("KDRAY_DATA", "data"))
    except DataError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    (train_x, train_y), (val_x, val_y) = load_fashion_mnist(folder)
    assert train_x.shape == (60000, 1, 28, 28) and val_x.shape == (10000, 1, 28, 28)
    assert train_y.unique().tolist() == list(range(10)) == val_y.unique().tolist()
    assert torch.bincount(train_y).tolist() == [6000] * 10


# -------------------------------------------------------------------------------------------------------- CIFAR
def test_fake_cifar10_loads_in_nchw_with_labels(cifar_root):
    dm = build_data(cifar_cfg(cifar_root, augment=False), seed=0)
    assert dm.spec == DataSpec(10, 3, 32, 40, 0, 12, "cifar10")
    val = torch.cat([b.y for b in dm.eval_batches("test")])
    assert val.tolist() == [9 - i % 10 for i in range(12)]
    (train_x, train_y), _ = load_cifar(cifar_root, "cifar10", download=False)
    assert train_x.dtype == torch.uint8 and train_x.shape == (40, 3, 32, 32)
    # channel c of image i starts at i + 50 c: the rows were read channel-major, as CIFAR stores them
    assert train_x[5, :, 0, 0].tolist() == [5, 55, 105] and train_x[5, 2, 0, 1] == 106
    assert train_y.tolist() == [i % 10 for i in range(40)]


def test_fake_cifar100_loads_fine_labels(tmp_path):
    write_fake_cifar100(tmp_path)
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path), download=False, batch_size=10, augment=False)
    dm = build_data(cfg, seed=0)
    assert dm.spec == DataSpec(100, 3, 32, 27, 3, 7, "cifar100")
    assert torch.cat([b.y for b in dm.eval_batches("test")]).tolist() == [
        (7 * i + 200) % 100 for i in range(7)
    ]
    mean, std = NORMALISATION["cifar100"]
    x = next(dm.eval_batches("test")).x
    assert x[0, 1, 0, 0].item() == pytest.approx(((200 + 50) / 255 - mean[1]) / std[1], abs=1e-6)


def test_missing_cifar_names_the_expected_folder(tmp_path):
    with pytest.raises(DataError) as err:
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=False), seed=0)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "data_batch_1" in str(err.value)
    with pytest.raises(DataError, match="cifar-100-python"):
        build_data(DataConfig(dataset="cifar100", root=str(tmp_path), download=False), seed=0)


class _Payload:
    """Unpickling this would create a file: the CIFAR reader must refuse it before anything runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar_reader_refuses_a_pickle_that_would_run_code(cifar_root):
    marker = cifar_root / "pwned"
    batch = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    write_pickle(batch, {"data": np.zeros((1, 3072), np.uint8), "labels": [_Payload(marker)]}, protocol=2)
    with pytest.raises(DataError, match="is not allowed in a CIFAR batch"):
        build_data(cifar_cfg(cifar_root), seed=0)
    assert not marker.exists()
    write_pickle(batch, {"data": np.zeros((1, 100), np.uint8), "labels": [0]}, protocol=2)
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        build_data(cifar_cfg(cifar_root), seed=0)


# -------------------------------------------------------------------------------------------------- ImageFolder
def test_image_folder_loads_with_indices_the_same_with_worker_processes(tmp_path):
    write_image_folder(tmp_path, {"cat": 4, "dog": 3})
    cfg = DataConfig(
        dataset="imagefolder", root=str(tmp_path), batch_size=3, val_batch_size=3, image_size=16,
        val_split=None, select_on="test",
    )  # fmt: skip
    dm = build_data(cfg, seed=2)
    assert dm.spec == DataSpec(2, 3, 16, 7, 0, 4, "imagefolder")
    batches = all_batches(dm, 1)
    assert len(batches) == 2 and batches[0].x.shape == (3, 3, 16, 16)
    index = torch.cat([b.index for b in batches])
    assert torch.equal(index, dm.epoch_indices(1)[:6])
    assert torch.equal(torch.cat([b.y for b in batches]), (index >= 4).long())  # cat: 0..3, dog: 4..6
    assert_same_batches(all_batches(dm, 1, start_step=1), batches[1:])
    with_workers = build_data(cfg.model_copy(update={"num_workers": 1}), seed=2)
    assert_same_batches(all_batches(with_workers, 1), batches)
    test = list(dm.eval_batches("test"))
    assert [b.index.tolist() for b in test] == [[0, 1, 2], [3]]
    assert torch.cat([b.y for b in test]).tolist() == [0, 0, 1, 1]
    assert_same_batches(test, list(dm.eval_batches("test")))


def test_image_folder_without_a_split_tests_on_its_training_images(tmp_path):
    write_image_folder(tmp_path, {"a": 2, "b": 2})
    flat = tmp_path / "train"  # class folders directly under the root
    with pytest.warns(UserWarning, match="test split is the training images themselves"):
        dm = build_data(
            DataConfig(
                dataset="imagefolder",
                root=str(flat),
                batch_size=2,
                augment=False,
                val_split=None,
                select_on="test",
            ),
            seed=0,
        )
    assert (dm.spec.train_len, dm.spec.test_len, dm.spec.image_size) == (4, 4, 64)
    from types import SimpleNamespace

    from kdray.run import selection_note

    cfg = SimpleNamespace(data=SimpleNamespace(select_on="test", val_split=None))
    assert selection_note(cfg, dm)["note"].endswith("its test split is the training images")  # summary.json
    val = torch.cat([b.x for b in dm.eval_batches("test")])
    train = {int(i): x for b in dm.train_batches(0) for i, x in zip(b.index, b.x)}
    assert all(torch.equal(train[i], val[i]) for i in train)


def test_image_folder_errors_say_what_to_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")), seed=0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no .*val"):
        build_data(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0)


# ---------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_learnable_and_independent_of_the_run_seed():
    cfg = DataConfig(
        dataset="synthetic", batch_size=64, synthetic=SyntheticConfig(num_classes=10, train_len=1000)
    )
    a, b = build_data(cfg, seed=0), build_data(cfg, seed=1)
    assert not torch.equal(a.epoch_indices(0), b.epoch_indices(0))
    assert torch.equal(a.splits["test"][0], b.splits["test"][0])
    assert a.spec == DataSpec(10, 3, 32, 900, 100, 256, "synthetic")
    # nearest class mean, estimated from the training batches, classifies the validation set
    xs, ys = zip(*((batch.x, batch.y) for batch in a.train_batches(0)))
    x, y = torch.cat(xs).flatten(1), torch.cat(ys)
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    val = list(a.eval_batches("test"))
    pred = torch.cdist(torch.cat([v.x for v in val]).flatten(1), means).argmin(1)
    accuracy = (pred == torch.cat([v.y for v in val])).float().mean().item()
    assert accuracy > 0.9
    assert abs(x.std().item() - 1) < 0.1  # already normalised


# ------------------------------------------------------------------------- validation split, label noise, pairs
def test_val_split_is_carved_from_the_training_set_disjoint_and_seeded(cifar_root):
    dm = build_data(cifar_cfg(cifar_root, val_split=0.25, select_on="val", augment=False), seed=5)
    assert (dm.spec.train_len, dm.spec.val_len, dm.spec.test_len) == (30, 10, 12)
    val_ids = carved_ids(40, 10, seed=5)
    train_ids = [i for i in range(40) if i not in val_ids]
    raw = torch.from_numpy(cifar_images(40, 0)).reshape(40, 3, 32, 32)
    mean, std = NORMALISATION["cifar10"]
    val_x = torch.cat([b.x for b in dm.eval_batches("val")])
    assert torch.equal(val_x, normalise(raw[val_ids], mean, std))  # exactly the carved samples, in order
    seen = torch.cat([b.index for b in dm.train_batches(0)])  # positions in the training split
    assert set(torch.tensor(train_ids)[seen].tolist()).isdisjoint(val_ids)
    assert (
        build_data(cifar_cfg(cifar_root, val_split=10, select_on="val"), seed=5).spec.val_len == 10
    )  # a count
    other = build_data(cifar_cfg(cifar_root, val_split=0.25, select_on="val"), seed=6)
    assert not torch.equal(torch.cat([b.y for b in other.eval_batches("val")]), torch.tensor(val_ids) % 10)
    with pytest.raises(DataError, match="data.val_split = 40"):
        build_data(cifar_cfg(cifar_root, val_split=40, select_on="val"), seed=0)


def test_selection_on_the_test_split_must_be_said():
    with pytest.raises(Exception, match="select_on"):
        DataConfig(val_split=None)
    assert DataConfig(val_split=None, select_on="test").select_on == "test"


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_label_noise_corrupts_exactly_the_recorded_share(cifar_root, kind):
    cfg = cifar_cfg(cifar_root, label_noise={"kind": kind, "rate": 0.4}, augment=False)
    dm = build_data(cfg, seed=3)
    noise = dm.noise
    assert noise["corrupted"] == 16 and noise["of"] == 40 and len(noise["indices"]) == 16
    clean = torch.arange(40) % 10  # the fake set's labels
    noisy = dm.train_labels()
    changed = (noisy != clean).nonzero().flatten().tolist()
    assert changed == noise["indices"]  # every recorded index changed, nothing else did
    assert (
        noise["clean_labels"] == clean[changed].tolist() and noise["noisy_labels"] == noisy[changed].tolist()
    )
    if kind == "pair":
        assert torch.equal(noisy[changed], (clean[changed] + 1) % 10)
    assert torch.equal(build_data(cfg, seed=3).train_labels(), noisy)  # seeded
    assert not torch.equal(build_data(cfg, seed=4).train_labels(), noisy)
    assert torch.cat([b.y for b in dm.eval_batches("test")]).tolist() == [9 - i % 10 for i in range(12)]


def test_class_pairs_are_same_class_other_samples(cifar_root):
    dm = build_data(cifar_cfg(cifar_root, batch_size=10), seed=0)
    labels = dm.train_labels()
    for epoch in (0, 1):
        for batch in dm.train_batches(epoch, pairs=True):
            pair = batch.pair
            assert torch.equal(labels[pair.index], labels[batch.index])  # same class
            assert (pair.index != batch.index).all()  # another sample (4 of each class here)
            assert torch.equal(pair.y, batch.y) and pair.x.shape == batch.x.shape
    again = [b.pair.index for b in dm.train_batches(0, pairs=True)]
    assert all(torch.equal(a, b.pair.index) for a, b in zip(again, dm.train_batches(0, pairs=True)))


def test_without_training_data_only_evaluation_splits_remain(cifar_root):
    dm = build_data(cifar_cfg(cifar_root, val_split=8, select_on="val"), seed=0, with_train=False)
    assert (dm.spec.train_len, dm.spec.val_len, dm.spec.test_len, dm.steps_per_epoch()) == (0, 8, 12, 0)
    assert len(torch.cat([b.y for b in dm.eval_batches("val")])) == 8
