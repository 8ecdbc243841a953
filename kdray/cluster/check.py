"""``kdray cluster check FILE [--config EXPERIMENT]``: is this cluster-launcher file ready for ``ray up``, and does
the experiment fit the cluster it describes?

1. What ``ray up`` does first, offline: Ray's own ``prepare_config`` (fill the provider's defaults, merge setup
   commands, the local provider's node type) and ``validate_config`` (Ray's JSON schema: unknown or mistyped keys at
   the top level and in node types, ``head_node_type`` one of ``available_node_types``, the sum of ``min_workers`` at
   most ``max_workers``). Neither contacts a cloud: ``ray up`` does that in two steps kdray skips, the detection of
   each instance type's CPUs/GPUs (``fillout_available_node_types_resources``, the EC2 API) and the provider's
   ``bootstrap_config`` (IAM, key pair, subnets). That Ray API is private, so it is used only with the Ray version
   kdray pins.
2. kdray's rules, on the file Ray accepted (each named by its key path):

   - every node type has ``min_workers <= max_workers`` (Ray checks only the sum against the global ``max_workers``);
   - the commands every node runs pin ``ray==RAY_VERSION`` (the version of the machine running ``ray up`` and
     ``kdray submit``), and no command installs another Ray; a docker image's tag must name that version too;
   - no command binds a service (dashboard, MLflow) to 0.0.0.0: reach them through SSH tunnels;
   - shared storage: a folder is shared when every node mounts a network file system there in the commands it runs
     (``mount -t nfs|nfs4|efs|lustre|cifs|glusterfs|ceph|fuse.*``, ``mount SERVER:/export DIR``, ``s3fs``,
     ``gcsfuse``, ``mount-s3``, ``goofys``), or when ``metadata.kdray.shared_mounts`` declares it (mounted by the
     image or /etc/fstab). A mount made only in ``head_setup_commands`` is local to the head.

   With ``--config`` (and ``--set``), for ``engine.name: ray`` on a cluster that can have more than one node:

   - ``engine.storage_path`` must be reachable from every node: an object-store URI (``s3://``, ``gs://``, ...) or a
     path under a shared mount. A relative path, or a path outside every shared mount (``/tmp/...``, ``~/...``, the
     default ``<out>/ray_storage``) is local to one node and refused; so is a relative ``sqlite:///`` tracking store
     (it would land in the job's temporary working directory);
   - capacity at ``max_workers``: each peer is a Ray Train worker asking for ``engine.cpus_per_peer`` CPUs and
     ``engine.gpus_per_peer`` GPUs on one node; ``strict_spread`` needs as many nodes that can each hold a peer as
     there are peers; ``pack``/``spread`` need room for all peers; ``gpus_per_peer * peers`` at most the GPUs.
     Node resources come from each node type's ``resources`` (or, for the ``local`` provider, from
     ``metadata.kdray.node_resources``), because Ray detects them only when a node starts.

Not checked (cannot be, offline): the provider section and ``node_config`` beyond their types (free-form for the
cloud: a misspelt ``InstanceType`` key or a wrong AMI id passes), whether the AMI, key, subnet, EFS id or IPs exist
and are reachable, cloud quotas, SSH access, that the mount commands succeed, object-store credentials.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kdray.errors import KdrayError

RAY_VERSION = (
    "2.60.0"  # kdray's pin (pyproject.toml); the private autoscaler API below is known at this version
)

# Network file systems whose mount point every node sees the same. Local ones (ext4, xfs, tmpfs, overlay) are not.
NETWORK_FS = ("nfs", "nfs4", "efs", "lustre", "cifs", "smb3", "glusterfs", "ceph", "beegfs", "gpfs", "fuse.")
FUSE_MOUNTERS = ("s3fs", "gcsfuse", "mount-s3", "goofys", "blobfuse2", "rclone", "juicefs")
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs")
METADATA_KEYS = {"shared_mounts", "node_resources"}


# ------------------------------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class Problem:
    key: str  # where in the file (or the experiment), e.g. available_node_types.gpu_worker.max_workers
    message: str  # what is wrong, the value given and what would be accepted

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ClusterCheckError(KdrayError):
    """A cluster file that ``ray up`` would refuse, or that kdray cannot run the experiment on."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


def key_path(*parts: Any) -> str:
    """``available_node_types["ray.head"].resources`` from path parts (names holding dots are quoted)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out or "<top level>"


# ------------------------------------------------------------------------------------------- 1. what ray up does
def _ray_private_api():
    """Ray's own config preparation and validation (private: guarded by the version kdray pins)."""
    import ray

    if ray.__version__ != RAY_VERSION:
        raise KdrayError(
            f"kdray cluster check validates with Ray's private autoscaler API as of ray=={RAY_VERSION}, but this "
            f"environment has ray=={ray.__version__}; install kdray's pin: pip install 'ray[default]=={RAY_VERSION}'"
        )
    try:
        from ray.autoscaler._private import providers, util
    except ImportError as exc:  # pragma: no cover - only with a broken Ray install
        raise KdrayError(
            f"cannot import Ray's autoscaler ({exc}); reinstall ray[default]=={RAY_VERSION}"
        ) from None
    return util, providers


@contextlib.contextmanager
def _quiet_ray():
    """Ray's config code logs and prints what it fills in; keep the check's output to kdray's report."""
    loggers = [logging.getLogger(n) for n in ("ray", "ray.autoscaler", "ray.autoscaler._private.util")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield sink
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _schema_problems(prepared: dict[str, Any]) -> list[Problem]:
    """Every violation of Ray's schema (Ray itself stops at the best match), with a spelling hint for unknown keys."""
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = []
    for err in sorted(validator.iter_errors(prepared), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties":
            known = sorted((err.schema.get("properties") or {}).keys())
            for name in re.findall(r"'([^']+)'", err.message.split("(")[-1]):
                if name not in (err.instance or {}):
                    continue
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (accepted: {', '.join(known)})"
                problems.append(Problem(key_path(*path, name), f"unknown key{hint}"))
        else:
            problems.append(Problem(key_path(*path), err.message))
    return problems


def ray_prepare_and_validate(raw: Any) -> dict[str, Any]:
    """``validate_config(prepare_config(raw))`` as ``ray up`` runs it; Ray's refusals become named problems."""
    util, providers = _ray_private_api()
    if not isinstance(raw, dict):
        raise ClusterCheckError("cluster file", [Problem("<top level>", "must be a YAML mapping")])
    provider = raw.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        raise ClusterCheckError(
            "cluster file",
            [Problem("provider.type", "missing: e.g. provider: {type: aws, region: us-west-2}")],
        )
    if provider["type"] not in providers._DEFAULT_CONFIGS and provider["type"] != "external":
        accepted = ", ".join(sorted(providers._DEFAULT_CONFIGS))
        raise ClusterCheckError(
            "cluster file",
            [Problem("provider.type", f"{provider['type']!r} is not a Ray provider ({accepted})")],
        )
    import click

    with _quiet_ray() as said:
        try:
            prepared = util.prepare_config(copy.deepcopy(raw))
        except click.ClickException as exc:  # the local provider's aborts
            raise ClusterCheckError("cluster file", [Problem("provider", exc.format_message())]) from None
        except Exception as exc:  # noqa: BLE001 - anything prepare_config trips on, ray up trips on too
            detail = str(exc) or type(exc).__name__
            raise ClusterCheckError(
                "cluster file", [Problem("<top level>", f"`ray up` fails filling defaults: {detail}")]
            ) from None
        try:
            util.validate_config(prepared)
        except Exception as exc:  # noqa: BLE001 - classified below
            raise ClusterCheckError(
                "cluster file", _describe_ray_refusal(exc, prepared, said.getvalue())
            ) from None
    return prepared


def _describe_ray_refusal(exc: Exception, prepared: dict[str, Any], said: str) -> list[Problem]:
    import jsonschema

    if isinstance(exc, jsonschema.ValidationError):
        return _schema_problems(prepared) or [Problem(key_path(*exc.absolute_path), exc.message)]
    text = str(exc)
    types = prepared.get("available_node_types") or {}
    if "head_node_type" in text:
        given = prepared.get("head_node_type")
        return [
            Problem(
                "head_node_type",
                f"{given!r} is not one of available_node_types ({', '.join(types) or 'none defined'})"
                if given is not None
                else "missing: name the head's node type (one of available_node_types)",
            )
        ]
    if "min_workers" in text:
        mins = {name: t.get("min_workers", 0) for name, t in types.items()}
        listed = ", ".join(f"{n}={m}" for n, m in mins.items())
        return [
            Problem(
                "max_workers",
                f"{prepared.get('max_workers')} is smaller than the sum of the node types' min_workers "
                f"({sum(mins.values())}: {listed})",
            )
        ]
    return [Problem("<top level>", f"`ray up` refuses the file: {text.strip() or type(exc).__name__}")]


# -------------------------------------------------------------------------------------------- commands per node
@dataclass
class Command:
    key: str  # e.g. setup_commands[3]
    text: str


def _split_simple_commands(text: str) -> list[list[str]]:
    """Shell text -> simple commands (argv lists), split on ; && || | ( ) and newlines. Good enough for setup lines."""
    lexer = shlex.shlex(text.replace("\n", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: Ray would run it and fail; nothing to learn from it here
        return []
    commands, current = [], []
    for tok in tokens:
        if tok and all(c in ";&|()<>" for c in tok):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        commands.append(current)
    return [_strip_prefixes(c) for c in commands if c]


def _strip_prefixes(argv: list[str]) -> list[str]:
    """Drop what runs a command rather than being it: sudo (and its flags), env, VAR=value, nohup, time."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("sudo", "env", "nohup", "time", "exec"):
            i += 1
            while i < len(argv) and argv[i].startswith("-"):
                i += 1
        elif re.fullmatch(r"[A-Za-z_]\w*=.*", tok):
            i += 1
        else:
            break
    return argv[i:]


def node_commands(
    raw: dict[str, Any], prepared: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, list[Command]]:
    """The commands each node role runs, in order: ``head`` and ``worker:<type>`` for every worker node type.

    Keys point at the user's file (``setup_commands[2]``), or say the list is Ray's default for the provider.
    """

    def listed(name: str, source: dict[str, Any] | None = None, prefix: tuple = ()) -> list[Command]:
        if source is not None:
            items = source.get(name) or []
            return [Command(key_path(*prefix, name, i), c) for i, c in enumerate(items)]
        if name in raw:
            return [Command(key_path(name, i), c) for i, c in enumerate(raw.get(name) or [])]
        items = defaults.get(name) or []
        return [
            Command(f"{name}[{i}] (Ray's default for provider {raw['provider']['type']})", c)
            for i, c in enumerate(items)
        ]

    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    roles = {
        "head": listed("initialization_commands")
        + listed("setup_commands")
        + listed("head_setup_commands")
        + listed("head_start_ray_commands")
    }
    workers = [t for t in types if t != head and types[t].get("max_workers", 0) > 0]
    if prepared["provider"]["type"] == "local":  # one node type for head and workers
        workers = [head] if prepared.get("max_workers", 0) > 0 else []
    for name in workers:
        spec = types[name]
        prefix = ("available_node_types", name)
        init = (
            listed("initialization_commands", spec, prefix)
            if "initialization_commands" in spec
            else listed("initialization_commands")
        )
        setup = (
            listed("worker_setup_commands", spec, prefix)
            if "worker_setup_commands" in spec
            else listed("setup_commands") + listed("worker_setup_commands")
        )
        roles[f"worker:{name}"] = init + setup + listed("worker_start_ray_commands")
    return roles


# ------------------------------------------------------------------------------------------------ version rule
_RAY_REQ = re.compile(r"^ray(\[[^\]]*\])?\s*(.*)$", re.IGNORECASE)
_RAY_WHEEL = re.compile(r"/ray-(\d[^-/]*)-cp\d+")


def ray_requirements(text: str) -> list[tuple[str, str | None]]:
    """``(requirement, pinned version or None)`` for every Ray that a pip/uv install in ``text`` asks for."""
    found = []
    for argv in _split_simple_commands(text):
        words = [os.path.basename(a) if i == 0 else a for i, a in enumerate(argv)]
        try:
            at = words.index("install")
        except ValueError:
            continue
        # pip install, pip3 install, python -m pip install, uv pip install (not: echo pip install ...)
        if not (at and words[at - 1] in ("pip", "pip3") and re.match(r"^(pip3?|uv|python[\d.]*)$", words[0])):
            continue
        skip_next = False
        for arg in argv[at + 1 :]:
            if skip_next:
                skip_next = False
                continue
            if arg in (
                "-r",
                "-c",
                "-e",
                "-i",
                "--index-url",
                "--extra-index-url",
                "-f",
                "--find-links",
                "--target",
            ):
                skip_next = True
                continue
            if arg.startswith("-"):
                continue
            wheel = _RAY_WHEEL.search(arg)
            m = _RAY_REQ.match(arg)
            if wheel:
                found.append((arg, wheel.group(1)))
            elif m and (not m.group(2) or m.group(2)[0] in "=<>!~@"):
                spec = m.group(2).replace(" ", "")
                found.append((arg, spec[2:] if spec.startswith("==") and "," not in spec else None))
    return found


def _docker_ray_version(image: str) -> str | None:
    m = re.search(r":(?:nightly|latest)?(\d+\.\d+\.\d+)", image)
    return m.group(1) if m else None


def check_ray_version(prepared: dict[str, Any], roles: dict[str, list[Command]]) -> list[Problem]:
    problems = []
    docker = prepared.get("docker") or {}
    images = {
        "head": docker.get("head_image") or docker.get("image"),
        "worker": docker.get("worker_image") or docker.get("image"),
    }
    for key in ("image", "head_image", "worker_image"):
        image = docker.get(key)
        if image and _docker_ray_version(image) != RAY_VERSION:
            problems.append(
                Problem(
                    f"docker.{key}",
                    f"{image!r} does not name Ray {RAY_VERSION}: use e.g. rayproject/ray:{RAY_VERSION}-py311-gpu",
                )
            )
    for role, commands in roles.items():
        pinned = False
        for cmd in commands:
            for req, version in ray_requirements(cmd.text):
                if version is None:
                    problems.append(
                        Problem(cmd.key, f"installs {req!r} without a version: pin ray=={RAY_VERSION}")
                    )
                elif version != RAY_VERSION:
                    problems.append(
                        Problem(
                            cmd.key,
                            f"installs Ray {version} ({req!r}); kdray runs ray=={RAY_VERSION}: pin that",
                        )
                    )
                else:
                    pinned = True
        if not pinned and not images["head" if role == "head" else "worker"]:
            where = (
                "setup_commands" if role == "head" else f"the commands node type {role.split(':', 1)[1]} runs"
            )
            problems.append(
                Problem(
                    "setup_commands",
                    f"the {role.split(':')[0]} node never installs ray=={RAY_VERSION}: add "
                    f'pip install "ray[default,train,tune]=={RAY_VERSION}" to {where}',
                )
            )
    # One problem per command line is enough: the same line runs on every role.
    return list(dict.fromkeys(problems))


def check_open_binds(roles: dict[str, list[Command]]) -> list[Problem]:
    problems = []
    for commands in roles.values():
        for cmd in commands:
            for argv in _split_simple_commands(cmd.text):
                for i, arg in enumerate(argv):
                    flag, _, value = arg.partition("=")
                    if not value and i + 1 < len(argv):
                        value = argv[i + 1]
                    if flag in (
                        "--dashboard-host",
                        "--host",
                        "-h",
                        "--bind",
                        "--ray-client-server-host",
                    ) and value in (
                        "0.0.0.0",
                        "::",
                        "[::]",
                    ):
                        problems.append(
                            Problem(
                                cmd.key,
                                f"{argv[0]} {flag} {value} listens on every interface, public ones included: bind "
                                "127.0.0.1 and use an SSH tunnel (`ray dashboard`, `ray exec --port-forward`), or "
                                "the node's private IP",
                            )
                        )
    return list(dict.fromkeys(problems))


# ------------------------------------------------------------------------------------------------ storage rule
def _norm(path: str) -> str:
    return os.path.normpath(path).rstrip("/") or "/"


def mount_targets(text: str) -> list[tuple[str, str]]:
    """``(mount point, how)`` for every network file system a command line mounts."""
    found = []
    for argv in _split_simple_commands(text):
        prog = os.path.basename(argv[0])
        args = argv[1:]
        if prog == "mount" or prog.startswith("mount."):
            fstype = prog.removeprefix("mount.") if prog != "mount" else ""
            positional, i = [], 0
            while i < len(args):
                a = args[i]
                if a in ("-t", "--types"):
                    fstype = args[i + 1] if i + 1 < len(args) else ""
                    i += 2
                    continue
                if a.startswith("--types="):
                    fstype = a.split("=", 1)[1]
                elif a in ("-o", "--options", "-O", "-L", "-U", "--source", "--target"):
                    i += 1
                elif not a.startswith("-"):
                    positional.append(a)
                i += 1
            if len(positional) < 2:
                continue
            source, target = positional[-2], positional[-1]
            remote_source = re.match(r"^[\w.-]+:/", source) is not None or source.startswith("//")
            if fstype.startswith(NETWORK_FS) or (not fstype and remote_source):
                found.append((_norm(target), f"{fstype or 'nfs'} mount"))
        elif prog in FUSE_MOUNTERS:
            paths = [a for a in args if a.startswith(("/", "~")) and not a.startswith("--")]
            if paths:
                found.append((_norm(paths[-1]), prog))
    return found


@dataclass
class SharedStorage:
    mounts: dict[str, str] = field(
        default_factory=dict
    )  # mount point -> how (e.g. "nfs4 mount in setup_commands[6]")
    partial: dict[str, list[str]] = field(default_factory=dict)  # mounted on some roles only -> those roles

    def covering(self, path: str) -> str | None:
        path = _norm(path)
        for mount in sorted(self.mounts, key=len, reverse=True):
            if path == mount or path.startswith(mount.rstrip("/") + "/"):
                return mount
        return None


def shared_storage(roles: dict[str, list[Command]], declared: list[str]) -> SharedStorage:
    per_role: dict[str, dict[str, str]] = {}
    for role, commands in roles.items():
        per_role[role] = {}
        for cmd in commands:
            for target, how in mount_targets(cmd.text):
                per_role[role].setdefault(target, f"{how} in {cmd.key}")
    storage = SharedStorage()
    every = set.intersection(*(set(m) for m in per_role.values())) if per_role else set()
    for target in sorted(set().union(*per_role.values())):
        if target in every:
            storage.mounts[target] = per_role["head"][target]
        else:
            storage.partial[target] = [r for r, m in per_role.items() if target in m]
    for path in declared:
        storage.mounts.setdefault(_norm(path), "declared in metadata.kdray.shared_mounts")
    return storage


def storage_problem(key: str, location: str, storage: SharedStorage) -> Problem | None:
    """``None`` when ``location`` is reachable from every node, else why not and what would be."""
    scheme = re.match(r"^([a-zA-Z][\w+.-]*)://", location)
    if scheme:
        name = scheme.group(1).lower()
        if name in OBJECT_STORE_SCHEMES:
            return None
        if name != "file":
            accepted = ", ".join(f"{s}://" for s in OBJECT_STORE_SCHEMES)
            return Problem(
                key, f"{location!r}: unsupported scheme {name}:// (accepted: {accepted}, or a path)"
            )
        location = location[len("file://") :]
    suggestion = next(iter(storage.mounts), None)
    fix = (
        f"use a folder under the shared mount {suggestion}"
        if suggestion
        else "mount NFS/EFS on every node in setup_commands (or declare metadata.kdray.shared_mounts)"
    ) + ", or an s3:// / gs:// URI"
    if location.startswith("~") or location.startswith("$HOME"):
        return Problem(key, f"{location!r} is in one node's home folder, not shared storage: {fix}")
    if not location.startswith("/"):
        return Problem(
            key, f"{location!r} is relative: it resolves in the job's temporary folder on one node: {fix}"
        )
    if storage.covering(location):
        return None
    partial = [m for m in storage.partial if location == m or location.startswith(m + "/")]
    if partial:
        roles = ", ".join(storage.partial[partial[0]])
        return Problem(
            key, f"{location!r}: {partial[0]} is mounted on {roles} only, not on every node: {fix}"
        )
    return Problem(key, f"{location!r} is local to one node (no shared mount covers it): {fix}")


# --------------------------------------------------------------------------------------------------- capacity
@dataclass
class NodeType:
    name: str
    role: str  # head | worker
    min_count: int
    max_count: int
    resources: dict[str, float] | None  # None: not declared (Ray detects it at launch)
    resources_key: str

    def slots(self, cpus: float, gpus: float) -> int:
        """How many peers (each ``cpus`` CPUs and ``gpus`` GPUs on one node) fit on one node of this type."""
        assert self.resources is not None
        counts = [math.floor(self.resources.get("CPU", 0) / cpus + 1e-9)] if cpus > 0 else []
        if gpus > 0:
            counts.append(math.floor(self.resources.get("GPU", 0) / gpus + 1e-9))
        return max(0, min(counts)) if counts else 10**6


def node_inventory(prepared: dict[str, Any], metadata: dict[str, Any]) -> list[NodeType]:
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    if prepared["provider"]["type"] == "local":
        declared = metadata.get("node_resources") or {}
        workers = len(prepared["provider"].get("worker_ips") or [])
        key = "metadata.kdray.node_resources"
        return [
            NodeType("head", "head", 1, 1, declared.get("head"), f"{key}.head"),
            NodeType(
                "worker",
                "worker",
                min(types[head].get("min_workers", 0), workers),
                min(prepared.get("max_workers", workers), workers),
                declared.get("worker"),
                f"{key}.worker",
            ),
        ]
    nodes = []
    for name, spec in types.items():
        role = "head" if name == head else "worker"
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()} or None
        lo, hi = (1, 1) if role == "head" else (spec.get("min_workers", 0), spec.get("max_workers", 0))
        nodes.append(
            NodeType(name, role, lo, hi, resources, key_path("available_node_types", name, "resources"))
        )
    return sorted(nodes, key=lambda n: n.role != "head")


def capacity_problems(
    cfg, nodes: list[NodeType], max_workers: int, provider: str = "aws"
) -> tuple[list[Problem], str]:
    """Can the Ray engine place ``cfg``'s peers on these nodes at ``max_workers``? Problems, and a one-line verdict."""
    eng = cfg.engine
    more_nodes = (
        "add machines to provider.worker_ips"
        if provider == "local"
        else "raise max_workers (and the node type's max_workers)"
    )
    k, cpus, gpus = cfg.num_peers, eng.cpus_per_peer, eng.gpus_per_peer
    unknown = [n for n in nodes if n.resources is None and n.max_count > 0]
    if unknown:
        return [
            Problem(
                n.resources_key,
                "not declared: Ray detects a node's CPUs/GPUs only when it starts, so kdray cannot count offline; "
                "declare them, e.g. {CPU: 8, GPU: 1}",
            )
            for n in unknown
        ], "capacity: unknown"
    bundle = f"{{CPU: {cpus:g}, GPU: {gpus:g}}}"
    # The global max_workers caps the workers of all types together: count the roomiest types first.
    budget = max_workers
    fitting_nodes, slots, total_gpus = 0, 0, 0.0
    for n in sorted(nodes, key=lambda n: (n.role != "head", -n.slots(cpus, gpus))):
        count = 1 if n.role == "head" else min(n.max_count, budget)
        if n.role != "head":
            budget -= count
        per = n.slots(cpus, gpus)
        fitting_nodes += count if per > 0 else 0
        slots += count * per
        total_gpus += count * n.resources.get("GPU", 0)
    problems = []
    per_node = ", ".join(
        f"{n.name} x{1 if n.role == 'head' else n.max_count} ({n.slots(cpus, gpus)} each)"
        for n in nodes
        if n.max_count
    )
    if gpus * k > total_gpus:
        problems.append(
            Problem(
                "engine.gpus_per_peer",
                f"{k} peers x {gpus:g} GPU = {gpus * k:g} GPUs, but the cluster has {total_gpus:g} at max_workers: "
                f"{more_nodes}, use GPU nodes, or lower engine.gpus_per_peer",
            )
        )
    if eng.placement == "strict_spread":
        verdict = (
            f"strict_spread: {k} peers need {k} nodes that each fit {bundle}; the cluster has {fitting_nodes}"
        )
        if fitting_nodes < k:
            problems.append(
                Problem(
                    "engine.placement",
                    f"strict_spread puts each of the {k} peers on its own node, but at max_workers={max_workers} only "
                    f"{fitting_nodes} node(s) fit a peer {bundle} ({per_node}): {more_nodes} or use engine.placement=pack",
                )
            )
    else:
        verdict = f"{eng.placement}: {k} peers of {bundle}; the cluster has room for {slots}"
        if slots < k:
            problems.append(
                Problem(
                    "engine.placement",
                    f"{k} peers of {bundle} do not fit: at max_workers={max_workers} there is room for {slots} "
                    f"({per_node}): {more_nodes} or lower engine.cpus_per_peer / engine.gpus_per_peer",
                )
            )
    return problems, verdict


# ------------------------------------------------------------------------------------------------------ report
@dataclass
class ClusterReport:
    source: str
    provider: str
    nodes: list[NodeType]
    max_workers: int
    storage: SharedStorage
    experiment: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [
            f"{self.source}: accepted by `ray up` (Ray {RAY_VERSION} schema and {self.provider} defaults)"
        ]
        rows = [("node type", "role", "nodes", "CPU", "GPU")]
        for n in self.nodes:
            count = "1" if n.role == "head" else f"{n.min_count}..{n.max_count}"
            res = n.resources or {}
            rows.append(
                (
                    n.name,
                    n.role,
                    count,
                    f"{res['CPU']:g}" if "CPU" in res else "?",
                    f"{res.get('GPU', 0):g}" if n.resources else "?",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"  max_workers: {self.max_workers}")
        shared = "; ".join(f"{m} ({how})" for m, how in self.storage.mounts.items()) or "none"
        lines.append(f"shared storage: {shared}")
        lines.append(f"ray: {RAY_VERSION} pinned on every node")
        lines += self.experiment
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(
            "not checked offline: provider/node_config fields, that the AMI, key, subnet, file system and IPs exist, "
            "quotas, SSH, that the mounts succeed"
        )
        return "\n".join(lines)


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


def check_cluster(
    file: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
) -> ClusterReport:
    """Check a cluster-launcher file (and an experiment on it); raise :class:`ClusterCheckError` naming each problem."""
    path = Path(file)
    if not path.is_file():
        raise KdrayError(f"cluster file '{path}': no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise KdrayError(f"cluster file '{path}': not valid YAML: {str(exc).splitlines()[0]}") from None
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
            "no shared mount on every node: multi-node runs need engine.storage_path on shared storage "
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
        f"placement {eng.placement}, per peer {{CPU: {eng.cpus_per_peer:g}, GPU: {eng.gpus_per_peer:g}}}"
    )
    if eng.name != "ray":
        report.warnings.append(
            "engine.name=local: the whole population runs in the job's driver on the head node; "
            "--set engine.name=ray spreads the peers over the cluster"
        )
        return []
    problems, verdict = capacity_problems(cfg, report.nodes, report.max_workers, report.provider)
    report.experiment.append(f"  {verdict}")
    if not problems and report.provider != "local" and eng.placement_timeout_s < 900:
        # The nodes up from the start (min_workers) may not hold the population: the autoscaler then launches more,
        # which takes minutes (boot + setup_commands), longer than the engine waits for its placement by default.
        at_start = [replace(n, max_count=n.min_count) for n in report.nodes]
        short, _ = capacity_problems(cfg, at_start, sum(n.min_count for n in at_start if n.role != "head"))
        if short:
            report.warnings.append(
                f"the nodes up at start (min_workers) cannot hold the population, and new nodes take minutes to boot "
                f"and set up: engine.placement_timeout_s={eng.placement_timeout_s:g} s will likely expire first; "
                "--set engine.placement_timeout_s=1200, or raise the node type's min_workers"
            )
    if multi_node:
        if eng.storage_path is None:
            mount = next(iter(report.storage.mounts), None)
            problems.append(
                Problem(
                    "engine.storage_path",
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
            p = storage_problem("engine.storage_path", eng.storage_path, report.storage)
            if p:
                problems.append(p)
            else:
                report.experiment.append(
                    f"  engine.storage_path {eng.storage_path}: reachable from every node"
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
