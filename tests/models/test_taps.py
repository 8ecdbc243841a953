"""Feature taps: FX-extracted maps of the right shape, logits identical to the plain model, parameters shared."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from kdray.errors import ConfigError
from kdray.models import TappedNetwork, build_network, count_params, create_model, tap_shapes


def tiny_resnet8(taps: dict[str, str] | None = None, in_channels: int = 3) -> TappedNetwork:
    torch.manual_seed(0)
    return build_network("resnet8", 10, in_channels, taps=taps, width=4)


@pytest.mark.parametrize(("size", "spatial"), [(32, 8), (28, 7)])
def test_default_tap_of_resnet8_is_layer3(size: int, spatial: int) -> None:
    net = build_network("resnet8", 10, 3, taps={"feat": "default"})
    assert net.taps == {"feat": "layer3"}
    out = net(torch.randn(2, 3, size, size))
    assert set(out) == {"logits", "feat"}
    assert out["feat"].shape == (2, 64, spatial, spatial)
    assert out["logits"].shape == (2, 10)


@pytest.mark.parametrize("train", [True, False])
def test_tapped_logits_equal_the_plain_models_exactly(train: bool) -> None:
    net = tiny_resnet8({"feat": "layer3", "early": "layer1"})
    plain = copy.deepcopy(net.model)
    net.train(train)
    plain.train(train)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert torch.equal(out["logits"], plain(x))
    # and the feature is what the model computes on its way there
    with torch.no_grad():
        stem = plain.relu(plain.bn1(plain.conv1(x)))
        assert torch.equal(out["early"], plain.layer1(stem))


def test_no_taps_calls_the_model_directly() -> None:
    net = tiny_resnet8()
    assert net._extractor is None
    x = torch.randn(2, 3, 32, 32)
    out = net.eval()(x)
    assert set(out) == {"logits"}
    assert torch.equal(out["logits"], net.model(x))


def test_extractor_shares_parameters_with_the_model() -> None:
    net = tiny_resnet8({"feat": "layer3"})
    model_params = dict(net.model.named_parameters())
    extractor_params = dict(net._extractor.named_parameters())
    assert extractor_params  # the extractor does hold parameters ...
    assert all(p is model_params[name] for name, p in extractor_params.items())  # ... the model's own tensors
    # an update through the model is seen by the extractor
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        net.model.fc.weight.add_(1.0)
    assert torch.equal(net(x)["logits"], net.model(x))
    # and gradients of a tapped feature reach the model's parameters: the stages behind it, not the classifier
    net.train()
    net(x)["feat"].pow(2).mean().backward()
    assert net.model.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert net.model.fc.weight.grad is None


def test_an_optimizer_step_through_the_network_moves_the_models_weights() -> None:
    net = tiny_resnet8({"feat": "layer3"})
    assert count_params(net) == count_params(net.model)  # the extractor adds no parameters
    before = net.model.layer1[0].conv1.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = net(torch.randn(2, 3, 32, 32))
    (out["logits"].sum() + out["feat"].mean()).backward()
    opt.step()
    assert not torch.equal(before, net.model.layer1[0].conv1.weight)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x)["logits"], net.model(x))


def test_state_dict_is_the_models() -> None:
    net = tiny_resnet8({"feat": "layer3"})
    keys = list(net.state_dict())
    assert keys == ["model." + k for k in net.model.state_dict()]
    fresh = tiny_resnet8({"feat": "layer3"})
    with torch.no_grad():
        for p in net.model.parameters():
            p.add_(0.5)
    fresh.model.load_state_dict(net.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    net.eval(), fresh.eval()
    assert torch.equal(fresh(x)["feat"], net(x)["feat"])


def test_unknown_tap_is_a_config_error_listing_valid_nodes() -> None:
    with pytest.raises(ConfigError) as err:
        tiny_resnet8({"feat": "layer4"})
    assert err.value.key == "taps.feat"
    assert err.value.value == "layer4"
    for node in ("conv1", "layer1", "layer2", "layer3", "fc"):
        assert node in err.value.accepted
    with pytest.raises(ConfigError, match="reserved"):
        tiny_resnet8({"logits": "fc"})


def test_taps_by_node_name_inside_a_stage() -> None:
    net = tiny_resnet8({"a": "layer2.0.conv1", "b": "layer2"})
    out = net(torch.randn(2, 3, 32, 32))
    assert out["a"].shape == out["b"].shape == (2, 8, 16, 16)
    assert not torch.equal(out["a"], out["b"])


def test_tap_shapes_dry_run_restores_the_mode() -> None:
    net = build_network("resnet8", 10, 1, taps={"feat": "default"}, width=4)
    assert net.training
    assert tap_shapes(net, (1, 28, 28)) == {"logits": (10,), "feat": (16, 7, 7)}
    assert net.training
    net.eval()
    assert tap_shapes(net, (1, 32, 32)) == {"logits": (10,), "feat": (16, 8, 8)}
    assert not net.training


def test_mode_switch_uses_batch_statistics_only_in_training() -> None:
    net = tiny_resnet8({"feat": "layer3"})
    x = torch.randn(4, 3, 32, 32)
    train_out = net.train()(x)["logits"]
    eval_out = net.eval()(x)["logits"]
    assert not torch.allclose(train_out, eval_out)
    assert torch.equal(eval_out, net.model(x))


def test_deepcopy_and_pickle_give_independent_working_copies() -> None:
    net = tiny_resnet8({"feat": "layer3"}).eval()
    x = torch.randn(2, 3, 32, 32)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert torch.equal(clone(x)["feat"], net(x)["feat"])
        with torch.no_grad():
            clone.model.layer3[0].conv1.weight.mul_(2.0)
        # the clone's extractor follows the clone's weights, not the original's
        assert not torch.equal(clone(x)["feat"], net(x)["feat"])
        assert torch.equal(clone(x)["logits"], clone.model(x))


def test_dtype_conversion_keeps_the_extractor_on_the_live_tensors() -> None:
    net = tiny_resnet8({"feat": "layer3"}).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = net(x)
    assert out["feat"].dtype == torch.float64
    assert torch.equal(out["logits"], net.model(x))


def test_wrap_any_model() -> None:
    model = create_model("wrn_16_1", 10, 1)
    net = TappedNetwork(model, {"f1": "block1", "f3": "relu"})
    assert net.model is model
    out = net(torch.randn(2, 1, 28, 28))
    assert out["f1"].shape == (2, 16, 28, 28) and out["f3"].shape == (2, 64, 7, 7)
    assert (out["f3"] >= 0).all()  # the final activation


def test_two_taps_of_one_node_and_a_tap_of_the_classifier() -> None:
    # resnet8 has one block per stage, so "layer3" ends at node "layer3.0.relu2"; "fc" is the logits node itself
    net = tiny_resnet8({"stage": "layer3", "node": "layer3.0.relu2", "head": "fc"}).eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert torch.equal(out["stage"], out["node"])
    assert torch.equal(out["head"], out["logits"])
