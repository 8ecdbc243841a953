"""Reading any file kdray did not write fails with exit code 2 and one line, whatever its bytes, and never runs what
the file holds nor advises an unsafe load.

Checkpoints (``kdray eval FILE``, ``kdray train --resume FILE``), configs (``kdray train FILE``), search spaces
(``kdray tune CONFIG --space FILE``) and cluster files (``kdray cluster check FILE``), damaged or foreign in every way
listed in ``CATEGORIES``. The CLI runs in-process (``kdray.cli.main``, stderr captured) to keep 1000+ cases fast;
``test_real_processes_behave_the_same`` runs a handful as real ``python -m kdray`` processes. Seeded: every run
tries the same cases. ``docs/faults.md`` has the figures.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import random
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from kdray.checkpoint import FORMAT, SEAL, SEAL_LEN, VERSION, load_checkpoint, seal
from kdray.cli import main

from .conftest import REPO, kdray_proc, tiny, without_ray_forwarded, write_yaml

CATEGORIES: dict[str, Counter] = {}  # category -> tried / survived / lost (written to $KDRAY_FAULTS_REPORT)
REPORT_LABEL = "fuzz"  # the "file" of this module's rows in $KDRAY_FAULTS_REPORT


def verdict(
    code: int | None, err: str, raised: BaseException | None = None, accept_ok: bool = False
) -> str | None:
    """What is wrong with one outcome (None: the file was refused as it should be)."""
    if raised is not None:
        return f"raised {type(raised).__name__}: {str(raised)[:200]}"
    if "Traceback" in err or "weights_only=False" in err:
        return f"stderr advises or shows too much: {err[-300:]!r}"
    lines = err.strip().splitlines()
    if accept_ok and (code == 0 or (code == 2 and lines and lines[0].startswith("kdray: error:"))):
        return None
    if code != 2:
        return f"exit code {code}, stderr {err[-300:]!r}"
    if len(lines) != 1 or not lines[0].startswith("kdray: error:"):
        return f"stderr is not one 'kdray: error:' line: {err[-500:]!r}"
    return None


class Battery:
    """Runs CLI invocations in-process, counts them per category, gathers what went wrong."""

    def __init__(self, capsys, category: str):
        self.capsys, self.category = capsys, category
        self.failures: list[str] = []
        self.tally = CATEGORIES.setdefault(category, Counter())

    def run(self, label: str, *argv, accept_ok: bool = False) -> None:
        """Run ``kdray ARGV``; it must refuse with one line (``accept_ok``: or succeed; a refusal may then list the
        file's problems, one per line)."""
        self.capsys.readouterr()
        code, raised = None, None
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                code = main([str(a) for a in argv])
            except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt, anything: a lost case
                raised = exc
        err = without_ray_forwarded(self.capsys.readouterr().err)
        # what a real process would print of the warnings (Python's default filters hide these categories)
        hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
        err += "".join(
            f"{w.category.__name__}: {w.message}\n" for w in said if not issubclass(w.category, hidden)
        )
        problem = verdict(code, err, raised, accept_ok)
        self.tally["tried"] += 1
        self.tally["lost" if problem else "survived"] += 1
        if problem:
            self.failures.append(f"{label}: {problem}")

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} case(s) lost:\n" + "\n".join(self.failures[:20])


@pytest.fixture(scope="module")
def real_bytes(trained_run) -> bytes:
    return (trained_run / "checkpoints" / "last.pt").read_bytes()


def checkpoint_commands(battery: Battery, label: str, file: Path, resume: bool = True) -> None:
    """A checkpoint file read by ``kdray eval`` and (``resume``) by ``kdray train --resume``."""
    battery.run(f"eval {label}", "eval", file)
    if resume:
        battery.run(f"resume {label}", "train", "--resume", file)


def yaml_commands(battery: Battery, label: str, file: Path, config: Path, tmp: Path) -> None:
    """A YAML file read as a config, a search space and a cluster file."""
    battery.run(f"config {label}", "train", file, "--out", tmp / "never")
    battery.run(f"space {label}", "tune", config, "--space", file, "--out", tmp / "never-study")
    battery.run(f"cluster {label}", "cluster", "check", file)


# --------------------------------------------------------------------------------------------------- checkpoints
def test_the_real_checkpoint_still_loads_sealed_or_not(capsys, tmp_path, trained_run, real_bytes):
    """The control: the battery refuses what is damaged, not everything. A checkpoint written before the seal
    existed (the same archive without its zip comment) is still read."""
    assert real_bytes[-SEAL_LEN:].startswith(SEAL)
    assert main(["eval", str(trained_run)]) == 0, capsys.readouterr().err
    unsealed = tmp_path / "unsealed.pt"
    buf = io.BytesIO()
    torch.save(load_checkpoint(trained_run), buf)
    unsealed.write_bytes(buf.getvalue())
    capsys.readouterr()
    assert main(["eval", str(unsealed)]) == 0, capsys.readouterr().err


def test_truncated_checkpoints(capsys, tmp_path, real_bytes):
    """A real checkpoint cut at every 1/64th of its length (0: an empty file)."""
    b = Battery(capsys, "checkpoint truncated at k/64 of its length")
    for k in range(64):
        cut = len(real_bytes) * k // 64
        file = tmp_path / f"cut{k}.pt"
        file.write_bytes(real_bytes[:cut])
        checkpoint_commands(b, f"cut at {cut}/{len(real_bytes)}", file)
    b.check()


def test_flipped_bytes(capsys, tmp_path, real_bytes):
    """One, two or eight bytes of a real checkpoint changed at random positions (anywhere: the pickle, a tensor,
    the zip directory, the seal)."""
    b = Battery(capsys, "checkpoint with bytes flipped at random positions")
    rng = random.Random(14)
    for i in range(512):
        data = bytearray(real_bytes)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(len(data))
            data[pos] ^= rng.randrange(1, 256)
        file = tmp_path / f"flip{i}.pt"
        file.write_bytes(bytes(data))
        checkpoint_commands(b, f"flip #{i}", file, resume=i % 4 == 0)
    # the seal region itself: the digest, its marker, the comment length
    for back in range(1, 100):
        data = bytearray(real_bytes)
        data[-back] ^= 0x01
        file = tmp_path / f"tail{back}.pt"
        file.write_bytes(bytes(data))
        checkpoint_commands(b, f"flip {back} bytes from the end", file, resume=False)
    b.check()


def test_random_bytes(capsys, tmp_path):
    """Random bytes of random length, some dressed as a zip or a pickle at the start."""
    b = Battery(capsys, "checkpoint of random bytes")
    rng = random.Random(1414)
    heads = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05", b"PK\x05\x06"]
    for i in range(128):
        data = rng.choice(heads) + rng.randbytes(rng.choice([1, 21, 22, 99, 1000, 70_000]))
        if i % 8 == 0:  # a fake end-of-zip record (no seal) at the very end
            data += b"PK\x05\x06" + rng.randbytes(16) + b"\0\0"
        file = tmp_path / f"random{i}.pt"
        file.write_bytes(data)
        checkpoint_commands(b, f"random #{i} ({len(data)} bytes)", file, resume=i % 2 == 0)
    b.check()


def _zip(members: dict[str, bytes], comment: bytes = b"", deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.comment = comment
    return buf.getvalue()


def test_zip_files_that_are_not_checkpoints(capsys, tmp_path):
    b = Battery(capsys, "zip file that is not a checkpoint")
    plain = _zip({"hello.txt": b"hello"})
    fake_seal = b"kdray-sha256:" + b"0" * 64
    cases = {
        "text member": plain,
        "deflated members": _zip({"a/b.txt": b"x" * 1000, "c.bin": os.urandom(64)}, deflate=True),
        "empty zip": _zip({}),
        "garbage data.pkl": _zip({"archive/data.pkl": b"\x80\x02garbage", "archive/version": b"3\n"}),
        "data.pkl of a list": _zip({"archive/data.pkl": pickle.dumps([1, 2]), "archive/version": b"3\n"}),
        "a foreign comment": _zip({"hello.txt": b"hello"}, comment=b"made elsewhere"),
        "a forged kdray seal": _zip({"hello.txt": b"hello"}, comment=fake_seal),
        "a true seal on a foreign zip": seal(plain),
        "a sealed zip, then appended bytes": seal(plain) + b"tail",
    }
    for label, data in cases.items():
        file = tmp_path / f"{label.replace(' ', '_')}.pt"
        file.write_bytes(data)
        checkpoint_commands(b, label, file)
    b.check()


def _saved(obj, sealed: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return seal(buf.getvalue()) if sealed else buf.getvalue()


def test_foreign_and_malformed_torch_files(capsys, tmp_path, trained_run):
    """``torch.save`` of what is not a kdray checkpoint: a wrong 'format', another version, missing or malformed
    parts; each unsealed (as any torch file) and sealed (so the structural checks alone must refuse it)."""
    b = Battery(capsys, "torch.save of a dict with a wrong 'format' or shape")
    real = load_checkpoint(trained_run)
    head = {"format": FORMAT, "version": VERSION}

    def real_with(**changes):
        out = {**real, **changes}
        return {k: v for k, v in out.items() if v is not _DROP}

    cases = {
        "weights only": {"weights": torch.zeros(2)},
        "wrong format": {**real, "format": "other-tool"},
        "no format": {k: v for k, v in real.items() if k != "format"},
        "version 1": {**real, "version": 1},
        "version as text": {**real, "version": "2"},
        "version huge repr": {**real, "version": list(range(10_000))},
        "missing peers": real_with(peers=_DROP),
        "missing rng": real_with(rng=_DROP),
        "config a list": real_with(config=[1, 2]),
        "peers a list": real_with(peers=[1, 2]),
        "no peers": real_with(peers={}),
        "renamed peer": real_with(peers={"intruder": real["peers"]["peer0"]}),
        "epoch negative": real_with(epoch=-1),
        "epoch text": real_with(epoch="1"),
        "rng floats": real_with(rng=torch.zeros(4)),
        "net not tensors": real_with(peers={"peer0": {"net": {"w": 1.0}}, "peer1": real["peers"]["peer1"]}),
        "config without peers": real_with(config={k: v for k, v in real["config"].items() if k != "peers"}),
        "config without method": real_with(config={k: v for k, v in real["config"].items() if k != "method"}),
        "a list": [1, 2, 3],
        "a tensor": torch.zeros(3),
        "a string": "kdray-population",
        "none": None,
        "only the header": head,
    }
    for label, obj in cases.items():
        for sealed in (False, True):
            file = tmp_path / f"{label.replace(' ', '_')}{'_sealed' if sealed else ''}.pt"
            file.write_bytes(_saved(obj, sealed))
            checkpoint_commands(b, f"{label}{' (sealed)' if sealed else ''}", file)
    b.check()


_DROP = object()


def test_checkpoints_of_other_shapes(capsys, tmp_path, trained_run):
    """A kdray checkpoint, sealed or not, whose network holds a tensor of another shape (every 6th tensor of peer1:
    convolutions, batch-norm weights and statistics, the counter, the classifier), misses one, or holds one more:
    ``eval`` and ``train --resume`` refuse it in one line that names the peer, the tensor and both shapes; so does
    a frozen teacher loaded from it (``peers.N.checkpoint``)."""
    b = Battery(capsys, "checkpoint of other shapes (each tensor of a peer, one missing, one added)")
    real = load_checkpoint(trained_run)
    net = real["peers"]["peer1"]["net"]
    assert len(net) > 20
    named = []  # (file, the words its error must hold)

    def with_net(new_net):
        peers = {**real["peers"], "peer1": {**real["peers"]["peer1"], "net": new_net}}
        return {**real, "peers": peers}

    for i, (name, tensor) in list(enumerate(net.items()))[::6]:
        other = torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:]) if tensor.dim() else torch.zeros(2)
        file = tmp_path / f"shape{i}.pt"
        file.write_bytes(_saved(with_net({**net, name: other}), sealed=i % 2 == 0))
        shapes = (
            f"[{', '.join(map(str, other.shape))}] in the checkpoint, [{', '.join(map(str, tensor.shape))}]"
        )
        named.append((file, ["peer 'peer1'", f"tensor '{name}'", shapes]))
    first = next(iter(net))
    for label, new_net, words in [
        ("missing", {k: v for k, v in net.items() if k != first}, [f"has no tensor '{first}'"]),
        ("added", {**net, "extra.weight": torch.zeros(3)}, ["holds a tensor 'extra.weight'"]),
    ]:
        file = tmp_path / f"{label}.pt"
        file.write_bytes(_saved(with_net(new_net), sealed=True))
        named.append((file, ["peer 'peer1'", *words]))
    for file, _ in named:
        b.run(f"resume {file.name}", "train", "--resume", file)  # the resume path: the same refusal
    b.check()
    for file, words in named:  # eval, with the words of its line
        capsys.readouterr()
        code = main(["eval", str(file)])
        err = capsys.readouterr().err
        b.tally["tried"] += 1
        b.tally[
            "survived" if code == 2 and err.count("\n") == 1 and all(w in err for w in words) else "lost"
        ] += 1
        assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), (words, err)
    # a frozen teacher loaded from such a file (kdray/checkpoint.py load_peer_weights)
    raw = tiny()
    raw["method"] = {"name": "kd"}
    raw["peers"] = [
        {"name": "teacher", "arch": "resnet8", "arch_kwargs": {"width": 4}, "frozen": True,
         "checkpoint": str(named[0][0]), "checkpoint_peer": "peer1"},
        {"name": "student", "arch": "resnet8", "arch_kwargs": {"width": 4}},
    ]  # fmt: skip
    config = write_yaml(tmp_path / "teacher.yaml", raw)
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in ["'peer1'", *named[0][1][1:]]), err


class Payload:
    """Unpickling this creates the marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payloads_never_run(capsys, tmp_path):
    """Files whose unpickling would create a marker file (raw pickles of every protocol, inside a torch zip, sealed
    or not, nested in a kdray-looking dict), and YAML that asks to call Python: refused, and the marker never
    appears."""
    b = Battery(capsys, "pickle payload (must never run)")
    marker = tmp_path / "PWNED"
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))  # the payload is live: unpickled, it creates its file
    assert proof.exists()
    files = {}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        files[f"raw pickle protocol {protocol}"] = pickle.dumps(Payload(marker), protocol=protocol)
        files[f"raw pickle of a dict, protocol {protocol}"] = pickle.dumps(
            {"format": FORMAT, "version": VERSION, "x": Payload(marker)}, protocol=protocol
        )
    for sealed in (False, True):
        tag = " (sealed)" if sealed else ""
        files[f"torch.save of the payload{tag}"] = _saved(Payload(marker), sealed)
        files[f"torch.save of a kdray-looking dict{tag}"] = _saved(
            {
                "format": FORMAT,
                "version": VERSION,
                "config": {},
                "epoch": 0,
                "peers": {},
                "rng": Payload(marker),
            },
            sealed,
        )
        files[f"payload as data.pkl of a zip{tag}"] = (seal if sealed else bytes)(
            _zip({"archive/data.pkl": pickle.dumps(Payload(marker), protocol=2), "archive/version": b"3\n"})
        )
    for label, data in files.items():
        file = tmp_path / f"{label.replace(' ', '_').replace(',', '')}.pt"
        file.write_bytes(data)
        checkpoint_commands(b, label, file)
        assert not marker.exists(), f"{label}: the payload ran"
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    for i, text in enumerate(
        [
            f"!!python/object/apply:builtins.open ['{marker}', 'w']\n",
            f"name: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
            f"!!python/object/new:builtins.open ['{marker}', 'w']\n",
            f"params: !!python/object/apply:os.system ['touch {marker}']\n",
        ]
    ):
        file = tmp_path / f"payload{i}.yaml"
        file.write_text(text)
        yaml_commands(b, f"YAML python tag #{i}", file, config, tmp_path)
        assert not marker.exists(), f"YAML python tag #{i}: the payload ran"
    b.check()


# ---------------------------------------------------------------------------------------- any file, any reader
def test_empty_files_and_folders(capsys, tmp_path, trained_run):
    b = Battery(capsys, "empty file, or a folder where a file is expected")
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    empty = tmp_path / "empty.yaml"
    empty.write_bytes(b"")
    checkpoint_commands(b, "empty file", empty)
    yaml_commands(b, "empty file", empty, config, tmp_path)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    checkpoint_commands(b, "an empty folder", folder)
    yaml_commands(b, "a folder", folder, config, tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints" / "last.pt").mkdir(parents=True)  # a folder named like the checkpoint
    checkpoint_commands(b, "a folder named last.pt", run)
    b.run("a file too long to name", "eval", tmp_path / ("x" * 5000))
    b.check()


def _garbage(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randrange(1, 2048))
    alphabet = "abc xyz 019 :-[]{}!&*#|>'\"%@`,?\n\t\\"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 512))).encode()


def test_binary_garbage_as_yaml(capsys, tmp_path):
    """Random bytes and random YAML punctuation, as a config, a space and a cluster file."""
    b = Battery(capsys, "binary garbage as config / space / cluster file")
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    rng = random.Random(4141)
    for i in range(64):
        file = tmp_path / f"garbage{i}.yaml"
        file.write_bytes(_garbage(rng))
        yaml_commands(b, f"garbage #{i}", file, config, tmp_path)
    b.check()


SHAPES = [
    "[]",
    "[1, 2, 3]",
    "- a\n- b\n",
    "42",
    "3.5",
    "true",
    "null",
    "~",
    "'text'",
    "just words",
    "---\n...\n",
]


def test_yaml_that_is_not_a_mapping(capsys, tmp_path):
    b = Battery(capsys, "YAML that is a list or a scalar")
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    for i, text in enumerate(SHAPES):
        file = tmp_path / f"shape{i}.yaml"
        file.write_text(text)
        yaml_commands(b, f"YAML {text!r}", file, config, tmp_path)
    b.check()


def _nested(kind: str, depth: int) -> str:
    if kind == "flow list":
        return "[" * depth + "1" + "]" * depth
    if kind == "flow mapping":
        return "{a: " * depth + "1" + "}" * depth
    return "".join("  " * i + "a:\n" for i in range(depth)) + "  " * depth + "1\n"


def test_deeply_nested_yaml(capsys, tmp_path):
    """Nesting from 10 to 20 000 levels (deeper than Python's recursion limit), at the top, and (where YAML can
    hold it) inside a key of a file each reader otherwise accepts."""
    b = Battery(capsys, "deeply nested YAML")
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    cluster = yaml.safe_load((REPO / "deploy" / "onprem.yaml").read_text())
    i = 0
    for kind in ("flow list", "flow mapping", "block mapping"):
        deepest = {"flow list": 2000, "flow mapping": 20_000, "block mapping": 3000}[
            kind
        ]  # PyYAML: 1-2 s each
        for depth in (10, 100, 300, 1000, deepest):
            body = _nested(kind, depth)
            file = tmp_path / f"nested{i}.yaml"
            file.write_text(body)
            yaml_commands(b, f"{kind} depth {depth}", file, config, tmp_path)
            if kind == "block mapping" or depth > 300:  # deeper: refused as YAML already, as above
                i += 1
                continue
            inner = {  # a config, a space and a cluster file, each valid but for one nested value
                "config": yaml.safe_dump(tiny()).replace("epochs: 1", f"epochs: {body}"),
                "space": f"params:\n  no.such.key: {{dist: choice, values: [{body}]}}\n",
                "cluster": yaml.safe_dump(cluster).replace("ssh_user: kdray", f"ssh_user: {body}"),
            }
            for what, text in inner.items():
                file = tmp_path / f"nested{i}-{what}.yaml"
                file.write_text(text)
                argv = {
                    "config": ["train", file, "--out", tmp_path / "never"],
                    "space": ["tune", config, "--space", file, "--out", tmp_path / "never-study"],
                    "cluster": ["cluster", "check", file],
                }[what]
                b.run(f"{what} holding a {kind} of depth {depth}", *argv)
            i += 1
    b.check()


def test_cluster_files_with_values_of_any_type(capsys, tmp_path):
    """deploy/onprem.yaml with one value (any key, at any depth) replaced by a value of another type: accepted or
    refused, never a traceback (a well-formed file may be accepted: exit 0 or 2, one line when refused, or the list
    of the file's problems)."""
    b = Battery(capsys, "cluster file with one value of another type")
    base = yaml.safe_load((REPO / "deploy" / "onprem.yaml").read_text())
    junk = [None, 0, -5, 3.5, "x", "", [], [1, {"a": None}], {}, {"a": [1]}, True, 10**30, "é" * 3]

    def paths(node, prefix=()):
        yield prefix
        children = (
            node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        )
        for k, v in children:
            yield from paths(v, (*prefix, k))

    every = list(paths(base))[1:]
    rng = random.Random(7)
    for i in range(96):
        raw = copy.deepcopy(base)
        where = rng.choice(every)
        node = raw
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = rng.choice(junk)
        file = tmp_path / f"mutated{i}.yaml"
        file.write_text(yaml.safe_dump(raw))
        b.run(f"{'.'.join(map(str, where))} replaced", "cluster", "check", file, accept_ok=True)
    b.check()


INVALID_UTF8 = [
    b"\xff\xfe\xfd",
    b"name: caf\xe9\n",  # Latin-1
    b"name: \xc3\x28\n",
    b"\x80abc: 1\n",
    b"name: \xc0\xaf\n",  # overlong
    b"name: \xed\xa0\x80\n",  # a surrogate
    b"\xff\xfe" + "name: x\n".encode("utf-16-le"),
    b"peers: [{arch: resnet8}]\nname: \xf8\x88\x80\x80\x80\n",
]


def test_invalid_utf8(capsys, tmp_path):
    b = Battery(capsys, "invalid UTF-8")
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    for i, data in enumerate(INVALID_UTF8):
        file = tmp_path / f"utf{i}.yaml"
        file.write_bytes(data)
        yaml_commands(b, f"invalid UTF-8 #{i}", file, config, tmp_path)
        checkpoint_commands(b, f"invalid UTF-8 #{i}", file, resume=False)
    b.check()


def test_out_is_an_existing_file(capsys, tmp_path):
    """``kdray train CONFIG --out FILE``: refused with one line, the file untouched, no folder made."""
    b = Battery(capsys, "--out is an existing file")
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    out = tmp_path / "a_file"
    out.write_bytes(b"precious")
    b.run("--out FILE", "train", config, "--out", out)
    b.check()
    assert out.read_bytes() == b"precious"


def test_out_inside_an_existing_file(capsys, tmp_path):
    out = tmp_path / "a_file"
    out.write_bytes(b"precious")
    code = main(["train", str(write_yaml(tmp_path / "ok.yaml", tiny())), "--out", str(out / "inside")])
    err = capsys.readouterr().err
    assert verdict(code, err) is None
    assert out.read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------------ real processes
def test_real_processes_behave_the_same(tmp_path, trained_run):
    """A handful of the cases above through ``python -m kdray`` (started together: they only read a file)."""
    marker = tmp_path / "PWNED"
    real = (trained_run / "checkpoints" / "last.pt").read_bytes()
    files = {
        "truncated.pt": real[: len(real) // 2],
        "flipped.pt": real[:1000] + bytes([real[1000] ^ 0xFF]) + real[1001:],
        "payload.pt": pickle.dumps(Payload(marker)),
        "garbage.yaml": random.Random(0).randbytes(700),
        "utf.yaml": INVALID_UTF8[1],
        "nested.yaml": _nested("flow mapping", 20_000).encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    config = write_yaml(tmp_path / "ok.yaml", tiny())
    (tmp_path / "a_file").write_bytes(b"precious")
    runs = {
        "eval truncated": ["eval", tmp_path / "truncated.pt"],
        "resume flipped": ["train", "--resume", tmp_path / "flipped.pt"],
        "eval payload": ["eval", tmp_path / "payload.pt"],
        "config garbage": ["train", tmp_path / "garbage.yaml"],
        "space invalid UTF-8": ["tune", config, "--space", tmp_path / "utf.yaml"],
        "cluster nested": ["cluster", "check", tmp_path / "nested.yaml"],
        "--out FILE": ["train", config, "--out", tmp_path / "a_file"],
    }
    procs = {label: kdray_proc(*argv) for label, argv in runs.items()}
    lost = []
    for label, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        problem = verdict(proc.returncode, err)
        if problem:
            lost.append(f"{label}: {problem}")
    CATEGORIES.setdefault("real processes (python -m kdray)", Counter()).update(
        {"tried": len(runs), "survived": len(runs) - len(lost), "lost": len(lost)}
    )
    assert not lost, "\n".join(lost)
    assert not marker.exists()
    assert (tmp_path / "a_file").read_bytes() == b"precious"


def test_only_lines_ray_forwarded_are_set_aside():
    """The filter drops what a cluster's daemons say (the line CI caught) and nothing the CLI says."""
    raylet = (
        "\x1b[33m(raylet)\x1b[0m [2026-12-07 20:42:09,620 E 15339 15350] (raylet) file_system_monitor.cc:116: "
        "/tmp/kdt-x/session is over 95% full\n"
    )
    worker = "(pid=4242) some worker output\n(TrainWorker pid=77, ip=127.0.0.1) a train worker's line\n"
    ours = "kdray: error: config key 'epochs' = 'x': expected an integer (raylet)\n"
    assert without_ray_forwarded(raylet + ours + worker) == ours
    assert without_ray_forwarded("(raylet-ish) not forwarded\n") == "(raylet-ish) not forwarded\n"
    assert verdict(2, without_ray_forwarded(raylet + ours)) is None
    assert verdict(2, raylet + ours) is not None  # unfiltered it would be lost, as it was in CI
