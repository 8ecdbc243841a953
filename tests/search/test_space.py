"""Search spaces as data: parsing, checks against the config (before any trial), translations, shipped spaces."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kdray.cli import main
from kdray.config import load_config
from kdray.errors import PlacementError
from kdray.search.space import SpaceError, load_space, parse_space
from kdray.search.study import plan_resources

REPO = Path(__file__).resolve().parents[2]


def _space(**params) -> dict:
    return {"params": params}


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"dist": "uniform", "low": 2.0, "high": 1.0}, "low (2.0) must be smaller than high (1.0)"),
        ({"dist": "loguniform", "low": 0.0, "high": 1.0}, "loguniform needs low > 0"),
        ({"dist": "loguniform", "low": -1.0, "high": 1.0}, "loguniform needs low > 0"),
        ({"dist": "normal", "low": 0.0, "high": 1.0}, "not one of"),
        ({"dist": "choice", "values": []}, "non-empty list"),
        ({"dist": "int", "low": 1.5, "high": 4}, "whole-number"),
        ({"dist": "uniform", "low": 0.1, "hgih": 1.0}, "unknown field 'hgih'"),
        ({"dist": "uniform", "low": "a", "high": 1.0}, "'low' must be a finite number"),
    ],
)
def test_malformed_ranges_are_refused_with_the_key(entry, fragment):
    with pytest.raises(SpaceError) as exc:
        parse_space(_space(**{"method.temperature": entry}), "s.yaml")
    msg = str(exc.value)
    assert "'method.temperature'" in msg and fragment in msg, msg


def test_perturb_must_name_searched_keys():
    raw = _space(**{"method.temperature": {"dist": "uniform", "low": 1, "high": 4}})
    assert parse_space(raw).perturb == ["method.temperature"]  # default: weights and temperature
    raw["perturb"] = ["method.weights.kl"]
    with pytest.raises(SpaceError, match=r"'method.weights.kl'.*not in 'params'"):
        parse_space(raw)


@pytest.mark.parametrize(
    ("key", "entry", "fragment"),
    [
        ("method.weights.kd", {"dist": "uniform", "low": 0.1, "high": 1.0}, "loss terms ['ce', 'kl']"),
        ("method.adv_every", {"dist": "int", "low": 1, "high": 4}, "unknown key"),
        ("train.optimizr.lr", {"dist": "loguniform", "low": 0.01, "high": 0.1}, "unknown key"),
        ("train.optimizer.lr", {"dist": "uniform", "low": 0.0, "high": 0.1}, "greater than 0"),
        ("train.optimizer.name", {"dist": "choice", "values": ["sgd", "rmsprop"]}, "'rmsprop'"),
    ],
)
def test_values_the_config_refuses_are_caught_before_any_trial(tiny_raw, key, entry, fragment):
    space = parse_space(_space(**{key: entry}), "s.yaml")
    with pytest.raises(SpaceError) as exc:
        space.check_against(tiny_raw)
    msg = str(exc.value)
    assert f"'{key}'" in msg and fragment in msg, msg


def test_space_for_another_method_is_refused(tiny_raw):
    raw = {"method": "afd", **_space(**{"method.temperature": {"dist": "uniform", "low": 1, "high": 4}})}
    with pytest.raises(SpaceError, match="written for method 'afd'.*trains 'dml'"):
        parse_space(raw).check_against(tiny_raw)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"method.weights.bogus": {"dist": "uniform", "low": 0.1, "high": 1.0}}, "method.weights.bogus"),
        ({"method.temperature": {"dist": "uniform", "low": 4.0, "high": 1.0}}, "method.temperature"),
        ({"train.optimizer.lr": {"dist": "loguniform", "low": 0.0, "high": 0.1}}, "train.optimizer.lr"),
    ],
)
def test_cli_exits_2_naming_the_key_and_writes_nothing(tmp_path, tiny_raw, capsys, entry, fragment):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": entry}))
    out = tmp_path / "study"
    code = main(["tune", str(cfg), "--space", str(space), "--samples", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"'{fragment}'" in err, err
    assert not out.exists()


def test_cli_refuses_missing_space_and_bad_settings(tmp_path, tiny_raw, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    assert main(["tune", str(cfg), "--space", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["tune", str(cfg)]) == 2
    assert "--space" in capsys.readouterr().err
    space = tmp_path / "s.yaml"
    space.write_text(
        yaml.safe_dump(_space(**{"method.temperature": {"dist": "uniform", "low": 1, "high": 4}}))
    )
    assert main(["tune", str(cfg), "--space", str(space), "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err
    # multi-objective needs a scheduler that does not rank trials on one number
    for scheduler in ("asha", "pbt"):
        args = ["tune", str(cfg), "--space", str(space), "--multi-objective", "--scheduler", scheduler]
        assert main([*args, "--out", str(tmp_path / "mo")]) == 2
        err = capsys.readouterr().err
        assert f"--scheduler = '{scheduler}'" in err and "--scheduler fifo" in err
    assert not (tmp_path / "mo").exists()


@pytest.mark.parametrize("key", ["stages", "generations"])
def test_a_staged_config_is_refused_with_the_way_round(tmp_path, tiny_raw, capsys, key):
    """kdray tune searches one run: a staged config gets one line saying how to tune a stage, and nothing is
    written (before, its first stage's missing 'peers' was reported)."""
    raw = {k: v for k, v in tiny_raw.items() if k not in ("peers", "method")}
    if key == "stages":
        raw["stages"] = [{"name": "a", "method": {"name": "independent"}, "peers": tiny_raw["peers"][:1]}]
    else:
        raw["generations"] = {"count": 2, "peers": tiny_raw["peers"][:1]}
    cfg = tmp_path / "staged.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"method": "independent", "params": {
        "train.optimizer.lr": {"dist": "loguniform", "low": 0.01, "high": 0.3}}}))  # fmt: skip
    out = tmp_path / "study"
    assert main(["tune", str(cfg), "--space", str(space), "--samples", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"has '{key}:'" in err and "checkpoint:" in err, err
    assert not out.exists()


def test_pareto_front_keeps_exactly_the_undominated_trials():
    from kdray.search.study import pareto_front

    points = [
        ("small", 0.80, 1_000),
        ("mid", 0.85, 5_000),
        ("big", 0.90, 20_000),
        ("worse_mid", 0.84, 5_000),  # as big as mid, less accurate
        ("bloated", 0.85, 9_000),  # as accurate as mid, bigger
        ("tie", 0.85, 5_000),  # equal to mid on both: neither dominates the other
        ("useless", 0.70, 30_000),
    ]
    assert pareto_front(points) == {"small", "mid", "big", "tie"}
    # accuracies equal up to float rounding: the smaller model dominates the bigger one
    assert pareto_front([("a", 0.47124999999999995, 100), ("b", 0.47125000000000006, 200)]) == {"a"}
    assert pareto_front([]) == set()
    assert pareto_front([("only", 0.5, 10)]) == {"only"}


def test_config_values_are_the_first_point_only_when_in_range(tiny_raw):
    cfg = load_config(tiny_raw)
    space = parse_space(
        _space(
            **{
                "method.weights.kl": {"dist": "loguniform", "low": 0.1, "high": 10},
                "train.optimizer.name": {"dist": "choice", "values": ["sgd", "adam"]},
                "train.optimizer.momentum": {"dist": "uniform", "low": 0.5, "high": 0.95},
            }
        )
    )
    assert space.config_values(cfg) == {
        "method.weights.kl": 1.0, "train.optimizer.name": "sgd", "train.optimizer.momentum": 0.9
    }  # fmt: skip
    tiny_raw["train"]["optimizer"]["momentum"] = 0.0
    assert space.config_values(load_config(tiny_raw)) is None


def test_translations_and_clipping():
    space = parse_space(
        _space(
            a={"dist": "loguniform", "low": 0.1, "high": 10.0},
            b={"dist": "int", "low": 1, "high": 4},
            c={"dist": "choice", "values": ["x", "y"]},
            d={"dist": "uniform", "low": -1.0, "high": 1.0},
        )
    )
    a, b, c, d = (space.params[k] for k in "abcd")
    assert a.to_optuna().log and a.to_optuna().low == 0.1 and a.to_optuna().high == 10.0
    assert (b.to_optuna().low, b.to_optuna().high) == (1, 4)
    assert list(c.to_optuna().choices) == ["x", "y"]
    assert not d.to_optuna().log
    assert a.to_tune().lower == 0.1 and b.to_tune().upper == 5  # tune's randint excludes the upper bound
    assert a.clip(12.0) == 10.0 and b.clip(4.6) == 4 and b.clip(0.2) == 1 and d.clip(-1.2) == -1.0
    assert a.contains(10.0) and not a.contains(10.01) and not b.contains(2.5) and c.contains("y")


def test_resources_follow_cluster_and_population(tiny_raw):
    cfg = load_config(tiny_raw)
    r = plan_resources(cfg, {"CPU": 8}, None, None)
    assert (r.resources, r.max_concurrent, r.threads) == ({"cpu": 1.0}, 8, 1)
    r = plan_resources(cfg, {"CPU": 8}, 2, None)
    assert (r.resources, r.max_concurrent, r.threads) == ({"cpu": 4.0}, 2, 4)
    r = plan_resources(cfg, {"CPU": 2}, 4, None)
    assert (r.resources["cpu"], r.max_concurrent) == (1.0, 2)
    ray_cfg = load_config(tiny_raw, ["engine.name=ray", "engine.placement.cpus_per_peer=1"])
    r = plan_resources(ray_cfg, {"CPU": 5}, None, None)  # 2 workers at 0.99 CPU + a 0.01 driver: 2 fit in 5
    assert (r.resources, r.max_concurrent, r.threads, r.worker_cpus) == ({"cpu": 0.01}, 2, None, 0.99)
    assert plan_resources(ray_cfg, {"CPU": 2}, None, None).max_concurrent == 1  # exactly K CPUs host one
    assert plan_resources(ray_cfg, {"CPU": 5}, 4, None).max_concurrent == 2
    with pytest.raises(PlacementError, match="needs 1.99 CPU"):
        plan_resources(ray_cfg, {"CPU": 1}, None, None)
    # K x M: each trial reserves every worker of every peer (2 peers x 2 workers at 0.99 CPU + the driver)
    kxm = load_config(tiny_raw, ["engine.name=ray", "engine.placement.workers_per_peer=2"])
    assert plan_resources(kxm, {"CPU": 8}, None, None).max_concurrent == 2  # 3.97 CPUs a trial
    assert plan_resources(kxm, {"CPU": 7.9}, None, None).max_concurrent == 1
    with pytest.raises(PlacementError, match=r"needs 3.97 CPU.*4 workers"):
        plan_resources(kxm, {"CPU": 3}, None, None)


# tune_spaces/ and the studies' own (their tuned rows' searches: docs/results.md)
SHIPPED = sorted(
    [*(REPO / "tune_spaces").glob("*.yaml"), *(REPO / "configs" / "studies" / "spaces").glob("*.yaml")]
)


def _config_for(method: str, tiny_raw: dict) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["method"] = {"name": method}
    if method in (
        "kd",
        "tfkd",
        "aikd",
        "dfad",
        "mad",
    ):  # a frozen teacher (its file is not read by validation)
        raw["peers"][0].update(frozen=True, checkpoint="teacher.pt")
    if method in ("independent", "pskd", "cskd"):
        raw["peers"] = raw["peers"][:1]
    if method in ("dfad", "mad"):
        raw["train"]["steps_per_epoch"] = 2
    return raw


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name + "/" + p.stem for p in SHIPPED])
def test_shipped_spaces_are_valid_and_say_where_ranges_come_from(path, tiny_raw):
    space = load_space(path)
    assert path.stem == space.method or path.stem.startswith(f"{space.method}_")  # dml.yaml, dml_size.yaml
    space.check_against(_config_for(space.method, tiny_raw))
    for key, param in space.params.items():
        assert param.source.strip(), f"{path.name}: '{key}' has no source"


def test_method_specific_keys_are_seen_in_the_resolved_config(tiny_raw):
    """AFD's own keys (adversarial lr, step ratio) must reach the resolved config: the first trial runs the config's
    own values only if they are found, and best.yaml / checkpoints are written from the resolved config."""
    tiny_raw["method"] = {"name": "afd", "disc_every": 2, "adv_optimizer": {"lr": 0.02}}
    cfg = load_config(tiny_raw)
    flat = cfg.flat()
    assert flat["method.disc_every"] == 2 and flat["method.adv_optimizer.lr"] == 0.02
    assert load_config(cfg.to_dict()).method.adv_optimizer.lr == 0.02  # round trip (config.yaml, checkpoints)
    own = load_space(REPO / "tune_spaces" / "afd.yaml").config_values(cfg)
    assert own is not None and own["method.disc_every"] == 2 and own["method.adv_optimizer.lr"] == 0.02


def test_a_study_starts_its_ray_with_a_dashboard(monkeypatch):
    """Each ray-engine trial keeps Train's placement-group cleaner (the study's job outlives the trials), and the
    cleaner asks the dashboard whether a trial's controller is alive."""
    import contextlib

    from kdray.config import validate
    from kdray.search.study import study_ray

    seen = []

    @contextlib.contextmanager
    def session(engine, num_peers):
        seen.append(engine.session)
        yield "local"

    monkeypatch.setattr("kdray.engines.ray_runtime.ray_session", session)
    cfg = validate(
        {"name": "s", "peers": [{"arch": "resnet8"}, {"arch": "resnet8"}], "method": {"name": "dml"}}
    )
    for address in (None, "127.0.0.1:6379"):
        with study_ray(cfg, address=address) as how:
            assert how == "local"
    assert [(s.dashboard, s.address) for s in seen] == [(True, None), (True, "127.0.0.1:6379")]
    assert cfg.engine.session.dashboard is False  # the user's config is left as it was
