"""Config validation: bad input is refused with the key, the value and what is accepted."""

import pytest

from kdray.config import apply_overrides, load_config
from kdray.errors import ConfigError


def test_valid_config_fills_defaults(tiny_raw):
    cfg = load_config(tiny_raw)
    assert [p.name for p in cfg.peers] == ["peer0", "peer1"]
    assert cfg.method.weights == {"ce": 1.0, "kl": 1.0}
    assert cfg.train.optimizer.nesterov is True
    flat = cfg.flat()
    assert flat["method.weights.kl"] == 1.0
    assert flat["peers.1.arch"] == "resnet8"


def test_partial_weights_keep_other_defaults(tiny_raw):
    tiny_raw["method"]["weights"] = {"kl": 2.5}
    assert load_config(tiny_raw).method.weights == {"ce": 1.0, "kl": 2.5}


def test_overrides_are_typed_and_nested(tiny_raw):
    cfg = load_config(
        tiny_raw, ["train.epochs=3", "method.temperature=4", "peers.1.arch=resnet14", "data.train_size=null"]
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.method.temperature == 4.0
    assert cfg.peers[1].arch == "resnet14"
    assert cfg.data.train_size is None


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("method.name=nope", "method.name", "accepted"),
        ("method.weights.kl=-1", "method.weights", ">= 0"),
        ("method.weights.bogus=1", "method.weights.bogus", "loss terms"),
        ("train.epochs=zero", "train.epochs", "integer"),
        ("train.epochs=0", "train.epochs", "greater than or equal to 1"),
        ("train.optimizer.name=rmsprop", "train.optimizer.name", "sgd"),
        ("peers.0.arch=resnet999", "arch", "resnet8"),
        ("data.dataset=mnist3d", "data.dataset", "fashion_mnist"),
        ("train.epoch=3", "train.epoch", "unknown key"),
        ("method.temperature=0", "method.temperature", "greater than 0"),
        ("engine.placement=everywhere", "engine.placement", "strict_spread"),
    ],
)
def test_bad_values_name_key_value_and_accepted(tiny_raw, override, key, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(tiny_raw, [override])
    msg = str(exc.value)
    assert key in msg, msg
    assert fragment in msg, msg


def test_population_size_rules(tiny_raw):
    tiny_raw["peers"] = tiny_raw["peers"][:1]
    with pytest.raises(ConfigError, match=r"'peers'.*needs at least 2 peers"):
        load_config(tiny_raw)
    tiny_raw["method"] = {"name": "independent"}
    assert load_config(tiny_raw).num_peers == 1


def test_kd_needs_a_frozen_teacher_with_checkpoint(tiny_raw):
    tiny_raw["method"] = {"name": "kd"}
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(tiny_raw)
    tiny_raw["peers"][0]["frozen"] = True
    with pytest.raises(ConfigError, match=r"peers\.0\.checkpoint"):
        load_config(tiny_raw)


def test_duplicate_peer_names_refused(tiny_raw):
    tiny_raw["peers"][0]["name"] = tiny_raw["peers"][1]["name"] = "a"
    with pytest.raises(ConfigError, match="unique"):
        load_config(tiny_raw)


def test_set_syntax_errors(tiny_raw):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(tiny_raw, ["train.epochs"])
    with pytest.raises(ConfigError, match="index"):
        apply_overrides(tiny_raw, ["peers.7.arch=resnet8"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("peers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
