"""What ``ray up`` does first, offline, with Ray's own code: ``prepare_config`` (fill the provider's defaults, merge
setup commands, the local provider's node type) and ``validate_config`` (Ray's JSON schema: unknown or mistyped keys
at the top level and in node types, ``head_node_type`` one of ``available_node_types``, the sum of ``min_workers`` at
most ``max_workers``); Ray's refusals become problems named by key path.

Neither contacts a cloud: ``ray up`` does that in two steps kdray skips, the detection of each instance type's
CPUs/GPUs (``fillout_available_node_types_resources``, the EC2 API) and the provider's ``bootstrap_config`` (IAM, key
pair, subnets). That Ray API is private, so it is used only on the Ray releases it was tested on (:data:`TESTED_RAY`).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import logging
import re
from pathlib import Path
from typing import Any

from kdray.cluster.problems import ClusterCheckError, Problem, key_path
from kdray.errors import KdrayError


def _installed_ray() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:  # pragma: no cover - ray is a dependency
        return "unknown"


# The Ray every node of the cluster must run: the one installed here, where `ray up` and the driver run (Ray refuses
# a cluster of mixed versions). The private autoscaler API below is used only on the releases it was tested on: the
# two ends of pyproject.toml's Ray range.
RAY_VERSION = _installed_ray()
TESTED_RAY = ("2.55.", "2.60.")


def _ray_private_api():
    """Ray's own config preparation and validation (private: guarded by the releases it was tested on)."""
    import ray

    if not ray.__version__.startswith(TESTED_RAY):
        tested = ", ".join(f"{p}x" for p in TESTED_RAY)
        raise KdrayError(
            f"kdray cluster check validates with Ray's private autoscaler API, tested on ray {tested}, but this "
            f"environment has ray=={ray.__version__}; install one of those: pip install 'ray[default]==2.60.0'"
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
