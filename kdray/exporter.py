"""The trained network leaves kdray: one peer of a saved population as ONNX, TorchScript, safetensors or an MLflow
model, and every trainable peer of a finished run logged as an MLflow model (``tracking.log_models``).

What is exported is the bare network (``TappedNetwork.model``: images in, logits out, no feature taps), in eval
mode, in float32 on the CPU, rebuilt the way ``kdray eval`` rebuilds a population (the checkpoint's resolved config,
its weights). It expects what the peer was trained on: float32 images of the checkpoint's input shape, normalised
per channel as the dataset was (``(x / 255 - mean) / std``; the metadata and ``kdray export``'s report give both).

Formats (``kdray export RUN --peer NAME --format F --out PATH``):

- ``onnx``: torch's exporter (``torch.onnx.export(..., dynamo=True)``) with a dynamic batch axis, input ``input``,
  output ``logits``. Checked before it is written: onnxruntime's logits on a batch of real test inputs must equal
  torch's to :data:`ONNX_RTOL` of the largest logit (see there why), or nothing is written.
- ``torchscript``: ``torch.jit.trace`` of the network, checked the same way against torch (a trace that took a
  data-dependent branch would differ), loaded with ``torch.jit.load`` without kdray.
- ``safetensors``: the weights, and in the file's metadata (key ``kdray``) a JSON of what rebuilds the network
  (arch, its options, input shape, class count, normalisation): :func:`load_network`, or the snippet in
  ``docs/deployment.md``.
- ``mlflow``: an MLflow PyTorch model folder (``mlflow.pytorch.save_model``, ``pt2`` serialisation: a
  ``torch.export`` graph that loads without kdray), with a signature and an input example of real test images.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdray.checkpoint import load_checkpoint
from kdray.errors import CheckpointError, KdrayError

FORMATS = ("onnx", "torchscript", "safetensors", "mlflow")
CHECKPOINTS = ("best", "last")
META_KEY = "kdray"
META_FORMAT = "kdray-network"

# Relative tolerance of an exported graph against torch, as a share of the largest |logit| of the check batch.
# Both sides compute the same float32 graph and differ only in rounding order (summation order, convolution
# algorithms, batch norm folded into the convolution). float32's unit roundoff is u = 2^-24 = 6e-8; a dot product of
# n terms rounds to about sqrt(n) u of its magnitude (random-walk accumulation), and L such layers in sequence add
# up to about L sqrt(n) u: for kdray's CIFAR ResNets (n <= 3*3*64 = 576, L <= 20) that is 20 * 24 * 6e-8 = 3e-5.
# 1e-4 leaves a factor ~3 over that estimate and is three orders of magnitude below what a wrong graph gives (a
# missing batch norm or a transposed weight moves logits by O(1) of their size). Measured (ONNX Runtime 1.31,
# torch 2.14, CPU): ResNet-8 3e-7, ResNet-14 5e-7 of the largest logit. Deeper networks may need ``tolerance``.
ONNX_RTOL = 1e-4
CHECK_BATCH = 64  # real test images run through torch and the exported graph
EXAMPLE_BATCH = (
    2  # the MLflow input example: a real test image pair (small: it is stored in the model folder)
)

# Packages each format needs beyond kdray's own, and the extra that brings them.
NEEDS = {
    "onnx": (("onnx", "onnxruntime", "onnxscript"), "onnx"),
    "safetensors": (("safetensors",), "safetensors"),
    "torchscript": ((), None),
    "mlflow": ((), None),
}


class ExportError(KdrayError):
    """A peer cannot be exported as asked (bad input, a missing package, a check that failed)."""


@dataclass
class PeerNetwork:
    """One peer of a saved population, ready to leave kdray."""

    model: nn.Module  # the bare network, eval mode, float32, CPU
    peer: str
    arch: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    dataset: str
    normalisation: dict[str, list[float]] | None  # {"mean": [...], "std": [...]} per channel, or None
    checkpoint: Path
    epoch: int
    frozen: bool
    params: int
    sample: torch.Tensor = field(repr=False)  # real test inputs, as the network takes them (float32)

    def metadata(self) -> dict[str, Any]:
        """What rebuilds the network and says what it takes (the safetensors metadata; the export's report)."""
        from kdray.version import __version__

        return {
            "format": META_FORMAT,
            "version": 1,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "num_classes": self.num_classes,
            "in_channels": self.input_shape[0],
            "input_shape": list(self.input_shape),
            "normalisation": self.normalisation,
            "dataset": self.dataset,
            "peer": self.peer,
            "epoch": self.epoch,
            "params": self.params,
            "checkpoint": str(self.checkpoint),
            "kdray_version": __version__,
        }


# ------------------------------------------------------------------------------------------------- finding things
def select_checkpoint(source: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file of ``source``: a checkpoint file itself, or in a run folder (its ``checkpoints/``), a
    checkpoints folder or a study folder (``best.pt``), the selected one: ``best.pt`` (the epoch with the best
    validation score) when it exists, else ``last.pt``, as the run's final test chose; ``checkpoint`` = ``best`` or
    ``last`` asks for one."""
    if checkpoint is not None and checkpoint not in CHECKPOINTS:
        raise ExportError(f"--checkpoint '{checkpoint}': accepted: {', '.join(CHECKPOINTS)}")
    path = Path(source)
    if path.is_file():
        if checkpoint is not None:
            raise ExportError(
                f"--checkpoint {checkpoint} with a checkpoint file '{source}': give the run folder instead, or "
                "drop --checkpoint"
            )
        return path
    if not path.is_dir():
        raise CheckpointError(f"'{source}': no such run folder or checkpoint file")
    for folder in (path / "checkpoints", path):
        names = [checkpoint] if checkpoint else list(CHECKPOINTS)
        for name in names:
            if (folder / f"{name}.pt").is_file():
                return folder / f"{name}.pt"
    if (path / "stages").is_dir():
        stages = sorted(p.name for p in (path / "stages").iterdir() if p.is_dir())
        raise ExportError(
            f"'{source}' is a staged run: give one stage's folder, {path / 'stages'}/<stage> "
            f"(stages: {', '.join(stages)})"
        )
    wanted = f"{checkpoint}.pt" if checkpoint else "best.pt or last.pt"
    raise CheckpointError(f"'{source}': no {wanted} in it or in its checkpoints/ folder")


def _peer_names(payload: dict[str, Any]) -> tuple[list[str], list[str]]:
    peers = payload["config"]["peers"]
    names = [p.get("name") or f"peer{i}" for i, p in enumerate(peers)]
    trainable = [n for n, p in zip(names, peers) if not p.get("frozen")]
    return names, trainable


def _choose_peer(payload: dict[str, Any], peer: str | None, file: Path) -> str:
    names, trainable = _peer_names(payload)
    if peer is None:
        if len(trainable) == 1:
            return trainable[0]
        raise ExportError(f"--peer: '{file}' holds peers {', '.join(names)}; say which one with --peer NAME")
    if peer not in names:
        raise ExportError(f"--peer '{peer}': '{file}' holds peers {', '.join(names)}")
    return peer


def check_packages(fmt: str) -> None:
    """Raise a one-line :class:`ExportError` naming the extra to install when ``fmt`` needs a missing package."""
    packages, extra = NEEDS[fmt]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(
            f"--format {fmt} needs {', '.join(missing)} (not installed): pip install 'kdray[{extra}]'"
        )


def load_peer(
    source: str | Path,
    peer: str | None = None,
    checkpoint: str | None = None,
    overrides: list[str] | None = None,
) -> PeerNetwork:
    """Rebuild one peer of a saved population as ``kdray eval`` does (the checkpoint's config and weights), with a
    batch of real test inputs. ``peer`` may be left out when the population has one trainable peer."""
    file = select_checkpoint(source, checkpoint)
    return _load_peers(file, [_choose_peer(load_checkpoint(file), peer, file)], overrides)[0]


def _load_peers(file: Path, names: list[str], overrides: list[str] | None = None) -> list[PeerNetwork]:
    from kdray.data.augment import NORMALISATION
    from kdray.models import count_params
    from kdray.population import population_from_checkpoint

    cfg, pop, payload = population_from_checkpoint(file, overrides)
    spec = pop.data.spec
    stats = NORMALISATION.get(spec.name)  # None: synthetic inputs, generated already normalised
    sample = next(iter(pop.data.eval_batches("test"))).x[:CHECK_BATCH].float().cpu()
    out = []
    for name in names:
        runtime = next(p for p in pop.peers if p.name == name)
        pcfg = cfg.peers[runtime.index]
        model = runtime.net.model.float().cpu().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        out.append(
            PeerNetwork(
                model=model,
                peer=name,
                arch=pcfg.arch,
                arch_kwargs=dict(pcfg.arch_kwargs),
                num_classes=spec.num_classes,
                input_shape=(spec.in_channels, spec.image_size, spec.image_size),
                dataset=spec.name,
                normalisation=None if stats is None else {"mean": list(stats[0]), "std": list(stats[1])},
                checkpoint=file,
                epoch=int(payload.get("epoch", 0)),
                frozen=pcfg.frozen,
                params=count_params(model),
                sample=sample,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------- the formats
def _quiet(stderr: bool = False):
    """torch's exporters print progress lines and deprecation warnings, MLflow its registrations and download
    bars: kdray says what it did itself (errors are raised, not printed, so nothing of them is lost)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    if stderr:
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def compare(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> float:
    """max |got - want|, which must be within ``rtol`` of the largest |want|; else one :class:`ExportError`."""
    diff = (got.double() - want.double()).abs().max().item()
    bound = rtol * max(want.abs().max().item(), 1e-12)
    if not diff <= bound:
        raise ExportError(
            f"{what} differs from torch on {len(want)} real test inputs by {diff:.3g}, more than the tolerance "
            f"{bound:.3g} ({rtol:g} of the largest logit); nothing was written (a deeper network may need "
            "--tolerance)"
        )
    return diff


def _write_onnx(net: PeerNetwork, tmp: Path, rtol: float) -> dict[str, Any]:
    import onnxruntime

    with _quiet():
        program = torch.onnx.export(
            net.model,
            (net.sample[:2],),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        program.save(str(tmp))
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = net.model(net.sample)
    got = torch.from_numpy(session.run(["logits"], {"input": net.sample.numpy()})[0])
    diff = compare(got, want, rtol, "the ONNX graph run by onnxruntime")
    return {"max_abs_diff": diff, "tolerance": rtol, "checked_on": len(net.sample)}


def _write_torchscript(net: PeerNetwork, tmp: Path, rtol: float) -> dict[str, Any]:
    with _quiet():
        traced = torch.jit.trace(net.model, net.sample[:2], check_trace=False)
        torch.jit.save(traced, str(tmp))
        loaded = torch.jit.load(str(tmp))
    with torch.no_grad():
        want = net.model(net.sample)
        got = loaded(net.sample)
    diff = compare(got, want, rtol, "the TorchScript module")
    return {"max_abs_diff": diff, "tolerance": rtol, "checked_on": len(net.sample)}


def _write_safetensors(net: PeerNetwork, tmp: Path, rtol: float) -> dict[str, Any]:
    from safetensors.torch import save_model

    save_model(net.model, str(tmp), metadata={META_KEY: json.dumps(net.metadata())})
    return {}


def _signature(net: PeerNetwork):
    from mlflow.models import infer_signature

    example = net.sample[:EXAMPLE_BATCH].numpy()
    with torch.no_grad():
        logits = net.model(net.sample[:EXAMPLE_BATCH]).numpy()
    return infer_signature(example, logits), example


def _pip_requirements() -> list[str]:
    # the pt2 graph needs torch alone; naming it skips MLflow's inference, which imports the model in a subprocess
    return [f"torch=={torch.__version__.split('+')[0]}"]


def _write_mlflow(net: PeerNetwork, tmp: Path, rtol: float) -> dict[str, Any]:
    import mlflow.pytorch

    signature, example = _signature(net)
    with _quiet():
        mlflow.pytorch.save_model(
            net.model,
            str(tmp),
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
            serialization_format="pt2",
            metadata={META_KEY: net.metadata()},
        )
    return {}


WRITERS = {
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
    "safetensors": _write_safetensors,
    "mlflow": _write_mlflow,
}


def _check_out(out: Path, fmt: str, force: bool, file: Path) -> None:
    """Refuse an ``--out`` that exists (unless ``force``), and always one that would replace the checkpoint or
    a folder holding it, or something of another kind than what the format writes."""
    resolved, ckpt = out.resolve(), file.resolve()
    if resolved == ckpt or resolved in ckpt.parents:
        raise ExportError(
            f"--out '{out}' holds the checkpoint '{file}'; choose a path outside the run's files"
        )
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"--out '{out}' already exists; choose another path, or --force to replace it")
    if fmt == "mlflow":
        if not (out.is_dir() and (out / "MLmodel").is_file()):
            raise ExportError(
                f"--out '{out}' exists and is not an MLflow model folder; --force replaces only one"
            )
    elif not out.is_file():
        raise ExportError(f"--out '{out}' exists and is not a file; --force replaces only a file")


def export(
    source: str | Path,
    peer: str | None = None,
    format: str = "onnx",
    out: str | Path | None = None,
    checkpoint: str | None = None,
    force: bool = False,
    overrides: list[str] | None = None,
    tolerance: float = ONNX_RTOL,
) -> dict[str, Any]:
    """Export one peer of a saved population (see the module docstring for the formats); returns a report (the path
    written, the peer, its checkpoint and epoch, the metadata, and for ONNX / TorchScript the largest difference
    from torch on real test inputs). Everything is checked before anything is written; ``out`` is written
    atomically (a temporary name beside it, renamed when complete and checked)."""
    if format not in FORMATS:
        raise ExportError(f"--format '{format}': accepted: {', '.join(FORMATS)}")
    if out is None:
        raise ExportError("--out: give the path to write")
    if not tolerance > 0:
        raise ExportError(f"--tolerance {tolerance}: accepted: a positive number (default {ONNX_RTOL:g})")
    out = Path(out)
    file = select_checkpoint(source, checkpoint)
    name = _choose_peer(load_checkpoint(file), peer, file)
    check_packages(format)
    _check_out(out, format, force, file)
    if not out.parent.is_dir():
        raise ExportError(f"--out '{out}': its folder '{out.parent}' does not exist")
    net = _load_peers(file, [name], overrides)[0]
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = tmp_dir / out.name
        checked = WRITERS[format](net, tmp, tolerance)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)  # --force, an MLflow model folder (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {
        "path": str(out),
        "format": format,
        "peer": name,
        "checkpoint": str(file),
        "epoch": net.epoch,
        **checked,
        "metadata": net.metadata(),
    }


def load_network(path: str | Path) -> nn.Module:
    """The network of a safetensors file written by ``kdray export --format safetensors``, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from kdray.models import create_model

    with safe_open(str(path), "pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(META_KEY, "null") or "null")
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise ExportError(f"'{path}' has no kdray metadata; it was not written by kdray export")
    model = create_model(meta["arch"], meta["num_classes"], meta["in_channels"], **meta["arch_kwargs"])
    load_model(model, str(path))
    return model.eval()


# ------------------------------------------------------------------------------------------------ MLflow models
@contextlib.contextmanager
def _tracking_uri(uri: str):
    """MLflow's model logging goes through its global tracking URI: ``uri`` for the block, the caller's after.
    ``mlflow.set_tracking_uri`` mirrors the global into ``MLFLOW_TRACKING_URI``, so that variable is the caller's."""
    import mlflow

    old = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)


def registered_peer(nets: list[PeerNetwork], peer: str | None) -> str:
    """The peer ``tracking.register`` registers: ``peer`` when named, else the smallest trainable one by parameter
    count (the first in the config's order on a tie): in distillation, the student."""
    if peer is not None:
        return peer
    return min((n for n in nets if not n.frozen), key=lambda n: n.params).peer


def log_models(tracker: Any, checkpoint: str | Path) -> dict[str, dict[str, Any]]:
    """Log every trainable peer of ``checkpoint`` into the tracker's open run as an MLflow PyTorch model
    (``mlflow.pytorch.log_model``, model name = the peer's name, ``pt2`` serialisation, a signature and an
    input example of real test images; the run's tag ``kdray.model.<peer>`` holds its ``models:/`` URI), and
    register one when ``tracking.register`` says so. Does nothing unless
    the run is tracked and ``tracking.log_models`` is on.

    Never raises: the run has finished when this runs, and a model that cannot be logged (a network
    ``torch.export`` cannot trace, a store that refuses) is one warning line on stderr naming the peer and what to
    run instead. Returns ``{peer: {"model_uri", "registered"}}`` for what was logged."""
    import sys

    from kdray.tracking import first_line, retry_busy

    cfg = tracker.cfg
    if not tracker.run_id or not cfg.log_models:
        return {}
    try:
        file = Path(checkpoint)
        _, trainable = _peer_names(load_checkpoint(file))
        nets = _load_peers(file, trainable) if trainable else []
        run = retry_busy(tracker.uri, "reading the run", lambda: tracker.client.get_run(tracker.run_id))
        experiment = run.info.experiment_id
    except Exception as exc:  # noqa: BLE001 - see the docstring
        print(f"kdray: warning: no MLflow models logged ({first_line(exc)})", file=sys.stderr)
        return {}
    register = cfg.register
    chosen = registered_peer(nets, register.peer) if register is not None and nets else None
    logged: dict[str, dict[str, Any]] = {}
    for net in nets:
        import mlflow.pytorch

        name = register.name if net.peer == chosen else None
        signature, example = _signature(net)

        def log(net=net, name=name, signature=signature, example=example):
            # created first, in the run's experiment: left to itself MLflow 3.17 files a model logged for a run
            # that is not the active one under the default experiment (its artifacts in ./mlruns)
            model = mlflow.initialize_logged_model(
                name=net.peer,
                source_run_id=tracker.run_id,
                experiment_id=experiment,
                tags={"kdray.peer": net.peer},
            )
            return mlflow.pytorch.log_model(
                net.model,
                name=net.peer,
                signature=signature,
                input_example=example,
                pip_requirements=_pip_requirements(),
                serialization_format="pt2",
                metadata={META_KEY: net.metadata()},
                registered_model_name=name,
                run_id=tracker.run_id,
                model_id=model.model_id,
            )

        try:
            with _tracking_uri(tracker.uri), _quiet(stderr=True):
                info = retry_busy(tracker.uri, f"logging peer {net.peer} as a model", log, run_open=True)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            print(
                f"kdray: warning: peer {net.peer} was not logged as an MLflow model ({first_line(exc)}); "
                f"kdray export {file} --peer {net.peer} --format mlflow --out PATH says more",
                file=sys.stderr,
            )
            continue
        logged[net.peer] = {
            "model_uri": info.model_uri,
            "registered": (
                None if name is None else {"name": name, "version": info.registered_model_version}
            ),
        }
    # where each peer's model is, on the run itself (MLflow 3 keeps logged models outside the run's artifacts)
    tracker.set_tags({f"kdray.model.{peer}": entry["model_uri"] for peer, entry in logged.items()})
    return logged
