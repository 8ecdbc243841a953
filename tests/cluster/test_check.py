"""`kdray cluster check`: the shipped cluster files pass; each kind of broken file exits 2 naming the key and the fault."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kdray.cli import main
from kdray.cluster.check import check_cluster
from kdray.cluster.commands import ray_requirements
from kdray.cluster.problems import ClusterCheckError, key_path
from kdray.cluster.ray_schema import RAY_VERSION
from kdray.cluster.storage import mount_targets
from kdray.errors import KdrayError

# The shipped cluster files pin the Ray that `make install` puts in .venv, and the check holds every node to the Ray
# installed where it runs: on the other end of pyproject's Ray range (.ci/range) they would be refused,
# rightly, so the module runs on the pinned release only.
pytestmark = pytest.mark.skipif(
    RAY_VERSION != "2.60.0",
    reason=f"the example cluster files pin ray 2.60.0; this environment has {RAY_VERSION}",
)
REPO = Path(__file__).resolve().parents[2]
AWS = REPO / "cluster.yaml"
ONPREM = REPO / "deploy" / "onprem.yaml"
SHARED = ["engine.name=ray", "engine.session.storage_path=/mnt/kdray/ray_storage"]
RING3_GPU = [*SHARED, "engine.placement.strategy=strict_spread", "engine.placement.gpus_per_peer=1"]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _write(tmp_path: Path, raw: dict, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def experiment(tmp_path: Path, tiny_raw: dict) -> Path:
    """A 3-peer population (a ring of three needs three nodes under strict_spread)."""
    tiny_raw["peers"] = [copy.deepcopy(tiny_raw["peers"][0]) for _ in range(3)]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def _problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ClusterCheckError) as info:
        check_cluster(path, **kwargs)
    return [str(p) for p in info.value.problems]


# ------------------------------------------------------------------------------------------- the shipped files
@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_shipped_files_pass(path: Path, experiment: Path, capsys) -> None:
    assert (
        main(
            [
                "cluster",
                "check",
                str(path),
                "--config",
                str(experiment),
                *sum((["--set", s] for s in RING3_GPU), []),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "accepted by `ray up`" in out
    assert "/mnt/kdray" in out  # the shared storage found in setup_commands
    assert (
        "3 peers need 3 nodes" in out
        and "engine.session.storage_path /mnt/kdray/ray_storage: reachable" in out
    )


def test_shipped_aws_file_counts_nodes() -> None:
    report = check_cluster(AWS)
    nodes = {n.name: n for n in report.nodes}
    assert nodes["head_cpu"].resources == {"CPU": 8.0, "GPU": 0.0}
    assert nodes["gpu_worker"].resources == {"CPU": 8.0, "GPU": 1.0}
    assert (nodes["gpu_worker"].min_count, nodes["gpu_worker"].max_count) == (0, 4)
    assert list(report.storage.mounts) == ["/mnt/kdray"]


def test_ray_version_pin_is_ours() -> None:
    """The cluster check's private-API release lies inside the Ray range pyproject.toml declares, and is the one
    installed."""
    import ray
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_req,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert ray_req.specifier.contains(RAY_VERSION)
    assert ray.__version__ == RAY_VERSION


def test_other_ray_version_is_refused_clearly(monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(
        KdrayError, match=r"private autoscaler API, tested on ray 2\.55\.x, 2\.60\.x.*has ray==2\.61\.0"
    ):
        check_cluster(AWS)


# ------------------------------------------------------------------------------------- what ray up refuses
def test_typo_in_top_level_key(tmp_path: Path, capsys) -> None:
    raw = _raw(AWS)
    raw["setup_comands"] = raw.pop("setup_commands")
    assert main(["cluster", "check", str(_write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "setup_comands: unknown key (did you mean 'setup_commands'?)" in err


def test_typo_in_node_type_key(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["available_node_types"]["gpu_worker"]["max_worker"] = raw["available_node_types"]["gpu_worker"].pop(
        "max_workers"
    )
    assert _problems(_write(tmp_path, raw)) == [
        "available_node_types.gpu_worker.max_worker: unknown key (did you mean 'max_workers'?)"
    ]


def test_head_node_type_not_defined(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["head_node_type"] = "head"
    (problem,) = _problems(_write(tmp_path, raw))
    assert problem == "head_node_type: 'head' is not one of available_node_types (head_cpu, gpu_worker)"


def test_min_workers_above_max_workers_of_a_node_type(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["max_workers"] = 10
    raw["available_node_types"]["gpu_worker"].update(min_workers=3, max_workers=2)
    assert _problems(_write(tmp_path, raw)) == [
        "available_node_types.gpu_worker.min_workers: 3 is more than max_workers 2"
    ]


def test_min_workers_above_global_max_workers(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["available_node_types"]["gpu_worker"].update(min_workers=5, max_workers=6)
    (problem,) = _problems(_write(tmp_path, raw))
    assert problem.startswith("max_workers: 4 is smaller than the sum of the node types' min_workers (5:")


def test_wrong_type_is_named(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    (problem,) = _problems(_write(tmp_path, raw))
    assert problem.startswith("available_node_types.gpu_worker.resources.GPU: 'one' is not of type 'integer'")


def test_unknown_provider(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["provider"]["type"] = "awz"
    (problem,) = _problems(_write(tmp_path, raw))
    assert problem.startswith("provider.type: 'awz' is not a Ray provider (")


def test_local_provider_needs_its_ips(tmp_path: Path) -> None:
    raw = _raw(ONPREM)
    del raw["provider"]["worker_ips"]
    (problem,) = _problems(_write(tmp_path, raw))
    assert problem.startswith("provider: Please supply a `head_ip` and list of `worker_ips`")


# ----------------------------------------------------------------------------------------------- kdray's rules
def test_too_few_nodes_for_strict_spread(tmp_path: Path, experiment: Path, capsys) -> None:
    raw = _raw(AWS)
    raw["max_workers"] = 2
    path = _write(tmp_path, raw)
    argv = ["cluster", "check", str(path), "--config", str(experiment)]
    assert main([*argv, *sum((["--set", s] for s in RING3_GPU), [])]) == 2
    err = capsys.readouterr().err
    assert "engine.placement.strategy: strict_spread puts each of the 3 peers on its own node" in err
    assert "only 2 node(s) fit a peer {CPU: 1, GPU: 1}" in err
    assert "engine.placement.gpus_per_peer: 3 peers x 1 GPU = 3 GPUs, but the cluster has 2" in err
    # The same population packs onto the head's 8 CPUs when it asks for no GPU.
    assert main([*argv, "--set", SHARED[0], "--set", SHARED[1]]) == 0


def test_autoscaling_needs_a_longer_placement_timeout(experiment: Path) -> None:
    report = check_cluster(AWS, config=experiment, overrides=RING3_GPU)  # min_workers 0: the GPUs come later
    assert any("engine.placement.timeout_s=60 s will likely expire first" in w for w in report.warnings)
    report = check_cluster(AWS, config=experiment, overrides=[*RING3_GPU, "engine.placement.timeout_s=1200"])
    assert not any("placement_timeout_s" in w for w in report.warnings)
    report = check_cluster(
        AWS, config=experiment, overrides=SHARED
    )  # CPU peers fit on the head from the start
    assert not any("placement_timeout_s" in w for w in report.warnings)


def test_too_few_machines_on_premise(experiment: Path) -> None:
    four = [*RING3_GPU, "peers=[{arch: resnet8}, {arch: resnet8}, {arch: resnet8}, {arch: resnet8}]"]
    gpus, placement = _problems(ONPREM, config=experiment, overrides=four)
    assert gpus.startswith("engine.placement.gpus_per_peer: 4 peers x 1 GPU = 4 GPUs, but the cluster has 3")
    assert placement.startswith(
        "engine.placement.strategy: strict_spread puts each of the 4 peers on its own node"
    )
    assert "add machines to provider.worker_ips" in placement


def test_data_parallel_peers_are_counted_worker_by_worker(experiment: Path) -> None:
    """K peers x M workers ask for K x M workers, and ``group_by`` needs each group whole on one node: the on-premise
    file's head of 16 CPUs and three machines of 16 CPUs and 1 GPU each."""
    kxm = [*SHARED, "engine.placement.gpus_per_peer=1", "engine.placement.workers_per_peer=2"]
    gpus, *_ = _problems(ONPREM, config=experiment, overrides=kxm)  # 3 peers x 2 workers x 1 GPU
    assert gpus.startswith(
        "engine.placement.gpus_per_peer: 6 workers x 1 GPU = 6 GPUs, but the cluster has 3"
    )
    # two peers of two CPU workers, each peer's workers on one node: fits, one peer per machine
    two = [*SHARED, "peers=[{arch: resnet8}, {arch: resnet8}]", "engine.placement.workers_per_peer=2"]
    report = check_cluster(ONPREM, config=experiment, overrides=[*two, "engine.placement.group_by=peer"])
    assert "pack: 4 workers of {CPU: 1, GPU: 0}; the cluster has room for" in "\n".join(report.experiment)
    assert "group_by peer: 2 group(s) of up to 2 workers on 2 node(s)" in "\n".join(report.experiment)
    # ... but not when a peer's 2 workers need 9 CPUs each: 18 CPUs on one 16-CPU machine
    (group,) = _problems(
        ONPREM,
        config=experiment,
        overrides=[*two, "engine.placement.group_by=peer", "engine.placement.cpus_per_peer=9"],
    )
    assert group.startswith(
        "engine.placement.group_by: peer: 2 group(s) of 2 worker(s) (one per peer, its workers), each group on one "
        "node, {CPU 9} per worker ({CPU 18} per group); no node has room for one group: the cluster has 4 node(s)"
    ), group
    assert "add machines to provider.worker_ips" in group
    # group_by none: the same workers may sit on any node, one each
    check_cluster(ONPREM, config=experiment, overrides=[*two, "engine.placement.cpus_per_peer=9"])


@pytest.mark.parametrize(
    ("storage", "fault"),
    [
        ("/tmp/ckpt", "'/tmp/ckpt' is local to one node (no shared mount covers it)"),
        ("~/ckpt", "'~/ckpt' is in one node's home folder, not shared storage"),
        ("ray_storage", "'ray_storage' is relative: it resolves in the job's temporary folder on one node"),
        ("/mnt/kdray-other/x", "'/mnt/kdray-other/x' is local to one node"),
    ],
)
def test_storage_local_to_one_node(experiment: Path, storage: str, fault: str) -> None:
    (problem,) = _problems(
        AWS, config=experiment, overrides=["engine.name=ray", f"engine.session.storage_path={storage}"]
    )
    assert problem.startswith(f"engine.session.storage_path: {fault}")
    assert "use a folder under the shared mount /mnt/kdray, or an s3:// / gs:// URI" in problem


def test_storage_unset_on_a_multi_node_cluster(experiment: Path) -> None:
    (problem,) = _problems(AWS, config=experiment, overrides=["engine.name=ray"])
    assert problem.startswith(
        "engine.session.storage_path: not set: Ray Train would checkpoint to <out>/ray_storage"
    )
    assert problem.endswith("e.g. /mnt/kdray/ray_storage")


@pytest.mark.parametrize(
    "storage", ["s3://bucket/kdray", "gs://bucket/kdray", "/mnt/kdray", "file:///mnt/kdray/x"]
)
def test_storage_every_node_reaches(experiment: Path, storage: str) -> None:
    check_cluster(
        AWS, config=experiment, overrides=["engine.name=ray", f"engine.session.storage_path={storage}"]
    )


def test_mount_on_the_head_only_is_not_shared(tmp_path: Path, experiment: Path) -> None:
    raw = _raw(AWS)
    mount = raw["setup_commands"].pop()
    raw["head_setup_commands"].append(mount)
    (problem,) = _problems(_write(tmp_path, raw), config=experiment, overrides=SHARED)
    assert problem.startswith(
        "engine.session.storage_path: '/mnt/kdray/ray_storage': /mnt/kdray is mounted on head only"
    )


def test_declared_shared_mount(tmp_path: Path, experiment: Path) -> None:
    raw = _raw(ONPREM)
    raw["setup_commands"].pop()  # the NFS mount: the machines have it in fstab instead
    path = _write(tmp_path, raw)
    (problem,) = _problems(path, config=experiment, overrides=SHARED)
    assert "is local to one node" in problem and "mount NFS/EFS on every node" in problem
    raw["metadata"]["kdray"]["shared_mounts"] = ["/mnt/kdray"]
    report = check_cluster(_write(tmp_path, raw), config=experiment, overrides=SHARED)
    assert report.storage.mounts == {"/mnt/kdray": "declared in metadata.kdray.shared_mounts"}


def test_wrong_ray_version_in_setup_commands(tmp_path: Path, capsys) -> None:
    raw = _raw(AWS)
    raw["setup_commands"] = [c.replace("==2.60.0", "==2.59.0") for c in raw["setup_commands"]]
    assert main(["cluster", "check", str(_write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert (
        "setup_commands[3]: installs Ray 2.59.0 ('ray[default,train,tune]==2.59.0'); kdray runs ray==2.60.0"
        in err
    )
    assert "never installs ray==2.60.0" in err


def test_unpinned_or_missing_ray(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["setup_commands"][3] = "pip install -U ray[default]"
    problems = _problems(_write(tmp_path, raw))
    assert "setup_commands[3]: installs 'ray[default]' without a version: pin ray==2.60.0" in problems
    del raw["setup_commands"]  # Ray's AWS default then installs a nightly wheel
    problems = _problems(_write(tmp_path, raw))
    assert any("(Ray's default for provider aws)" in p and "installs Ray 3.0.0.dev0" in p for p in problems)


def test_dashboard_on_every_interface_is_refused(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["head_start_ray_commands"][1] = raw["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")
    (problem,) = _problems(_write(tmp_path, raw))
    assert problem.startswith(
        "head_start_ray_commands[1]: ray --dashboard-host 0.0.0.0 listens on every interface"
    )


def test_undeclared_resources_cannot_be_counted(tmp_path: Path, experiment: Path) -> None:
    raw = _raw(AWS)
    raw["available_node_types"]["gpu_worker"]["resources"] = {}
    (problem,) = _problems(_write(tmp_path, raw), config=experiment, overrides=RING3_GPU)
    assert problem.startswith("available_node_types.gpu_worker.resources: not declared")


def test_unknown_metadata_key(tmp_path: Path) -> None:
    raw = _raw(ONPREM)
    raw["metadata"]["kdray"]["shared_mount"] = ["/mnt/x"]
    assert _problems(_write(tmp_path, raw)) == [
        "metadata.kdray.shared_mount: unknown key (accepted: node_resources, shared_mounts)"
    ]


def test_several_problems_are_listed_together(tmp_path: Path, capsys) -> None:
    raw = _raw(AWS)
    raw["available_node_types"]["gpu_worker"].update(min_workers=3, max_workers=2)
    raw["setup_commands"] = [c.replace("==2.60.0", "==2.59.0") for c in raw["setup_commands"]]
    assert main(["cluster", "check", str(_write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err and "min_workers: 3 is more than max_workers 2" in err


def test_bad_experiment_key_and_set_without_config(tmp_path: Path, experiment: Path, capsys) -> None:
    assert (
        main(["cluster", "check", str(AWS), "--config", str(experiment), "--set", "engine.placment=pack"])
        == 2
    )
    assert "engine.placment" in capsys.readouterr().err
    assert main(["cluster", "check", str(AWS), "--set", "engine.name=ray"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["cluster", "check", str(tmp_path / "missing.yaml")]) == 2


# ------------------------------------------------------------------------------------------- parsing helpers
def test_ray_requirements() -> None:
    line = 'sudo -H ~/venv/bin/pip install -q torch==2.14.1 "ray[default,train,tune]==2.60.0" -e ~/ray-stuff'
    assert ray_requirements(line) == [("ray[default,train,tune]==2.60.0", "2.60.0")]
    assert ray_requirements("uv pip install 'ray>=2.50' raydp") == [("ray>=2.50", None)]
    wheel = (
        "pip install -U https://s3.amazonaws.com/ray-wheels/latest/ray-3.0.0.dev0-cp310-cp310-manylinux.whl"
    )
    assert ray_requirements(wheel)[0][1] == "3.0.0.dev0"
    assert ray_requirements("echo pip install ray==1.0 > notes; which ray") == []


def test_mount_targets() -> None:
    efs = (
        "sudo mkdir -p /mnt/kdray && (mountpoint -q /mnt/kdray || sudo mount -t nfs4 -o nfsvers=4.1,hard "
        "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/kdray/)"
    )
    assert mount_targets(efs) == [("/mnt/kdray", "nfs4 mount")]
    assert mount_targets("sudo mount nas:/export/x /data/shared") == [("/data/shared", "nfs mount")]
    assert mount_targets("sudo mount -t efs -o tls fs-1:/ /efs") == [("/efs", "efs mount")]
    assert mount_targets("s3fs my-bucket /mnt/s3 -o iam_role=auto") == [("/mnt/s3", "s3fs")]
    assert mount_targets("sudo mount /dev/nvme1n1 /mnt/scratch") == []  # a local disk
    assert mount_targets("sudo mount -t tmpfs tmpfs /mnt/fast") == []


def test_key_path() -> None:
    assert key_path("available_node_types", "ray.head.default", "resources") == (
        "available_node_types['ray.head.default'].resources"
    )
    assert key_path("setup_commands", 2) == "setup_commands[2]"
    assert key_path() == "<top level>"


def test_missing_socket_interface_is_a_warning(tmp_path: Path) -> None:
    raw = _raw(AWS)
    raw["head_start_ray_commands"][1] = (
        "ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml"
    )
    report = check_cluster(_write(tmp_path, raw))
    assert any("GLOO_SOCKET_IFNAME" in w for w in report.warnings)
    assert not any("GLOO_SOCKET_IFNAME" in w for w in check_cluster(AWS).warnings)
