"""One run of a comparison, in its own process: ``python -m kdray.compare.worker JOB.json``.

The job (written by :mod:`kdray.compare.runner`) says what to train: ``{"config": raw config, "out": run folder,
"resume": bool, "parent_run_id": MLflow parent or null, "threads": torch threads}``. A fresh run is
``kdray.train(config, out=out)``; an interrupted one continues as ``kdray train --resume out`` does. On success the
run's summary is written to ``<out>/compare_summary.json`` (the mark of a finished run). Exit codes: 0 done, 130
stopped at a safe point (Ctrl-C, SIGTERM: resumable), 2 a kdray error (its line on stderr), 1 anything else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SUMMARY = "compare_summary.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    import torch

    torch.set_num_threads(int(job["threads"]))
    from kdray.api import train
    from kdray.checkpoint import write_atomic
    from kdray.errors import KdrayError

    out = Path(job["out"])
    try:
        if job["resume"]:
            result = train(None, resume=out, parent_run_id=job.get("parent_run_id"))
        else:
            result = train(job["config"], out=out, parent_run_id=job.get("parent_run_id"))
    except KdrayError as exc:
        print(f"kdray: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdray: interrupted", file=sys.stderr, flush=True)
        return 130
    write_atomic(out / SUMMARY, json.dumps(result.summary, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
