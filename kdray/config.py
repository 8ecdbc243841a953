"""One typed, validated experiment config.

A config is plain data (YAML): every loss weight, temperature and learning rate is a key, so a Tune space is a list
of keys and ranges. It is validated at load into the objects below; anything kdray cannot honour is refused with a
:class:`~kdray.errors.ConfigError` naming the key, the value and what would be accepted.

Method-specific keys live in each method's own ``Config`` class (``kdray/methods/<name>.py``); this module dispatches
``method.name`` to it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdray.errors import ConfigError
from kdray.registry import ENGINES, EXCHANGES, METHODS
from kdray.safe_yaml import load_yaml


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------------- data
# The synthetic set is generated whole, in memory, before the first step: at most this many float32 values (16 GiB).
MAX_SYNTHETIC_VALUES = 2**32


class SyntheticConfig(Section):
    num_classes: int = Field(10, ge=2, le=1_000_000)
    channels: int = Field(3, ge=1, le=1024)
    image_size: int = Field(32, ge=4, le=4096)
    train_len: int = Field(1024, ge=1)
    test_len: int = Field(256, ge=1, description="size of the synthetic set's test split")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SyntheticConfig:
        per_image = self.channels * self.image_size**2
        values = (self.train_len + self.test_len + self.num_classes) * per_image  # images and class templates
        if values > MAX_SYNTHETIC_VALUES:
            raise ValueError(
                f"{self.train_len} + {self.test_len} images and {self.num_classes} class templates of "
                f"{self.channels}x{self.image_size}x{self.image_size} are {values:.3g} values, more than "
                f"{MAX_SYNTHETIC_VALUES:.3g} (16 GiB of float32, generated in memory before the first step)"
            )
        return self


class LabelNoiseConfig(Section):
    """Corrupt a share of the training labels (seeded by the run seed): the regime where regularising methods matter.

    ``symmetric``: a corrupted label is drawn uniformly from the *other* classes; ``pair``: class c becomes c + 1
    (mod C), the pair-flip noise of Han et al. (Co-teaching, NeurIPS 2018). The corrupted indices are written to the
    run folder (``label_noise.json``). The carved validation split is noisy too, as it would be in practice, unless
    ``data.clean_val`` keeps its true labels."""

    kind: Literal["symmetric", "pair"] = "symmetric"
    rate: float = Field(0.2, ge=0, lt=1)


# The datasets kdray holds in memory (kdray/data/modules.py InMemoryData): batches are tensor slices, no loader.
IN_MEMORY_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "synthetic")


class DataConfig(Section):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "fashion_mnist"
    root: str = "data"
    batch_size: int = Field(128, ge=1)
    val_batch_size: int = Field(512, ge=1)
    train_size: int | None = Field(
        None, ge=1, description="use only the first N training samples (a fixed subset, before val_split)"
    )
    val_split: float | int | None = Field(
        0.1,
        ge=0,
        description="validation split carved from the training set (a fraction < 1 or a count; seeded, disjoint "
        "from what is trained on): per-epoch evaluation, best.pt and kdray tune select on it. 0/null: none "
        "(then select_on must say test)",
    )
    select_on: Literal["val", "test", "last"] = Field(
        "val",
        description="how best.pt is chosen: 'val' the epoch of the best mean validation accuracy; 'last' no "
        "selection, best.pt is the last epoch (the validation split, if any, is still evaluated every epoch for the "
        "curves); 'test' selects on the test split, only when said explicitly (the summary then says so). "
        "docs/compare.md says when each is right",
    )
    clean_val: bool = Field(
        False,
        description="with label_noise: the carved validation split keeps its true labels (a clean validation set, "
        "as much of the noisy-label literature assumes); false (default): it is as noisy as the training labels, as "
        "it would be in practice",
    )
    test_size: int | None = Field(None, ge=1, description="use only the first N test samples")
    label_noise: LabelNoiseConfig | None = None
    augment: bool = True
    download: bool = True
    num_workers: int = Field(
        0, ge=0, description="loader processes for ImageFolder (the in-memory sets refuse anything but 0)"
    )
    image_size: int | None = Field(None, ge=8, description="ImageFolder: resize to this size")
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("val_split")
    @classmethod
    def _fraction_or_count(cls, v: float | int | None) -> float | int | None:
        if isinstance(v, float) and not v.is_integer() and not 0 <= v < 1:
            raise ValueError(f"a fraction in [0, 1) or a whole count of samples, got {v}")
        if isinstance(v, float) and v >= 1:
            return int(v)
        return v

    @model_validator(mode="after")
    def _workers_only_where_files_are_decoded(self) -> DataConfig:
        if self.num_workers and self.dataset in IN_MEMORY_DATASETS:
            raise ConfigError(
                "data.num_workers", self.num_workers,
                f"the {self.dataset} dataset is held in memory and batched by slicing: no loader process would "
                "run; only data.dataset: imagefolder decodes files with workers. Set data.num_workers: 0",
            )  # fmt: skip
        return self

    @model_validator(mode="after")
    def _selection_is_honest(self) -> DataConfig:
        if not self.val_split and self.select_on == "val":
            raise ValueError(
                "data.val_split is 0/null, so there is no validation split to select on; carve one "
                "(data.val_split: 0.1) or say data.select_on: test to select on the test split knowingly"
            )
        return self

    @property
    def eval_split(self) -> str | None:
        """The split evaluated every epoch: the test split when selecting on it, else the validation split (None
        when there is none: ``select_on: last`` without ``val_split``)."""
        if self.select_on == "test":
            return "test"
        return "val" if self.val_split else None


# -------------------------------------------------------------------------------------------------------- peers
class PeerConfig(Section):
    arch: str
    name: str | None = None
    workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="data-parallel Ray Train workers of this peer (engine.name: ray): each takes 1/workers of "
        "every global batch (data.batch_size), gradients averaged over the peer's group; null: "
        "engine.placement.workers_per_peer",
    )
    sync_bn: bool | None = Field(
        None,
        description="with workers > 1: BatchNorm statistics over the whole global batch, summed over the peer's "
        "workers (the maths of one worker); false: each worker normalises its shard alone; null: "
        "engine.placement.sync_bn",
    )
    arch_kwargs: dict[str, Any] = {}
    checkpoint: str | None = Field(None, description="load this peer's weights from a kdray checkpoint")
    checkpoint_peer: str | int | None = Field(
        None, description="which peer of that checkpoint (name or index)"
    )
    from_stage: str | None = Field(
        None,
        description="load this peer's weights from an earlier stage of the same run (its final weights; "
        "checkpoint_peer says which peer of it)",
    )
    from_stage_checkpoint: Literal["last", "best"] = Field(
        "last",
        description="with from_stage: that stage's final weights (last.pt) or its selected epoch's (best.pt: the "
        "best score on that stage's data.select_on split)",
    )
    frozen: bool = Field(False, description="never updated (e.g. a KD teacher); evaluated, never trained")
    lr: float | None = Field(None, gt=0, description="this peer's learning rate (default train.optimizer.lr)")
    init_seed: int | None = Field(
        None,
        description="seeds this peer's initial weights together with the run seed (default: the run seed and the "
        "peer's index alone); born-again generations give each generation's peers their own",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from kdray.models import check_arch

        check_arch(arch)
        return arch

    @model_validator(mode="after")
    def _one_source(self) -> PeerConfig:
        if self.checkpoint and self.from_stage:
            raise ValueError("give either checkpoint or from_stage, not both")
        if self.from_stage_checkpoint != "last" and not self.from_stage:
            raise ValueError(
                f"from_stage_checkpoint: {self.from_stage_checkpoint} applies with from_stage only (with "
                "checkpoint:, name the file, e.g. <run>/checkpoints/best.pt)"
            )
        return self


# -------------------------------------------------------------------------------------------------------- train
class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class AuxOptimizerConfig(OptimizerConfig):
    """An auxiliary optimizer of a method (adversarial, discriminator, generator): its own settings, and whether its
    learning rate follows the network's schedule (``follow``: the same warm-up and decay factor at every step) or
    stays constant."""

    schedule: Literal["follow", "constant"] = "constant"


class ScheduleConfig(Section):
    """The learning-rate schedule, applied at every step with ``torch.optim.lr_scheduler``: a linear warm-up
    from ``warmup_start_factor`` x lr over ``warmup_epochs`` epochs or ``warmup_steps`` steps, then ``cosine`` (to
    ``min_lr_factor`` x lr at the last step), ``multistep`` (x ``gamma`` at each of ``milestones``, in epochs) or
    ``constant``."""

    name: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0, ge=0, description="linear warm-up length in epochs (may be fractional)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up length in steps (added to warmup_epochs)")
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    min_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine: the last step's lr as a share of lr")


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, le=1_000_000)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        le=10**9,
        description="steps per epoch: null = one pass over the training set; a number cuts the pass short; "
        "required for methods without training data (their inputs come from a generator)",
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="also checkpoint inside epochs (resume and worker restarts continue from there)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="parameter and input precision (float64: bit-level reproducibility studies)"
    )
    amp: bool = Field(
        False, description="mixed precision (bf16 autocast) on CUDA; refused where the peers run on a CPU"
    )
    threads: int | None = Field(
        None, ge=1, le=4096, description="torch CPU threads (default: torch's own choice)"
    )
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and always after the last)")
    log_every_steps: int = Field(
        50, ge=1, description="log the running step metrics to MLflow every N steps (curves inside epochs)"
    )
    progress: bool = True
    verbose: bool = Field(
        False,
        description="show Ray's and MLflow's own INFO logs (kdray's progress and epoch lines are always shown)",
    )

    @model_validator(mode="after")
    def _amp_needs_cuda(self) -> TrainConfig:
        if self.amp and self.device == "cpu":
            raise ConfigError("train.amp", True, AMP_ON_CPU.format(why="train.device is cpu"))
        return self


AMP_ON_CPU = (
    "mixed precision (bf16 autocast) runs on CUDA only, and {why}: it would be ignored. Set train.amp: false, or "
    "run on a GPU (train.device: cuda or auto)"
)


# ------------------------------------------------------------------------------------------------------- engine
class SessionConfig(Section):
    """Where a RayEngine run finds Ray, and where Ray Train keeps its checkpoints."""

    address: str | None = Field(
        None,
        description="Ray address to attach to (HOST:PORT or auto); null: RAY_ADDRESS if set, else a local Ray",
    )
    object_store_mb: int = Field(300, ge=75, description="object store of a local Ray started by kdray")
    dashboard: bool = Field(
        False,
        description="start Ray's dashboard with a local Ray started by kdray (on 127.0.0.1; its address is printed); "
        "off by default: one process fewer and ~1 s sooner to the first step",
    )
    storage_path: str | None = Field(None, description="Ray Train storage; default <out>/ray_storage")
    checkpoint_writes: Literal["auto", "per_process", "gather"] = Field(
        "auto",
        description="how the population's checkpoint (<out>/checkpoints/last.pt) is written: per_process - every "
        "worker writes its own part into the run folder and rank 0 a small manifest (needs the run folder shared "
        "by every node; refused at start naming the nodes that cannot see it); gather - rank 0 gathers every peer's "
        "state and writes one file; auto - per_process when every worker sees the run folder and nothing reads the "
        "checkpoints in the driver during the run (a kdray tune trial does), else gather",
    )


class PlacementConfig(Section):
    """What each peer's Ray Train worker asks for, and how the workers are spread over the nodes."""

    strategy: Literal["pack", "spread", "strict_spread"] = "pack"
    group_by: Literal["none", "peer", "shard"] = Field(
        "none",
        description="which workers share a node (K peers x M workers, kdray.engines.placement): peer - each peer's "
        "M workers on one node (its gradient all-reduce stays local, only the exchange's per-step signals cross "
        "nodes), different peers on different nodes where the cluster allows; shard - shard m of every peer on one "
        "node (the exchange stays local, the all-reduces cross); none - where Ray's strategy puts them. peer and "
        "shard pin every worker to a node planned from the nodes' free resources at start, with strategy: pack",
    )
    cpus_per_peer: float = Field(1.0, gt=0)
    gpus_per_peer: float = Field(0.0, ge=0)
    timeout_s: float = Field(60.0, gt=0, description="give up (with a clear error) if not placed by then")
    workers_per_peer: int = Field(
        1,
        ge=1,
        le=1024,
        description="data-parallel workers of every peer without its own peers[i].workers (K peers x M workers)",
    )
    sync_bn: bool = Field(
        True,
        description="a data-parallel peer's BatchNorm statistics come from the whole global batch (summed over "
        "its workers), so a run's maths does not change with its number of workers; false saves two small "
        "all-reduces per BatchNorm layer per forward and normalises each worker's shard alone",
    )
    balance: Literal["none", "threads"] = Field(
        "none",
        description="threads: share the workers' CPUs out as torch threads in proportion to each peer's forward "
        "FLOPs, each share rounded to the nearest thread, at least one (a large peer gets more, so a small one "
        "waits less; a small peer's one thread sleeps while it waits); train.threads then must be null",
    )


def exchange_section(raw: Any) -> Section:
    """``engine.exchange`` holds the registered exchange's own section (the ``Config`` of
    ``kdray/exchange/<name>.py``). ``engine.exchange`` (a name, or a mapping with a ``name``; default ``collective``) -> the exchange's own
    section; a key another exchange owns is refused naming its owner."""
    if isinstance(raw, Section):
        return raw
    if isinstance(raw, str):  # engine.exchange=actor
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ValueError("needs an exchange name or a mapping with a 'name' key")
    raw = {"name": "collective", **raw}
    known = EXCHANGES.lookup(raw["name"]).Config
    extra = sorted(set(raw) - set(known.model_fields))
    if extra:
        owner = [n for n, c in EXCHANGES.items() if extra[0] in c.Config.model_fields]
        raise ConfigError(
            f"engine.exchange.{extra[0]}",
            raw[extra[0]],
            f"the {raw['name']} exchange cannot honour it (its keys: {sorted(known.model_fields)})"
            + (f"; it belongs to engine.exchange.name: {owner[0]}" if owner else ""),
        )
    return known.model_validate(raw)


class FaultToleranceConfig(Section):
    max_failures: int = Field(
        0, ge=-1, description="restarts of the worker group after a worker dies (-1: unlimited)"
    )


# Keys of earlier kdray versions and what replaced each: refused with the new name, never silently ignored.
MOVED_KEYS = {
    "engine.address": "engine.session.address",
    "engine.object_store_mb": "engine.session.object_store_mb",
    "engine.storage_path": "engine.session.storage_path",
    "engine.cpus_per_peer": "engine.placement.cpus_per_peer",
    "engine.gpus_per_peer": "engine.placement.gpus_per_peer",
    "engine.placement_timeout_s": "engine.placement.timeout_s",
    "engine.split_wait": "engine.exchange.split_wait (with engine.exchange.name: collective)",
    "engine.stale_every": "engine.exchange.every (with engine.exchange.name: stale)",
    "engine.stale_burn_in": "engine.exchange.burn_in (with engine.exchange.name: stale)",
    "engine.max_failures": "engine.fault_tolerance.max_failures",
    "engine.checkpoint_every_steps": "train.checkpoint_every_steps",
    "engine.inject_failure_at_step": "nothing: failure injection is not a config key (tests kill workers from outside)",
    "train.max_steps_per_epoch": "train.steps_per_epoch",
    "data.val_size": "data.test_size (the validation split is now carved from the training set: data.val_split)",
    "data.synthetic.val_len": "data.synthetic.test_len",
}
ENGINE_SECTIONS = ("session", "placement", "exchange", "fault_tolerance")


class EngineConfig(Section):
    """``engine.name`` picks a registered engine (``kdray/engines/<name>_engine.py``): ``local``, every peer in
    this process, or ``ray``, one peer per Ray Train worker. The sections ``session``, ``placement``, ``exchange``
    and ``fault_tolerance`` are refused by an engine that does not list them in its ``sections`` (the local engine
    lists none: it could not honour them)."""

    name: str = "local"
    session: SessionConfig = SessionConfig()
    placement: PlacementConfig = PlacementConfig()
    exchange: Section = Field(default_factory=lambda: exchange_section("collective"))
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        ENGINES.lookup(name)
        return name

    @field_validator("exchange", mode="before")
    @classmethod
    def _dispatch_exchange(cls, raw: Any) -> Section:
        return exchange_section(raw)

    @model_validator(mode="before")
    @classmethod
    def _shorthands_and_moved_keys(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if isinstance(raw.get("placement"), str):  # engine.placement=spread
            raw["placement"] = {"strategy": raw["placement"]}
        return raw

    @model_validator(mode="after")
    def _sections_the_engine_honours(self) -> EngineConfig:
        engine = ENGINES.lookup(self.name)
        for section in ENGINE_SECTIONS:
            if section in engine.sections or section not in self.model_fields_set:
                continue
            default = type(self).model_fields[section].get_default(call_default_factory=True)
            given = getattr(self, section).model_dump(mode="json")
            if given != default.model_dump(mode="json"):
                key = next((k for k, v in given.items() if v != default.model_dump(mode="json").get(k)), None)
                owners = [n for n, e in ENGINES.items() if section in e.sections]
                raise ConfigError(
                    f"engine.{section}" + (f".{key}" if key else ""),
                    given.get(key) if key else given,
                    f"applies only to engine.name: {' or '.join(owners)} (the {self.name} engine cannot honour "
                    f"engine.{section}: {engine.summary}); remove it or change engine.name",
                )
        return self


class RegisterConfig(Section):
    """``tracking.register``: which logged peer goes into the Model Registry, under which name."""

    name: str = Field(min_length=1, description="the registered model's name (a new version if it exists)")
    peer: str | None = Field(
        None, description="the peer to register; null: the smallest trainable peer by parameter count"
    )


# pydantic warns that the field "register" shadows ABCMeta.register (a classmethod no config calls)
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingConfig"', category=UserWarning)


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = Field(None, description="null: embedded SQLite store beside the run folder")
    experiment: str = "kdray"
    log_checkpoint: bool = True
    log_models: bool = Field(
        True,
        description="at the end of a run, log each trainable peer of the selected checkpoint as an MLflow "
        "PyTorch model (signature, input example)",
    )
    register: RegisterConfig | None = Field(
        None,
        description="register one logged peer in the Model Registry: a name (the smallest trainable peer) or "
        "{name, peer}",
    )

    @field_validator("register", mode="before")
    @classmethod
    def _register_by_name(cls, raw: Any) -> Any:
        return {"name": raw} if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _register_needs_models(self) -> TrackingConfig:
        if self.register is not None and not self.log_models:
            raise ConfigError(
                "tracking.register", self.register.name,
                "registers a logged model: set tracking.log_models: true, or tracking.register: null",
            )  # fmt: skip
        return self


# ------------------------------------------------------------------------------------------------------- method
class MethodConfig(Section):
    """Keys common to every method. Each method subclasses this with its own keys and defaults."""

    name: str
    temperature: float = Field(1.0, gt=0)
    weights: dict[str, float] = {}

    @model_validator(mode="before")
    @classmethod
    def _partial_sections_keep_defaults(cls, raw: Any) -> Any:
        # ``adv_optimizer: {lr: 0.02}`` changes the learning rate of the method's default adversarial optimizer; it
        # must not reset that optimizer's other settings to OptimizerConfig's class defaults.
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for key, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel) and isinstance(raw.get(key), dict):
                raw[key] = {**default.model_dump(), **raw[key]}
        return raw

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
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _dispatch_method(cls, raw: Any) -> MethodConfig:
        if isinstance(raw, MethodConfig):
            return raw
        if not isinstance(raw, dict) or "name" not in raw:
            raise ValueError("needs a mapping with a 'name' key")
        return METHODS.lookup(raw["name"]).Config.model_validate(raw)

    @model_validator(mode="after")
    def _threads_or_balance(self) -> ExperimentConfig:
        if self.engine.placement.balance == "threads" and self.train.threads is not None:
            raise ConfigError(
                "train.threads", self.train.threads,
                "engine.placement.balance: threads sets each worker's threads from its peer's cost; set "
                "train.threads: null, or balance: none",
            )  # fmt: skip
        return self

    @model_validator(mode="after")
    def _grouping_or_strategy(self) -> ExperimentConfig:
        placement = self.engine.placement
        if placement.group_by != "none" and placement.strategy != "pack":
            raise ConfigError(
                "engine.placement.strategy", placement.strategy,
                f"pack, with engine.placement.group_by: {placement.group_by} (it names each worker's node itself; "
                f"{placement.strategy} would contradict it), or set group_by: none",
            )  # fmt: skip
        return self

    @model_validator(mode="after")
    def _population_fits_method(self, info: ValidationInfo) -> ExperimentConfig:
        names = [p.name or f"peer{i}" for i, p in enumerate(self.peers)]
        if len(set(names)) != len(names):
            raise ValueError(f"peer names must be unique, got {names}")
        for i, p in enumerate(self.peers):
            p.name = names[i]
        earlier = (info.context or {}).get("earlier_stages")
        for i, p in enumerate(self.peers):
            if p.from_stage is not None and (earlier is None or p.from_stage not in earlier):
                accepted = (
                    f"an earlier stage of this run: {earlier}"
                    if earlier
                    else "a stage name, in a config with stages: (a plain config has none; use checkpoint:)"
                )
                raise ConfigError(f"peers.{i}.from_stage", p.from_stage, accepted)
        METHODS.lookup(self.method.name).check_population(self)
        register = self.tracking.register
        if register is not None:
            trainable = [p.name for p in self.peers if not p.frozen]
            if not trainable:
                raise ConfigError("tracking.register", register.name, "the population has no trainable peer")
            if register.peer is not None and register.peer not in trainable:
                raise ConfigError(
                    "tracking.register.peer", register.peer, f"a trainable peer: {', '.join(trainable)}"
                )
        return self

    @model_validator(mode="after")
    def _data_parallel_peers(self) -> ExperimentConfig:
        """Peers of several workers: each worker takes an equal shard of every global batch."""
        workers = self.peer_workers
        for i, m in enumerate(workers):
            if m > 1 and self.engine.name != "ray":
                raise ConfigError(
                    f"peers.{i}.workers", m,
                    "applies only to engine.name: ray (the local engine runs every peer in one process); set "
                    "engine.name: ray or workers: 1",
                )  # fmt: skip
            if m > 1 and self.data.batch_size % m:
                raise ConfigError(
                    "data.batch_size", self.data.batch_size,
                    f"a multiple of peers.{i}.workers = {m} (every worker takes an equal shard of the global "
                    "batch, so that the run's maths does not depend on the number of workers)",
                )  # fmt: skip
        if max(workers) > 1 and len(set(workers)) > 1:
            # unequal: each peer's rows are gathered to its first worker, exchanged, scattered (exchange/regroup.py)
            METHODS.lookup(self.method.name).check_unequal_workers(self)
        if max(workers) > 1:
            METHODS.lookup(self.method.name).check_data_parallel(self)
        return self

    # ---- conveniences
    @property
    def num_peers(self) -> int:
        return len(self.peers)

    @property
    def peer_workers(self) -> list[int]:
        """Each peer's data-parallel workers (``peers[i].workers``, else ``engine.placement.workers_per_peer``)."""
        default = self.engine.placement.workers_per_peer
        return [p.workers or default for p in self.peers]

    @property
    def num_workers(self) -> int:
        """The Ray Train workers a RayEngine run of this population asks for: every peer's workers."""
        return sum(self.peer_workers)

    def worker_layout(self) -> list[tuple[int, int]]:
        """Ray Train rank -> (peer, shard). Ray Train numbers the workers node by node, so the workers that should
        share a node get consecutive ranks: peer by peer (a peer's workers contiguous: Ray's packing, or
        ``engine.placement.group_by: peer``, keeps them together and the peer's gradient all-reduce local), or
        with ``group_by: shard`` shard by shard (shard m of every peer contiguous, in peer order)."""
        workers = self.peer_workers
        if self.engine.placement.group_by == "shard":
            return [(k, m) for m in range(max(workers)) for k, count in enumerate(workers) if m < count]
        return [(k, m) for k, count in enumerate(workers) for m in range(count)]

    def peer_sync_bn(self, k: int) -> bool:
        own = self.peers[k].sync_bn
        return self.engine.placement.sync_bn if own is None else own

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


# Sections that a single string may stand for, and the key that string sets (``exchange: actor``).
SHORTHANDS = {"exchange": "name", "placement": "strategy"}


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
                elif isinstance(node[part], str) and part in SHORTHANDS:  # exchange: stale -> {name: stale}
                    node[part] = {SHORTHANDS[part]: node[part]}
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


_ABSENT = object()


def validate(raw: dict[str, Any], earlier_stages: list[str] | None = None) -> ExperimentConfig:
    """Validate a raw mapping; the first problem is raised as a ConfigError (the others are counted).

    ``earlier_stages``: the names of the stages before this one, when validating one stage of a staged run (a peer
    may then say ``from_stage``)."""
    if not isinstance(raw, dict):
        raise ConfigError("<config>", type(raw).__name__, "the file must hold a YAML mapping")
    for dotted, replacement in MOVED_KEYS.items():
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(dotted, node, f"this key was replaced: use {replacement}")
    try:
        return ExperimentConfig.model_validate(raw, context={"earlier_stages": earlier_stages})
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        if len(errors) > 1:
            first.args = (f"{first.args[0]} (and {len(errors) - 1} more problem(s))",)
        raise first from None


def read_raw(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A config file's mapping (or the mapping itself). Any file that is not a YAML mapping, whatever its bytes,
    is refused with one line."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_file():
        raise ConfigError("config", str(path), "no such file")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("config", str(path), "not a text file (not UTF-8)") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("config", str(path), f"not valid YAML: {first}") from None
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot be read ({exc.strerror or exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            "config", str(path), f"the file must hold a YAML mapping, it holds a {type(raw).__name__}"
        )
    return raw


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML file (or a mapping), apply ``KEY=VALUE`` overrides and validate."""
    return validate(apply_overrides(read_raw(source), overrides))


def check_keys_act_here(cfg: ExperimentConfig, cuda_available: bool | None = None) -> None:
    """Refuse, before a run of the local engine is built, a key that this machine would ignore: ``train.amp`` when
    ``train.device: auto`` finds no GPU here. (``train.device: cpu`` with ``amp`` is refused by validation itself,
    on any machine; a Ray run's device is decided on its workers, so it is not judged here.)"""
    if not cfg.train.amp or cfg.train.device != "auto" or cfg.engine.name == "ray":
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise ConfigError(
            "train.amp", True, AMP_ON_CPU.format(why="train.device is auto on a machine without CUDA")
        )
