"""timm backbones as peers (``arch: timm:<name>``): built with the data's channels and classes, tapped through FX at
the module timm's feature API names, refused with the way to install timm when it is missing, trained in a DML
population; and the model backends never import the registry that dispatches to them."""

from __future__ import annotations

import ast
import copy
import math
import sys
from pathlib import Path

import pytest
import torch

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.config import validate
from kdray.errors import ConfigError
from kdray.models import build_network, check_arch, create_model, default_tap

pytest.importorskip("timm")

# timm's smallest test network (~0.1 M parameters), 12x12 single-channel inputs pass through it
TIMM_PEER = {"name": "effnet", "arch": "timm:test_efficientnet"}


def timm_population(raw: dict) -> dict:
    """``raw`` (tests/conftest.py's tiny DML) with a timm peer next to a CIFAR ResNet-8, two steps."""
    raw = copy.deepcopy(raw)
    raw["peers"] = [
        copy.deepcopy(TIMM_PEER),
        {"name": "resnet", "arch": "resnet8", "arch_kwargs": {"width": 4}},
    ]
    raw["train"].update({"steps_per_epoch": 2, "threads": 1, "dtype": "float64"})
    return raw


def test_a_timm_model_takes_the_datas_channels_and_classes_and_is_tapped_where_timm_says():
    model = create_model("timm:test_efficientnet", num_classes=4, in_channels=1)
    assert model.conv_stem.in_channels == 1 and model.get_classifier().out_features == 4
    assert default_tap("timm:test_efficientnet") == model.feature_info[-1]["module"] == "blocks.4"
    net = build_network("timm:test_efficientnet", 4, 1, taps={"feat": "default"})
    net.eval()
    x = torch.randn(3, 1, 12, 12)
    out = net(x)
    assert out["logits"].shape == (3, 4) and out["feat"].shape == (3, 64, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], net.model(x))  # the FX graph computes what the model does


def test_bad_timm_archs_are_one_line_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"'timm:resnet10x': not a timm model; did you mean timm:resnet10t"):
        check_arch("timm:resnet10x")
    with pytest.raises(ConfigError, match="arch_kwargs.pretrained.*never downloads"):
        create_model("timm:resnet10t", 4, 1, pretrained=True)
    with pytest.raises(ConfigError, match="arch_kwargs.in_chans.*set by kdray"):
        create_model("timm:resnet10t", 4, 1, in_chans=3)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(
        ConfigError, match=r"'timm:resnet10t': timm models need timm.*pip install 'kdray\[timm\]'"
    ):
        validate({"peers": [{"arch": "timm:resnet10t"}], "method": {"name": "independent"}})


def test_model_backends_do_not_import_the_registry():
    """registry -> backend only, lazily by prefix: a backend importing the registry back was an import circle."""
    from kdray.models import registry

    for module in registry.BACKENDS.values():
        path = Path(sys.modules["kdray"].__file__).parent.parent / (module.replace(".", "/") + ".py")
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not {m for m in imported if m and m.startswith("kdray.models")}, (module, imported)
        backend = __import__(module, fromlist=["PREFIX"])
        assert registry.BACKENDS[backend.PREFIX] == module
        assert all(callable(getattr(backend, f)) for f in ("check_name", "build_model", "default_tap"))


def test_a_timm_peer_trains_in_a_dml_population_on_the_local_engine(tiny_raw, tmp_path):
    from kdray.population import Population

    raw = timm_population(tiny_raw)
    before = {
        k: v.clone()
        for k, v in Population(validate(copy.deepcopy(raw))).peers[0].net.model.state_dict().items()
    }
    result = kdray.train(raw, out=tmp_path / "local")
    after = load_checkpoint(result.checkpoint)["peers"]["effnet"]["net"]
    moved = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert "conv_stem.weight" in moved and "classifier.weight" in moved
    last = result.summary["history"][-1]
    for term in ("loss_ce", "loss_kl"):
        assert math.isfinite(last[f"effnet/{term}"]) and last[f"effnet/{term}"] > 0
    assert result.summary["peers"][0]["arch"] == "timm:test_efficientnet"
    assert result.summary["peers"][0]["params"] == sum(
        p.numel() for p in create_model(TIMM_PEER["arch"], 4, 1).parameters()
    )
