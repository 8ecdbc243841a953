"""The shell commands each node runs, read offline, and kdray's rules on them.

A small lexer splits a cluster file's command lines (``initialization_commands``, ``setup_commands``, the head's and
workers' own lists, Ray's defaults for the provider) into simple commands, per node role (``head`` and
``worker:<type>``). On them:

- the commands every node runs pin ``ray==RAY_VERSION`` (the version of the machine running ``ray up`` and
  ``kdray submit``), and no command installs another Ray; a docker image's tag must name that version too;
- no command binds a service (dashboard, MLflow) to 0.0.0.0: reach them through SSH tunnels.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from typing import Any

from kdray.cluster.problems import Problem, key_path
from kdray.cluster.ray_schema import RAY_VERSION


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
