"""Shared storage: which folders every node of the cluster sees the same, and whether a location
(``engine.storage_path``, a tracking store) is one of them.

A folder is shared when every node mounts a network file system there in the commands it runs (``mount -t
nfs|nfs4|efs|lustre|cifs|glusterfs|ceph|fuse.*``, ``mount SERVER:/export DIR``, ``s3fs``, ``gcsfuse``, ``mount-s3``,
``goofys``), or when ``metadata.kdray.shared_mounts`` declares it (mounted by the image or /etc/fstab). A mount made
only in ``head_setup_commands`` is local to the head.

A location is reachable from every node when it is an object-store URI (``s3://``, ``gs://``, ...) or a path under a
shared mount. A relative path, or a path outside every shared mount (``/tmp/...``, ``~/...``, the default
``<out>/ray_storage``) is local to one node.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from kdray.cluster.commands import Command, _split_simple_commands
from kdray.cluster.problems import Problem

# Network file systems whose mount point every node sees the same. Local ones (ext4, xfs, tmpfs, overlay) are not.
NETWORK_FS = ("nfs", "nfs4", "efs", "lustre", "cifs", "smb3", "glusterfs", "ceph", "beegfs", "gpfs", "fuse.")
FUSE_MOUNTERS = ("s3fs", "gcsfuse", "mount-s3", "goofys", "blobfuse2", "rclone", "juicefs")
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs")


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
