"""What ``kdray cluster check`` prints for a file it accepts: the node types, the shared storage, the Ray pin, the
experiment's verdicts and the warnings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdray.cluster.capacity import NodeType
from kdray.cluster.ray_schema import RAY_VERSION
from kdray.cluster.storage import SharedStorage


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
