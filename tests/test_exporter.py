"""A trained peer leaves kdray: ``kdray export`` (ONNX, TorchScript, safetensors, an MLflow model folder) and the
MLflow models a run logs (``tracking.log_models``, ``tracking.register``), each loaded back without kdray's model
code and giving the test accuracy ``kdray eval`` gives; bad input is one line and exit 2, and the run folder is never
touched."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import kdray
from kdray.cli import main
from kdray.config import validate
from kdray.data import build_data
from kdray.errors import ConfigError
from kdray.exporter import ExportError, registered_peer
from tests.conftest import TINY


def _raw() -> dict:
    raw = copy.deepcopy(TINY)
    raw["train"]["epochs"] = 2
    # two peers of unequal size: the smaller one is the default registered model
    raw["peers"] = [
        {"name": "large", "arch": "resnet8", "arch_kwargs": {"width": 8}},
        {"name": "small", "arch": "resnet8", "arch_kwargs": {"width": 4}},
    ]
    raw["tracking"] = {"enabled": True, "register": "student"}
    return raw


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny tracked DML run (embedded store in <tmp>/runs/mlflow.db) whose smaller peer is registered."""
    out = tmp_path_factory.mktemp("export") / "runs" / "tiny"
    return kdray.train(_raw(), out=out)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _test_split(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's test inputs (as its networks take them) and labels."""
    import yaml

    cfg = validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = build_data(cfg.data, cfg.seed)
    batches = list(data.eval_batches("test"))
    return torch.cat([b.x for b in batches]).float().numpy(), torch.cat([b.y for b in batches]).numpy()


def _eval_acc(run_dir: Path, peer: str, which: str = "best") -> float:
    report = kdray.evaluate(run_dir / "checkpoints" / f"{which}.pt", split="test")
    return next(p["acc"] for p in report["peers"] if p["name"] == peer)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_onnx_export_gives_kdray_evals_test_accuracy_with_any_batch_size(run, tmp_path, capsys):
    import onnxruntime

    before = _snapshot(run.out_dir)
    out = tmp_path / "small.onnx"
    assert main(["export", str(run.out_dir), "--peer", "small", "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "peer small (resnet8" in printed and "best.pt" in printed and "checked on 64 test inputs" in printed
    )

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a dynamic batch axis
    x, y = _test_split(run.out_dir)
    logits = session.run(["logits"], {"input": x})[0]
    assert logits.shape == (len(y), 4)
    assert _accuracy(logits, y) == _eval_acc(run.out_dir, "small")
    one = session.run(["logits"], {"input": x[:1]})[0]  # batch 1 as well as the whole split
    np.testing.assert_allclose(one, logits[:1], rtol=0, atol=1e-5)
    assert _snapshot(run.out_dir) == before  # the run folder is untouched


def test_torchscript_and_safetensors_load_without_kdrays_classes(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_model

    from kdray.models import create_model

    x, y = _test_split(run.out_dir)
    want = _eval_acc(run.out_dir, "large", "last")
    script = kdray.export(
        run.out_dir, peer="large", format="torchscript", out=tmp_path / "m.pt", checkpoint="last"
    )
    assert script["checkpoint"].endswith("last.pt") and script["max_abs_diff"] <= script["tolerance"]
    with torch.no_grad():
        logits = torch.jit.load(str(tmp_path / "m.pt"))(torch.from_numpy(x)).numpy()
    assert _accuracy(logits, y) == want

    kdray.export(
        run.out_dir, peer="large", format="safetensors", out=tmp_path / "m.safetensors", checkpoint="last"
    )
    # the snippet of docs/deployment.md: the metadata says what to build, the file holds the weights
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["kdray"])
    net = create_model(meta["arch"], meta["num_classes"], meta["in_channels"], **meta["arch_kwargs"])
    load_model(net, str(tmp_path / "m.safetensors"))
    with torch.no_grad():
        again = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(again, logits)
    assert meta["input_shape"] == [1, 12, 12] and meta["arch_kwargs"] == {"width": 8}
    assert meta["normalisation"] is None and meta["dataset"] == "synthetic"  # synthetic: already normalised


def test_a_graph_that_differs_from_torch_is_refused_and_nothing_is_written(run, tmp_path, monkeypatch):
    import onnxruntime

    run_onnx = onnxruntime.InferenceSession.run

    def off_by_a_thousandth(self, names, feeds):
        (logits,) = run_onnx(self, names, feeds)
        return [logits + 1e-3 * np.abs(logits).max()]  # 10x the tolerance of 1e-4 of the largest logit

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", off_by_a_thousandth)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="differs from torch .* more than the tolerance"):
        kdray.export(run.out_dir, peer="small", format="onnx", out=out)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary folder


def test_bad_input_is_one_line_and_exit_2_and_never_touches_the_run(run, tmp_path, capsys, monkeypatch):
    before = _snapshot(run.out_dir)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")

    def fails(*args: str) -> str:
        assert main(["export", str(run.out_dir), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("kdray: error:"), err
        return err

    assert "holds peers large, small" in fails(
        "--peer", "tiny", "--format", "onnx", "--out", str(tmp_path / "a")
    )
    assert "say which one with --peer" in fails("--format", "onnx", "--out", str(tmp_path / "a"))
    assert "already exists" in fails("--peer", "small", "--format", "onnx", "--out", str(out))
    assert out.read_bytes() == b"keep me"
    assert "holds the checkpoint" in fails(
        "--peer", "small", "--format", "mlflow", "--out", str(run.out_dir), "--force"
    )
    assert "holds the checkpoint" in fails(
        "--peer",
        "small",
        "--format",
        "onnx",
        "--out",
        str(run.out_dir / "checkpoints" / "best.pt"),
        "--force",
    )
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    assert "pip install 'kdray[onnx]'" in fails(
        "--peer", "small", "--format", "onnx", "--out", str(tmp_path / "b")
    )
    monkeypatch.undo()
    assert main(["export", str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(tmp_path / "c")]) == 2
    assert "no such run folder or checkpoint file" in capsys.readouterr().err
    with pytest.raises(
        ExportError, match="--format 'tflite': accepted: onnx, torchscript, safetensors, mlflow"
    ):
        kdray.export(run.out_dir, peer="small", format="tflite", out=tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

    # --force replaces a file of the same kind
    assert (
        main(
            ["export", str(run.out_dir), "--peer", "small", "--format", "onnx", "--out", str(out), "--force"]
        )
        == 0
    )
    assert out.read_bytes()[:7] != b"keep me"
    assert _snapshot(run.out_dir) == before


def _model_uri(run, peer: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.out_dir.parent / 'mlflow.db'}")
    return client.get_run(run.summary["mlflow_run_id"]).data.tags[f"kdray.model.{peer}"]


def test_each_trainable_peer_is_an_mlflow_model_and_the_smallest_is_registered(run):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    x, y = _test_split(run.out_dir)
    uri = f"sqlite:///{run.out_dir.parent / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        for peer in ("large", "small"):
            model_uri = _model_uri(run, peer)
            info = mlflow.models.get_model_info(model_uri)
            spec = info.signature.inputs.to_dict()[0]["tensor-spec"]
            assert list(spec["shape"]) == [-1, 1, 12, 12] and spec["dtype"] == "float32"
            assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 4]
            model = mlflow.pytorch.load_model(model_uri)  # a torch.export graph: no kdray class inside
            with torch.no_grad():
                logits = model(torch.from_numpy(x)).numpy()
            assert _accuracy(logits, y) == _eval_acc(run.out_dir, peer)  # best.pt: the selected checkpoint
        client = MlflowClient(tracking_uri=uri)
        (version,) = client.search_model_versions("name='student'")
        assert int(version.version) == 1 and version.run_id == run.summary["mlflow_run_id"]
        assert version.source == _model_uri(run, "small")  # the smaller peer: the student
        registered = mlflow.pytorch.load_model("models:/student/1")
        with torch.no_grad():
            assert _accuracy(registered(torch.from_numpy(x)).numpy(), y) == _eval_acc(run.out_dir, "small")
    finally:
        mlflow.set_tracking_uri(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflows_scoring_server_serves_an_exported_peer(run, tmp_path):
    """``kdray export --format mlflow`` then ``mlflow models serve`` on 127.0.0.1: the scores are torch's logits."""
    folder = tmp_path / "small-mlflow"
    kdray.export(run.out_dir, peer="small", format="mlflow", out=folder)
    x, _ = _test_split(run.out_dir)
    import mlflow.pytorch

    with torch.no_grad():
        want = mlflow.pytorch.load_model(str(folder))(torch.from_numpy(x[:8])).numpy()
    port = _free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", str(folder), "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # uvicorn, which MLflow runs by name, sits beside this Python (a venv that is not activated)
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "the scoring server exited"
            assert time.monotonic() < deadline, "the scoring server did not answer in 120 s"
            time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": x[:8].tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            got = np.array(json.loads(r.read())["predictions"], dtype=np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    finally:
        os.killpg(
            server.pid, signal.SIGTERM
        )  # the server's own process group: it and its workers, nothing else
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_registering_names_a_trainable_peer_and_needs_logged_models(tiny_raw):
    tiny_raw["tracking"] = {"enabled": True, "register": {"name": "m", "peer": "nobody"}}
    with pytest.raises(ConfigError, match="tracking.register.peer.*a trainable peer: peer0, peer1"):
        validate(tiny_raw)
    tiny_raw["tracking"] = {"enabled": True, "register": "m", "log_models": False}
    with pytest.raises(ConfigError, match="tracking.register.*set tracking.log_models: true"):
        validate(tiny_raw)
    tiny_raw["tracking"] = {"register": "m"}
    assert validate(tiny_raw).tracking.register.name == "m"
    assert validate(tiny_raw).tracking.register.peer is None


def test_the_default_registered_peer_is_the_smallest_trainable_one():
    from types import SimpleNamespace as Net

    nets = [Net(peer="a", params=9, frozen=False), Net(peer="b", params=5, frozen=False),
            Net(peer="c", params=5, frozen=False), Net(peer="t", params=1, frozen=True)]  # fmt: skip
    assert registered_peer(nets, None) == "b"  # the first of the smallest; a frozen teacher never
    assert registered_peer(nets, "a") == "a"


def test_a_run_with_log_models_off_logs_none(tiny_raw, tmp_path):
    from mlflow.tracking import MlflowClient

    tiny_raw["tracking"] = {"enabled": True, "log_models": False}
    result = kdray.train(tiny_raw, out=tmp_path / "runs" / "off")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(result.summary["mlflow_run_id"])
    assert not [k for k in run.data.tags if k.startswith("kdray.model.")]
    assert client.search_logged_models([run.info.experiment_id]) == []


@pytest.mark.realdata
def test_the_smaller_peer_of_a_fashion_mnist_run_leaves_kdray_with_its_test_accuracy(fmnist_root, tmp_path):
    """docs/deployment.md end to end: train (the demo's population, shortened), export the smaller peer to ONNX,
    read the test images with numpy alone, normalise them as the export's metadata says, and score them with
    onnxruntime and with the MLflow model the run logged: the test accuracy of ``kdray eval``, to the sample."""
    import gzip

    import mlflow.pytorch
    import onnxruntime

    from kdray.data import locate_fashion_mnist

    result = kdray.train(
        "configs/demo.yaml",
        overrides=[
            f"data.root={fmnist_root}", "data.download=false", "data.train_size=2000", "data.val_split=500",
            "data.test_size=2000",
            "train.epochs=1", "train.progress=false", "engine.name=local", "tracking.register=fmnist-student",
        ],
        out=tmp_path / "runs" / "demo",
    )  # fmt: skip
    assert (
        main(
            [
                "export",
                str(result.out_dir),
                "--peer",
                "resnet8",
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "r8.onnx"),
            ]
        )
        == 0
    )
    meta = kdray.export(
        result.out_dir, peer="resnet8", format="safetensors", out=tmp_path / "r8.safetensors"
    )["metadata"]
    assert meta["normalisation"] == {"mean": [0.286], "std": [0.353]} and meta["input_shape"] == [1, 28, 28]

    folder = locate_fashion_mnist(fmnist_root, download=False)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as fh:
        pixels = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:2000]  # data.test_size
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8).astype(np.int64)[:2000]
    mean = np.array(meta["normalisation"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta["normalisation"]["std"], np.float32).reshape(1, -1, 1, 1)
    x = ((pixels.astype(np.float32) / 255 - mean) / std).astype(np.float32)

    want = _eval_acc(result.out_dir, "resnet8")
    session = onnxruntime.InferenceSession(str(tmp_path / "r8.onnx"), providers=["CPUExecutionProvider"])
    assert _accuracy(session.run(["logits"], {"input": x})[0], labels) == want
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    try:
        model = mlflow.pytorch.load_model("models:/fmnist-student/1")  # resnet8: the smaller peer
    finally:
        mlflow.set_tracking_uri(None)
    with torch.no_grad():
        assert _accuracy(model(torch.from_numpy(x)).numpy(), labels) == want
    # it learned, so that agreeing is not trivial: chance is 0.1 +- 0.007 (binomial std on 2,000 images); one short
    # epoch reached 0.30 here
    assert want > 0.2
