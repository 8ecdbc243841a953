"""The shared types of ``kdray cluster check``: a :class:`Problem` names one fault by its key path in the cluster
file (or the experiment), and :class:`ClusterCheckError` gathers every problem found in one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kdray.errors import KdrayError


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
