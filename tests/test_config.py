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
        ("engine.placement=everywhere", "engine.placement.strategy", "strict_spread"),
        ("engine.stale_every=10", "engine.stale_every", "engine.exchange.every"),
        ("train.max_steps_per_epoch=3", "train.max_steps_per_epoch", "train.steps_per_epoch"),
        ("data.val_split=0.5.5", "data.val_split", "number"),
        ("data.label_noise.rate=1.5", "data.label_noise.rate", "less than 1"),
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


def test_engine_sections_refuse_what_they_cannot_honour(tiny_raw):
    ray = ["engine.name=ray"]
    cfg = load_config(tiny_raw, [*ray, "engine.exchange=stale", "engine.exchange.every=10"])
    assert cfg.engine.exchange.name == "stale" and cfg.engine.exchange.every == 10
    # a key of the stale exchange with the collective one: named, with why and where it belongs
    with pytest.raises(ConfigError) as exc:
        load_config(tiny_raw, [*ray, "engine.exchange.every=10"])
    msg = str(exc.value)
    assert "engine.exchange.every" in msg and "collective exchange cannot honour it" in msg and "stale" in msg
    # the local engine cannot honour Ray's sections
    with pytest.raises(ConfigError, match=r"engine\.placement.*only to engine\.name: ray"):
        load_config(tiny_raw, ["engine.placement.cpus_per_peer=2"])
    # defaults stated explicitly are fine (a Ray config switched to local keeps working)
    assert load_config(tiny_raw, ["engine.exchange=collective"]).engine.name == "local"
    # the failure-injection hook of kdray 0.1 is not a user key any more
    with pytest.raises(ConfigError, match="not a config key"):
        load_config(tiny_raw, [*ray, "engine.inject_failure_at_step=3"])


def test_keys_that_cannot_act_are_refused_naming_the_key(tiny_raw, tmp_path, monkeypatch):
    """``train.amp`` where the peers run on a CPU, ``data.num_workers`` on a dataset held in memory: refused with
    the key, the value and what to set, as the engine's sections are; where they can act, accepted."""
    from kdray.config import IN_MEMORY_DATASETS, check_keys_act_here

    with pytest.raises(ConfigError, match=r"'train\.amp' = True: .*train\.device is cpu"):
        load_config(tiny_raw, ["train.device=cpu", "train.amp=true"])
    for dataset in IN_MEMORY_DATASETS:
        with pytest.raises(
            ConfigError, match=rf"'data\.num_workers' = 2: the {dataset} dataset is held in memory"
        ):
            load_config(tiny_raw, [f"data.dataset={dataset}", "data.num_workers=2"])
    assert load_config(tiny_raw, ["data.num_workers=0"]).data.num_workers == 0
    folder = load_config(tiny_raw, ["data.dataset=imagefolder", "data.num_workers=2"])
    assert folder.data.num_workers == 2  # decoded from files: the workers act
    # device auto: judged where the run starts (validation alone may run on another machine: kdray eval)
    auto = load_config(tiny_raw, ["train.device=auto", "train.amp=true"])
    check_keys_act_here(auto, cuda_available=True)
    with pytest.raises(ConfigError, match=r"'train\.amp' = True: .*auto on a machine without CUDA"):
        check_keys_act_here(auto, cuda_available=False)
    check_keys_act_here(load_config(tiny_raw, ["train.device=auto"]), cuda_available=False)  # amp off: fine
    ray = load_config(tiny_raw, ["train.device=auto", "train.amp=true", "engine.name=ray"])
    check_keys_act_here(ray, cuda_available=False)  # a Ray run's device is its workers'
    # through kdray train, before the run folder exists, on this machine (no CUDA, as CI), for a stage too
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    import kdray
    from kdray.errors import KdrayError

    with pytest.raises(ConfigError, match=r"train\.amp"):
        kdray.train(tiny_raw, overrides=["train.device=auto", "train.amp=true"], out=tmp_path / "run")
    staged = {**tiny_raw, "stages": [{"name": "a"}, {"name": "b", "train": {"device": "auto", "amp": True}}]}
    with pytest.raises(KdrayError, match=r"stages\.1 \(b\): train\.amp"):
        kdray.train(staged, out=tmp_path / "staged")
    assert not (tmp_path / "run").exists() and not (tmp_path / "staged").exists()


@pytest.mark.parametrize(
    ("override", "key", "bound"),
    [
        ("train.epochs=1000000000000000000", "train.epochs", "1000000"),
        ("train.steps_per_epoch=1000000000000000000", "train.steps_per_epoch", "1000000000"),
        ("train.threads=1000000", "train.threads", "4096"),
        ("data.synthetic.image_size=1000000", "data.synthetic.image_size", "4096"),
        ("data.synthetic.channels=1000000", "data.synthetic.channels", "1024"),
        ("data.synthetic.num_classes=1000000000", "data.synthetic.num_classes", "1000000"),
        ("data.synthetic.train_len=1000000000000", "data.synthetic", "16 GiB"),
    ],
)
def test_counts_no_machine_could_honour_are_refused(tiny_raw, override, key, bound):
    """Before anything is built: a synthetic set of 10**12 images would be allocated, a million torch threads
    abort libgomp, 10**18 epochs never end."""
    with pytest.raises(ConfigError) as exc:
        load_config(tiny_raw, [override])
    assert f"'{key}'" in str(exc.value) and bound in str(exc.value), str(exc.value)
    assert load_config(tiny_raw, ["data.synthetic.train_len=100000"]).data.synthetic.train_len == 100000


def test_label_noise_and_validation_keys(tiny_raw):
    cfg = load_config(tiny_raw, ["data.label_noise={kind: pair, rate: 0.4}", "data.val_split=0.2"])
    assert cfg.data.label_noise.kind == "pair" and cfg.data.val_split == 0.2
    assert load_config(tiny_raw, ["data.val_split=100"]).data.val_split == 100
