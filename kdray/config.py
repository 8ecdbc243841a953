"""One typed, validated experiment config.

A config is plain data (YAML): every loss weight, temperature and learning rate is a key, so a Tune space is a list
of keys and ranges. It is validated at load into the objects below; anything kdray cannot honour is refused with a
:class:`~kdray.errors.ConfigError` naming the key, the value and what would be accepted.

Method-specific keys live in each method's own ``Config`` class (``kdray/methods/<name>.py``); this module dispatches
``method.name`` to it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdray.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------------- data
class SyntheticConfig(Section):
    num_classes: int = Field(10, ge=2)
    channels: int = Field(3, ge=1)
    image_size: int = Field(32, ge=4)
    train_len: int = Field(1024, ge=1)
    val_len: int = Field(256, ge=1)


class DataConfig(Section):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "fashion_mnist"
    root: str = "data"
    batch_size: int = Field(128, ge=1)
    val_batch_size: int = Field(512, ge=1)
    train_size: int | None = Field(
        None, ge=1, description="use only the first N training samples (a fixed subset)"
    )
    val_size: int | None = Field(None, ge=1, description="use only the first N validation samples")
    augment: bool = True
    download: bool = True
    num_workers: int = Field(
        0, ge=0, description="loader processes for ImageFolder; in-memory sets ignore it"
    )
    image_size: int | None = Field(None, ge=8, description="ImageFolder: resize to this size")
    synthetic: SyntheticConfig = SyntheticConfig()


# -------------------------------------------------------------------------------------------------------- peers
class PeerConfig(Section):
    arch: str
    name: str | None = None
    arch_kwargs: dict[str, Any] = {}
    checkpoint: str | None = Field(None, description="load this peer's weights from a kdray checkpoint")
    checkpoint_peer: str | int | None = Field(
        None, description="which peer of that checkpoint (name or index)"
    )
    frozen: bool = Field(False, description="never updated (e.g. a KD teacher); evaluated, never trained")
    lr: float | None = Field(None, gt=0, description="this peer's learning rate (default train.optimizer.lr)")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from kdray.models import check_arch

        check_arch(arch)
        return arch


# -------------------------------------------------------------------------------------------------------- train
class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Section):
    name: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="cut each epoch short (quick runs, tests)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(False, description="mixed precision (bf16 autocast) on CUDA; ignored on CPU")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's own choice)")
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and always after the last)")
    progress: bool = True


# ------------------------------------------------------------------------------------------------------- engine
class EngineConfig(Section):
    name: Literal["local", "ray"] = "local"
    exchange: Literal["collective", "actor", "stale"] = "collective"
    address: str | None = Field(
        None,
        description="Ray address to attach to (HOST:PORT or auto); null: RAY_ADDRESS if set, else a local Ray",
    )
    placement: Literal["pack", "spread", "strict_spread"] = "pack"
    cpus_per_peer: float = Field(1.0, gt=0)
    gpus_per_peer: float = Field(0.0, ge=0)
    storage_path: str | None = Field(None, description="Ray Train storage; default <out>/ray_storage")
    max_failures: int = Field(0, ge=-1)
    placement_timeout_s: float = Field(60.0, gt=0)
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Ray: also checkpoint mid-epoch")
    stale_every: int = Field(50, ge=1, description="stale exchange: ship weights every N steps")
    stale_burn_in: int = Field(0, ge=0, description="stale exchange: steps before distillation starts")
    object_store_mb: int = Field(300, ge=75, description="object store of a local Ray started by kdray")
    split_wait: bool = Field(
        False,
        description="collective exchange: a timed barrier before each round splits waiting for the slowest "
        "peer (exchange/wait_ms_per_step) from moving bytes (diagnostic; one more small collective per round)",
    )
    inject_failure_at_step: int | None = Field(
        None,
        ge=1,
        description="test hook: worker 1 kills its own process (SIGKILL, as a lost node would) once, after this "
        "global step (fault-tolerance tests)",
    )


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = Field(None, description="null: embedded SQLite store beside the run folder")
    experiment: str = "kdray"
    log_checkpoint: bool = True


# ------------------------------------------------------------------------------------------------------- method
class MethodConfig(Section):
    """Keys common to every method. Each method subclasses this with its own keys and defaults."""

    name: str
    temperature: float = Field(1.0, gt=0)
    weights: dict[str, float] = {}

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        for term, w in weights.items():
            if w < 0:
                raise ValueError(f"weight of term '{term}' must be >= 0, got {w}")
        return weights

    @model_validator(mode="after")
    def _fill_default_weights(self) -> MethodConfig:
        # A config that sets one weight keeps the method's defaults for the others.
        defaults = type(self).model_fields["weights"].get_default(call_default_factory=True) or {}
        self.__dict__["weights"] = {**defaults, **self.weights}
        return self


class ExperimentConfig(Section):
    name: str = "kdray"
    seed: int = 0
    data: DataConfig = DataConfig()
    peers: list[PeerConfig] = Field(min_length=1)
    method: MethodConfig
    train: TrainConfig = TrainConfig()
    engine: EngineConfig = EngineConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _dispatch_method(cls, raw: Any) -> MethodConfig:
        from kdray.methods import method_class

        if isinstance(raw, MethodConfig):
            return raw
        if not isinstance(raw, dict) or "name" not in raw:
            raise ValueError("needs a mapping with a 'name' key")
        return method_class(raw["name"]).Config.model_validate(raw)

    @model_validator(mode="after")
    def _population_fits_method(self) -> ExperimentConfig:
        from kdray.methods import method_class

        names = [p.name or f"peer{i}" for i, p in enumerate(self.peers)]
        if len(set(names)) != len(names):
            raise ValueError(f"peer names must be unique, got {names}")
        for i, p in enumerate(self.peers):
            p.name = names[i]
        method_class(self.method.name).check_population(self)
        return self

    # ---- conveniences
    @property
    def num_peers(self) -> int:
        return len(self.peers)

    def to_dict(self) -> dict[str, Any]:
        # serialize_as_any: `method` is declared as MethodConfig; without it pydantic drops the method's own keys
        # (AFD's adv_optimizer, disc_every, ...) from config.yaml, checkpoints and MLflow params.
        return self.model_dump(mode="json", serialize_as_any=True)

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``{"a.b.c": value}`` (MLflow params, Tune spaces)."""
        return flatten(self.to_dict())


# ------------------------------------------------------------------------------------------------ load / errors
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a nested dict/list, creating mappings on the way (validation rejects unknown keys later)."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(dotted, value, f"'{part}' is not an index of a list of {len(node)} items")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(dotted, value, f"'{'.'.join(parts[:i])}' is a value, not a section")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError("--set", item, "expected KEY=VALUE, e.g. --set train.epochs=2")
        key, _, text = item.partition("=")
        set_key(raw, key.strip(), _parse_value(text.strip()))
    return raw


def _describe(err: dict[str, Any]) -> ConfigError:
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "<config>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see the docs for the accepted keys)"
    value = err.get("input")
    if isinstance(value, dict) and err["type"] != "extra_forbidden":
        value = "{...}"
    return ConfigError(key, value, msg)


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping; the first problem is raised as a ConfigError (the others are counted)."""
    if not isinstance(raw, dict):
        raise ConfigError("<config>", type(raw).__name__, "the file must hold a YAML mapping")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        if len(errors) > 1:
            first.args = (f"{first.args[0]} (and {len(errors) - 1} more problem(s))",)
        raise first from None


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML file (or a mapping), apply ``KEY=VALUE`` overrides and validate."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError("config", str(path), "no such file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError("config", str(path), f"not valid YAML: {exc}".splitlines()[0]) from None
        if raw is None:
            raw = {}
    return validate(apply_overrides(raw, overrides))
