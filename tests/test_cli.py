"""CLI: bad input exits 2 with one line naming what to fix, no traceback, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from kdray.cli import main


def _write(tmp_path, raw, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method.name=nope"], "method.name"),
        (["method.weights.kl=-0.5"], "method.weights"),
        (["peers.0.arch=resnet999"], "resnet999"),
        (["train.epochs=many"], "train.epochs"),
        (["peers=[{arch: resnet8}]"], "needs at least 2 peers"),
        (
            ["method={name: independent}", "peers=[{arch: resnet8}, {arch: resnet8, frozen: true}]"],
            "checkpoint",
        ),
        (["method.name=afd", "method.transfer=off", "peers.1.arch_kwargs.width=8"], "method.transfer"),
        (["data.dataset=fashion_mnist", "data.root=@ROOT", "data.download=false"], "fashion-mnist"),
        (["tracking.enabled=true", "tracking.uri=http://127.0.0.1:9"], "tracking.uri"),
        (
            ["engine.name=ray", "engine.exchange=collective", "engine.exchange.every=5"],
            "engine.exchange.every",
        ),
        (["engine.stale_every=5"], "engine.exchange.every"),
        (["generations={count: 2}", "peers=[resnet8, resnet8]"], "peers[0]"),
        (["method={name: independent, temperature: 4}"], "method.temperature"),
        (["method={name: pskd, weights: {kl: 1.0}}", "peers=[{arch: resnet8}]"], "method.weights.kl"),
        (["method={name: dfad, temperature: 2}"], "discrepancy: kl"),
        (["generations={count: 2}", "method=null"], "generation 1's method"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path, capsys, tiny_raw, overrides, fragment, monkeypatch
):
    import kdray.data.fetch

    monkeypatch.setattr(kdray.data.fetch, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    config = _write(tmp_path, tiny_raw)
    out = tmp_path / "run"
    sets = [a for o in overrides for a in ("--set", o.replace("@ROOT", str(tmp_path / "empty")))]
    code, stdout, stderr = _run(capsys, "train", config, *sets, "--out", out)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdray: error:"), stderr
    assert fragment in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()


def test_missing_config_and_no_config(tmp_path, capsys):
    code, _, err = _run(capsys, "train", tmp_path / "absent.yaml")
    assert code == 2 and "no such file" in err
    code, _, err = _run(capsys, "train")
    assert code == 2 and "CONFIG" in err


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = _run(capsys, "eval", bad)
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1
    import torch

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    code, _, err = _run(capsys, "eval", tmp_path / "other.pt")
    assert code == 2 and "not a kdray population checkpoint" in err
    code, _, err = _run(capsys, "eval", tmp_path / "nothing-here")
    assert code == 2 and "no such file" in err


def test_existing_run_is_never_overwritten(tmp_path, capsys, tiny_raw):
    config = _write(tmp_path, tiny_raw)
    out = tmp_path / "run"
    assert _run(capsys, "train", config, "--out", out)[0] == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    code, _, err = _run(capsys, "train", config, "--out", out)
    assert code == 2 and "--resume" in err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_mismatched_resume_is_refused_and_keeps_the_run(tmp_path, capsys, tiny_raw):
    config = _write(tmp_path, tiny_raw)
    out = tmp_path / "run"
    assert _run(capsys, "train", config, "--out", out)[0] == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    code, _, err = _run(capsys, "train", config, "--set", "peers.1.arch=resnet14", "--resume", out)
    assert code == 2 and "holds peers" in err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_train_then_eval_round_trip(tmp_path, capsys, tiny_raw):
    config = _write(tmp_path, tiny_raw)
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, "train", config, "--out", out)
    assert code == 0 and "val_acc" in stdout
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, _ = _run(capsys, "eval", out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["split"] == "val"
    for trained, again in zip(summary["peers"], report["peers"]):
        assert again["acc"] == pytest.approx(trained["val_acc"])
    assert report["ensemble_acc"] == pytest.approx(summary["ensemble_acc"])
    # the test split: what the run evaluated once at the end, on its selected checkpoint (best.pt)
    code, stdout, _ = _run(capsys, "eval", out / "checkpoints" / "best.pt", "--split", "test", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["split"] == "test"
    assert {p["name"]: p["acc"] for p in report["peers"]} == pytest.approx(summary["test"]["peers"])


def test_python_dash_m_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "kdray", "methods"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0
    names = {line.split()[0] for line in res.stdout.splitlines()}
    assert {"dml", "kd", "independent", "afd", "acn"} <= names
