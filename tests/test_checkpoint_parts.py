"""Checkpoints written as per-process parts plus a manifest (kdray.checkpoint): assembled into exactly what a gathered
checkpoint holds, every part checked, and old parts pruned without touching what a manifest or a later step needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdray.checkpoint import (
    PARTS,
    load_checkpoint,
    manifest_files,
    merge_parts,
    prune_parts,
    save_checkpoint,
    save_part,
)
from kdray.errors import CheckpointError

CONFIG = {
    "peers": [{"name": "a", "arch": "resnet8"}, {"name": "b", "arch": "resnet8"}],
    "method": {"name": "dml"},
}


def _peer(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"net": {"w": torch.randn(3, 2, generator=g, dtype=torch.float64)}, "state": {}, "optimizers": []}


def _parts() -> list[dict]:
    return [
        {
            "peers": {"a": _peer(0)},
            "shared": {"g": torch.ones(2)},
            "exchange": {0: {"seen": torch.tensor(5)}},
        },
        {"peers": {"b": _peer(1)}, "shared": None, "exchange": {1: {"seen": torch.tensor(7)}}},
    ]


def _meta(epoch: int = 1) -> dict:
    return {"config": CONFIG, "epoch": epoch, "step": 4 * epoch, "rng": torch.get_rng_state(), "history": []}


def _write(ckpt: Path, step: int = 4, parts: list[dict] | None = None, name: str = "last.pt") -> list[dict]:
    entries = [save_part(ckpt, step, rank, part) for rank, part in enumerate(parts or _parts())]
    save_checkpoint(ckpt / name, {**_meta(), "peers": {}, "shared": None, "exchange": {}, "parts": entries})
    return entries


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_a_manifest_loads_as_the_gathered_checkpoint_of_the_same_parts(tmp_path):
    _write(tmp_path / "parts")
    save_checkpoint(tmp_path / "gathered" / "last.pt", {**_meta(), **merge_parts(_parts())})
    got, want = load_checkpoint(tmp_path / "parts"), load_checkpoint(tmp_path / "gathered")
    assert "parts" not in got
    assert _same(got, want)
    assert _same(got["shared"], {"g": torch.ones(2)})  # rank 0's shared module, not another rank's None
    assert set(got["exchange"]) == {0, 1} and int(got["exchange"][1]["seen"]) == 7


def test_part_files_are_named_by_their_content_so_none_is_rewritten_with_other_bytes(tmp_path):
    first = _write(tmp_path)
    changed = _parts()
    changed[1]["peers"]["b"]["net"]["w"] += 1.0
    second = _write(tmp_path, parts=changed)  # the same step again (a restart): rank 1's part is another file
    assert first[0] == second[0] and first[1]["file"] != second[1]["file"]
    assert (tmp_path / first[1]["file"]).is_file()
    assert torch.equal(
        load_checkpoint(tmp_path)["peers"]["b"]["net"]["w"], changed[1]["peers"]["b"]["net"]["w"]
    )


def test_a_missing_swapped_or_escaping_part_is_refused_in_one_line(tmp_path):
    entries = _write(tmp_path)
    part = tmp_path / entries[1]["file"]
    saved = part.read_bytes()
    # another valid part written under this one's name (what a mixed-up copy would do)
    other = tmp_path / "elsewhere" / save_part(tmp_path / "elsewhere", 4, 1, _parts()[0])["file"]
    part.write_bytes(other.read_bytes())
    with pytest.raises(
        CheckpointError, match=r"part parts/step-0000000004/rank1-.*not the one it was written with"
    ):
        load_checkpoint(tmp_path)
    part.unlink()
    with pytest.raises(CheckpointError, match=r"needs its part parts/step-0000000004/rank1-.*missing"):
        load_checkpoint(tmp_path)
    part.write_bytes(saved[:-10])  # truncated: its own seal refuses it
    with pytest.raises(CheckpointError, match="seal|cannot be read"):
        load_checkpoint(tmp_path)
    for bad in ("../escape.pt", "/etc/passwd", "other/rank0.pt"):
        save_checkpoint(
            tmp_path / "last.pt",
            {
                **_meta(),
                "peers": {},
                "shared": None,
                "exchange": {},
                "parts": [{"file": bad, "sha256": "0" * 64}],
            },
        )
        with pytest.raises(CheckpointError, match="outside its folder"):
            load_checkpoint(tmp_path)


def test_pruning_keeps_what_a_manifest_or_a_later_step_needs(tmp_path):
    old = _write(tmp_path, step=4, name="best.pt")
    _write(tmp_path, step=8)  # a stale step no manifest refers to
    (tmp_path / "last.pt").rename(tmp_path / "stale.pt")
    last = _write(tmp_path, step=12)
    changed = _parts()
    changed[0]["peers"]["a"]["net"]["w"] -= 1.0
    ahead = save_part(tmp_path, 16, 0, changed[0])  # another process is already at the next checkpoint
    keep = manifest_files(tmp_path / "last.pt") | manifest_files(tmp_path / "best.pt")
    assert keep == {e["file"] for e in old + last}
    removed = prune_parts(tmp_path, 12, keep)
    left = {str(p.relative_to(tmp_path)) for p in (tmp_path / PARTS).rglob("*.pt")}
    assert removed == 2 and left == keep | {ahead["file"]}
    assert not (tmp_path / PARTS / "step-0000000008").exists()  # the emptied folder went too
    assert _same(load_checkpoint(tmp_path / "best.pt")["peers"], load_checkpoint(tmp_path)["peers"])
    assert manifest_files(tmp_path / "nothing.pt") == set()


def test_a_part_alone_is_not_a_checkpoint(tmp_path):
    entries = _write(tmp_path)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / entries[0]["file"])


class _Ranks:
    """Rank 0 of a process group whose other ranks answer ``others`` to the probe question."""

    rank, world = 0, 3

    def __init__(self, others: list[bool]) -> None:
        self.others = others

    def all_gather(self, obj):
        return [obj, *self.others] if isinstance(obj, bool) else [obj] * self.world


PLACEMENT = [{"hostname": f"node{r}", "node_ip": f"127.0.0.{r + 1}"} for r in range(3)]


def test_the_probe_chooses_per_process_parts_only_where_every_worker_sees_the_folder(tmp_path):
    from kdray.engines.ray_worker import shared_checkpoint_folder
    from kdray.errors import KdrayError

    ckpt = tmp_path / "checkpoints"
    assert shared_checkpoint_folder("auto", ckpt, _Ranks([True, True]), PLACEMENT, "a1") is True
    assert not list(ckpt.iterdir())  # the probe went
    assert shared_checkpoint_folder("auto", ckpt, _Ranks([True, False]), PLACEMENT, "a2") is False
    assert shared_checkpoint_folder("gather", ckpt, _Ranks([True, True]), PLACEMENT, "a3") is False
    with pytest.raises(
        KdrayError, match=r"checkpoint_writes: per_process .* node2 \(127\.0\.0\.3\) cannot see it"
    ):
        shared_checkpoint_folder("per_process", ckpt, _Ranks([True, False]), PLACEMENT, "a4")
    # rank 0 cannot write the probe (the folder is under a file): every rank still leaves the probe together
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert shared_checkpoint_folder("auto", blocked / "ckpt", _Ranks([True, True]), PLACEMENT, "a5") is False
    with pytest.raises(KdrayError, match="or rank 0 could not write there"):
        shared_checkpoint_folder("per_process", blocked / "ckpt", _Ranks([True, True]), PLACEMENT, "a6")


def test_a_copied_manifest_is_one_self_contained_file_and_a_gathered_file_is_copied_as_it_is(tmp_path):
    from kdray.checkpoint import copy_checkpoint, is_manifest

    _write(tmp_path / "run")
    assert is_manifest(tmp_path / "run" / "last.pt")
    copied = copy_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "study" / "best.pt")
    assert not is_manifest(copied)
    (tmp_path / "run").rename(tmp_path / "gone")  # the run folder's parts are no longer there
    got, want = load_checkpoint(copied), load_checkpoint(tmp_path / "gone")
    assert _same(got, want)
    again = copy_checkpoint(copied, tmp_path / "tune" / "checkpoint.pt")  # a whole file: the same bytes
    assert again.read_bytes() == copied.read_bytes() and not is_manifest(tmp_path / "nothing.pt")


def test_an_unreadable_manifest_prunes_nothing(tmp_path):
    _write(tmp_path, step=4, name="best.pt")
    _write(tmp_path, step=8)
    assert manifest_files(tmp_path / "absent.pt") == set()
    (tmp_path / "best.pt").write_bytes(b"half a file")
    assert manifest_files(tmp_path / "best.pt") is None
