"""``kdray cluster check FILE [--config EXPERIMENT]``: is this cluster-launcher file ready for ``ray up``, and does
the experiment fit the cluster it describes?

1. What ``ray up`` does first, offline: Ray's own ``prepare_config`` and ``validate_config``
   (:mod:`kdray.cluster.ray_schema`). Neither contacts a cloud.
2. kdray's rules, on the file Ray accepted (each named by its key path, :mod:`kdray.cluster.problems`):

   - every node type has ``min_workers <= max_workers`` (Ray checks only the sum against the global ``max_workers``);
   - the commands every node runs pin ``ray==RAY_VERSION``, a docker image's tag names that version, and no command
     binds a service to 0.0.0.0 (:mod:`kdray.cluster.commands`);
   - shared storage: the folders every node mounts a network file system on, or that ``metadata.kdray.shared_mounts``
     declares (:mod:`kdray.cluster.storage`).

   With ``--config`` (and ``--set``), for ``engine.name: ray`` on a cluster that can have more than one node:

   - ``engine.session.storage_path`` must be reachable from every node (:mod:`kdray.cluster.storage`); so must a
     ``sqlite:///`` tracking store, which must not be relative (it would land in the job's temporary working
     directory);
   - capacity at ``max_workers``: room for the peers with their placement (:mod:`kdray.cluster.capacity`).

   The report printed for an accepted file is :class:`kdray.cluster.report.ClusterReport`.

Not checked (cannot be, offline): the provider section and ``node_config`` beyond their types (free-form for the
cloud: a misspelt ``InstanceType`` key or a wrong AMI id passes), whether the AMI, key, subnet, EFS id or IPs exist
and are reachable, cloud quotas, SSH access, that the mount commands succeed, object-store credentials.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from kdray.cluster.capacity import capacity_problems, node_inventory
from kdray.cluster.commands import check_open_binds, check_ray_version, node_commands
from kdray.cluster.problems import ClusterCheckError, Problem, key_path
from kdray.cluster.ray_schema import _ray_private_api, ray_prepare_and_validate
from kdray.cluster.report import ClusterReport
from kdray.cluster.storage import shared_storage, storage_problem
from kdray.errors import KdrayError
from kdray.safe_yaml import load_yaml

METADATA_KEYS = {"shared_mounts", "node_resources"}


def _metadata(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    meta = (raw.get("metadata") or {}).get("kdray") or {}
    if not isinstance(meta, dict):
        return {}, [Problem("metadata.kdray", "must be a mapping")]
    problems = [
        Problem(
            key_path("metadata", "kdray", k), f"unknown key (accepted: {', '.join(sorted(METADATA_KEYS))})"
        )
        for k in meta
        if k not in METADATA_KEYS
    ]
    mounts = meta.get("shared_mounts", [])
    if not isinstance(mounts, list) or not all(isinstance(m, str) and m.startswith("/") for m in mounts):
        problems.append(Problem("metadata.kdray.shared_mounts", f"{mounts!r}: a list of absolute paths"))
    resources = meta.get("node_resources", {})
    if not isinstance(resources, dict) or set(resources) - {"head", "worker"}:
        problems.append(Problem("metadata.kdray.node_resources", "a mapping with keys head and worker"))
    else:
        for role, res in resources.items():
            if not isinstance(res, dict) or not all(
                isinstance(v, (int, float)) and v >= 0 for v in res.values()
            ):
                problems.append(
                    Problem(
                        key_path("metadata", "kdray", "node_resources", role),
                        f"{res!r}: e.g. {{CPU: 16, GPU: 1}}",
                    )
                )
    return meta, problems


def _local_file_mounts(raw: dict[str, Any], base: Path) -> list[str]:
    missing = []
    for remote, local in (raw.get("file_mounts") or {}).items():
        path = Path(os.path.expanduser(str(local)))
        if not (path if path.is_absolute() else Path.cwd() / path).exists():
            missing.append(
                f"file_mounts[{remote!r}]: local path {local!r} does not exist here, so `ray up` will fail"
            )
    return missing


def read_cluster_file(path: Path) -> Any:
    """The YAML a cluster file holds. Whatever its bytes, a file that cannot be read as YAML is one line."""
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise KdrayError(f"cluster file '{path}': no such file")
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KdrayError(f"cluster file '{path}': not a text file (not UTF-8)") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise KdrayError(f"cluster file '{path}': not valid YAML: {first}") from None
    except OSError as exc:
        raise KdrayError(f"cluster file '{path}': cannot be read ({exc.strerror or exc})") from None


def check_cluster(
    file: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
) -> ClusterReport:
    """Check a cluster-launcher file (and an experiment on it); raise :class:`ClusterCheckError` naming each problem."""
    path = Path(file)
    raw = read_cluster_file(path)
    try:
        prepared = ray_prepare_and_validate(raw)
    except ClusterCheckError as exc:
        raise ClusterCheckError(str(path), exc.problems) from None
    util, providers = _ray_private_api()
    defaults = providers._get_default_config(raw["provider"])

    problems: list[Problem] = []
    meta, meta_problems = _metadata(raw)
    problems += meta_problems
    types = prepared["available_node_types"]
    for name, spec in types.items():
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers", 0)
        if lo > hi:
            problems.append(
                Problem(
                    key_path("available_node_types", name, "min_workers"),
                    f"{lo} is more than max_workers {hi}",
                )
            )
    roles = node_commands(raw, prepared, defaults)
    problems += check_ray_version(prepared, roles)
    problems += check_open_binds(roles)
    storage = shared_storage(roles, meta.get("shared_mounts") or [] if not meta_problems else [])
    nodes = node_inventory(prepared, meta if not meta_problems else {})
    max_workers = prepared.get("max_workers", 0)
    report = ClusterReport(str(path), prepared["provider"]["type"], nodes, max_workers, storage)
    report.warnings += _local_file_mounts(raw, path.parent)
    multi_node = max_workers > 0
    if multi_node and not storage.mounts:
        report.warnings.append(
            "no shared mount on every node: multi-node runs need engine.session.storage_path on shared storage "
            "(an s3:// or gs:// URI, or NFS/EFS mounted in setup_commands)"
        )
    starts = " ".join(c.text for c in roles.get("head", []))
    if multi_node and "GLOO_SOCKET_IFNAME" not in starts:
        report.warnings.append(
            "the head's commands never set GLOO_SOCKET_IFNAME (nor NCCL_SOCKET_IFNAME on GPU nodes): across nodes "
            "gloo/nccl may pick a wrong interface (docker0, lo); export them in the ray start commands"
        )
    if config is not None:
        problems += _check_experiment(config, overrides, report, multi_node)
    if problems:
        raise ClusterCheckError(str(path), problems)
    return report


def _check_experiment(config, overrides, report: ClusterReport, multi_node: bool) -> list[Problem]:
    from kdray.config import load_config

    cfg = load_config(config, overrides)
    eng = cfg.engine
    report.experiment.append(
        f"experiment {config} ({cfg.name}): {cfg.num_peers} peers, method {cfg.method.name}, engine {eng.name}, "
        f"placement {eng.placement.strategy}, per peer {{CPU: {eng.placement.cpus_per_peer:g}, GPU: {eng.placement.gpus_per_peer:g}}}"
    )
    if eng.name != "ray":
        report.warnings.append(
            "engine.name=local: the whole population runs in the job's driver on the head node; "
            "--set engine.name=ray spreads the peers over the cluster"
        )
        return []
    problems, verdict = capacity_problems(cfg, report.nodes, report.max_workers, report.provider)
    report.experiment.append(f"  {verdict}")
    if not problems and report.provider != "local" and eng.placement.timeout_s < 900:
        # The nodes up from the start (min_workers) may not hold the population: the autoscaler then launches more,
        # which takes minutes (boot + setup_commands), longer than the engine waits for its placement by default.
        at_start = [replace(n, max_count=n.min_count) for n in report.nodes]
        short, _ = capacity_problems(cfg, at_start, sum(n.min_count for n in at_start if n.role != "head"))
        if short:
            report.warnings.append(
                f"the nodes up at start (min_workers) cannot hold the population, and new nodes take minutes to boot "
                f"and set up: engine.placement.timeout_s={eng.placement.timeout_s:g} s will likely expire first; "
                "--set engine.placement.timeout_s=1200, or raise the node type's min_workers"
            )
    if multi_node:
        if eng.session.storage_path is None:
            mount = next(iter(report.storage.mounts), None)
            problems.append(
                Problem(
                    "engine.session.storage_path",
                    "not set: Ray Train would checkpoint to <out>/ray_storage on the node that runs the job, which the "
                    "other nodes cannot reach; set it to "
                    + (
                        f"a folder under {mount}, e.g. {mount}/ray_storage"
                        if mount
                        else "shared storage (s3://...)"
                    ),
                )
            )
        else:
            p = storage_problem("engine.session.storage_path", eng.session.storage_path, report.storage)
            if p:
                problems.append(p)
            else:
                report.experiment.append(
                    f"  engine.session.storage_path {eng.session.storage_path}: reachable from every node"
                )
    tracking = cfg.tracking
    if tracking.enabled and tracking.uri is None:
        report.warnings.append(
            "tracking.uri is null: the MLflow store goes beside the run folder: pass --out on shared storage"
        )
    elif tracking.enabled and tracking.uri.startswith("sqlite:///"):
        db = tracking.uri.removeprefix("sqlite:///")
        if not db.startswith("/"):
            problems.append(
                Problem(
                    "tracking.uri", f"{tracking.uri!r}: a relative store lands in the job's temporary folder"
                )
            )
        elif multi_node and storage_problem("tracking.uri", db, report.storage):
            report.warnings.append(
                f"tracking.uri {tracking.uri}: on the head's own disk; it is lost with the head (`ray down`): "
                "prefer a path on shared storage"
            )
    return problems
