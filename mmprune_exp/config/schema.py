"""Dataclass schemas for every config group, and the validation that runs right after composition.

Each YAML option in ``conf/<group>/`` starts its defaults list with ``/schema/<group>@_here_: <name>``, so
Hydra merges it onto one of these dataclasses: an unknown key or a value of the wrong type fails while
composing, with OmegaConf naming the full key. Range and enum checks (a sparsity of 1.5, a negative
limit, an unknown device) live in ``__post_init__`` and run in :func:`validate`, which ``run.py`` calls
before it loads anything; the error names the key as ``<group>.<field>``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mmprune_exp import ASSETS_DIR
from mmprune_exp.errors import ConfigError


class _FieldError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def require(condition: bool, key: str, message: str) -> None:
    """In a schema's ``__post_init__``: raise a field error naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise _FieldError(key, message)


DTYPES = ("float32", "float16", "bfloat16", "auto")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MODEL_PARTS = ("language", "vision", "merger", "lm_head")


@dataclass
class ModelConfig:
    """Which checkpoint to load and how (``model=...``)."""

    name: str = "qwen2_5_vl_tiny"
    family: str = "qwen2_5_vl"  # picks the adapter from the adapter registry
    path: str = "???"  # HF hub id or local directory
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda when available, else cpu
    attn_implementation: str = "sdpa"
    min_pixels: int = 3136
    max_pixels: int = 12544
    local_files_only: bool = False  # True: never contact the hub, even where the network works
    # disk: keep decoder layers on disk and stream one at a time while pruning (models larger than memory)
    offload: str = "none"

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, "dtype", f"got {self.dtype!r}; choose one of {DTYPES}")
        require(
            bool(_DEVICE_RE.match(self.device)),
            "device",
            f"got {self.device!r}; use auto, cpu, mps, cuda or cuda:N",
        )
        require(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            "attn_implementation",
            f"got {self.attn_implementation!r}; choose one of {ATTN_IMPLEMENTATIONS}",
        )
        require(self.min_pixels > 0, "min_pixels", f"must be positive, got {self.min_pixels}")
        require(self.offload in ("none", "disk"), "offload", f"got {self.offload!r}; use none or disk")
        require(
            self.max_pixels >= self.min_pixels,
            "max_pixels",
            f"must be >= min_pixels ({self.min_pixels}), got {self.max_pixels}",
        )


@dataclass
class PrunerConfig:
    """Common fields of every pruner (``pruner=...``); a pruner with its own knobs subclasses this."""

    name: str = "none"
    # Parts of the model whose linear layers are pruned; the adapter maps each part to module names.
    scope: list[str] = field(default_factory=lambda: ["language"])
    # Within the language decoder, which linears (by attribute name) are targets.
    modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        bad = [p for p in self.scope if p not in MODEL_PARTS]
        require(not bad, "scope", f"unknown part(s) {bad}; choose from {MODEL_PARTS}")
        require(len(self.modules) > 0, "modules", "name at least one linear (e.g. q_proj)")


def sparsity_label(value: float, structure: str = "unstructured", n: int = 0, m: int = 0) -> str:
    """The run label of a sparsity: ``s50`` for 50% unstructured, ``2of4`` for N:M, ``s62.5`` in between.

    Derived from the values, so ``sparsity=s50 sparsity.value=0.3`` is labelled ``s30`` in results, W&B
    run names and tables, never ``s50``.
    """
    if structure == "nm":
        return f"{n}of{m}"
    return f"s{round(float(value) * 100, 4):g}"


@dataclass
class SparsityConfig:
    """Target sparsity (``sparsity=s50``): the fraction of weights set to zero in each target matrix."""

    # The label follows value/structure/n/m (see sparsity_label); option files do not set it.
    name: str = "${mmp_sparsity_label:${.value},${.structure},${.n},${.m}}"
    value: float = 0.5
    structure: str = "unstructured"  # unstructured | nm
    n: int = 0  # for structure=nm: n zeros in every group of m consecutive input weights
    m: int = 0

    def __post_init__(self) -> None:
        if self.name.startswith("${"):  # built in Python (not composed by Hydra): nothing resolved the label
            self.name = sparsity_label(self.value, self.structure, self.n, self.m)
        require(0.0 <= self.value < 1.0, "value", f"must be in [0, 1), got {self.value}")
        require(
            self.structure in ("unstructured", "nm"),
            "structure",
            f"got {self.structure!r}; choose unstructured or nm",
        )
        if self.structure == "nm":
            require(0 < self.n < self.m, "n", f"N:M needs 0 < n < m, got n={self.n}, m={self.m}")
            require(
                abs(self.value - self.n / self.m) < 1e-9, "value", f"must equal n/m = {self.n / self.m} for N:M sparsity"
            )


@dataclass
class CalibrationConfig:
    """Calibration data (``calibration=...``)."""

    name: str = "shapes"
    nsamples: int = 32
    seed: int = 0
    max_length: int = 2048
    path: str | None = None  # data file for loaders that read one

    def __post_init__(self) -> None:
        require(self.nsamples > 0, "nsamples", f"must be positive, got {self.nsamples}")
        require(self.max_length > 0, "max_length", f"must be positive, got {self.max_length}")


@dataclass
class BenchmarkConfig:
    """Evaluation task (``benchmark=...``) and its generation settings."""

    name: str = "shapes_vqa"
    split: str = "eval"
    limit: int | None = None  # evaluate only the first `limit` records (smoke runs)
    batch_size: int = 16
    max_new_tokens: int = 16
    path: str | None = None  # data root for benchmarks read from files

    def __post_init__(self) -> None:
        require(self.limit is None or self.limit > 0, "limit", f"must be positive or null, got {self.limit}")
        require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")


@dataclass
class LoggerConfig:
    """Experiment tracking (``logger=wandb|none``)."""

    name: str = "none"
    project: str = "mmprune-exp"
    entity: str | None = None
    group: str | None = None
    job_type: str = "prune_eval"
    run_name: str | None = None
    mode: str = "auto"  # auto = online when an API key is configured, else offline
    tags: list[str] = field(default_factory=list)
    log_samples: bool = True
    # Seconds wandb.init may wait for the server before the run goes on offline (wandb's own: 90 + retries).
    init_timeout: float = 30.0

    def __post_init__(self) -> None:
        modes = ("auto", "online", "offline", "disabled")
        require(self.mode in modes, "mode", f"got {self.mode!r}; choose one of {modes}")
        require(self.init_timeout > 0, "init_timeout", f"must be positive, got {self.init_timeout}")


@dataclass
class RootConfig:
    """The primary config's own keys (``conf/config.yaml``); each group below is checked by its own schema."""

    task_name: str = "prune_eval"  # names the output folder and the W&B group when none is given
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    dense_baseline: bool = True  # also evaluate the unpruned model (cached) for recovery
    use_dense_cache: bool = True  # reuse a cached dense baseline when one matches
    save_model: bool = False  # write the pruned model to <run dir>/pruned_model
    prune_checkpoint: bool = True  # checkpoint pruned decoder layers in <run dir>/prune_ckpt (resume after a kill)

    def __post_init__(self) -> None:
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


# Top-level nodes that are config groups (validated by their group schema) or Hydra's own.
ROOT_GROUPS = ("model", "pruner", "sparsity", "calibration", "benchmark", "token_pruner", "logger", "paths", "hydra")


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "."
    cache_dir: str = "outputs/cache"


# The base schema of each group; a method with knobs of its own registers its schema from its module
# (``Registry.register(name, schema=...)``), so adding a method never edits this file.
SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"qwen2_5_vl": ModelConfig},
    "pruner": {"base": PrunerConfig},
    "sparsity": {"base": SparsityConfig},
    "calibration": {"base": CalibrationConfig},
    "benchmark": {"base": BenchmarkConfig},
    "logger": {"base": LoggerConfig},
    "paths": {"base": PathsConfig},
}


def register_schema(group: str, name: str, node: type) -> None:
    """Add a schema (e.g. a pruner with extra knobs) that YAML options can extend."""
    SCHEMAS.setdefault(group, {})[name] = node
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=node)


def _asset_path(name: str) -> str:
    return str(ASSETS_DIR / name)


# Packages whose modules register methods, each with its own schema (Registry.register(name, schema=...)).
PLUGIN_PACKAGES = ("mmprune_exp.pruners", "mmprune_exp.benchmarks", "mmprune_exp.calibration", "mmprune_exp.token_pruners")


def register_configs() -> None:
    """Store all schemas in Hydra's ConfigStore and register the resolvers. Idempotent.

    Importing the plugin packages first lets every method module add its schema before Hydra composes.
    """
    for package in PLUGIN_PACKAGES:
        importlib.import_module(package)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            ConfigStore.instance().store(group=f"schema/{group}", name=name, node=node)
    if not OmegaConf.has_resolver("mmp_asset"):
        # ${mmp_asset:qwen2_5_vl_tiny} -> the packaged checkpoint, wherever the package is installed.
        OmegaConf.register_new_resolver("mmp_asset", _asset_path)
    if not OmegaConf.has_resolver("mmp_sparsity_label"):
        OmegaConf.register_new_resolver("mmp_sparsity_label", sparsity_label)


def _group_object(group: str, node: DictConfig) -> Any:
    """Instantiate the group's dataclass so that its ``__post_init__`` checks run.

    ``+group.key=value`` force-adds keys past the schema, so unknown keys are checked here as well.
    """
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            raise _FieldError(unknown[0], f"unknown key for {schema.__name__}; known keys: {sorted(known)}")
    return OmegaConf.to_object(node)


def _validate_root(cfg: DictConfig) -> None:
    """Unknown top-level keys (``+foo=1``, a typo in an experiment file) and the root values' types/ranges."""
    known = {f.name for f in dataclasses.fields(RootConfig)}
    unknown = sorted(set(cfg.keys()) - known - set(ROOT_GROUPS))
    if unknown:
        raise ConfigError(
            f"{unknown[0]}={OmegaConf.select(cfg, unknown[0], throw_on_missing=False)!r} is not a config key "
            f"(added with +{unknown[0]}=...?); top-level keys: {sorted(known)}, groups: {list(ROOT_GROUPS[:-1])}"
        )
    values = {k: cfg[k] for k in known if k in cfg}
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), values))
    except _FieldError as err:
        raise ConfigError(f"{err.key}={values.get(err.key)!r} is invalid: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - OmegaConf's type errors (seed=abc) name the key
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}={values.get(key)!r} is invalid: {str(getattr(err, 'msg', err)).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Check the root keys and every group's values; raise :class:`ConfigError` naming ``group.key`` on the
    first problem.

    Called before any model or data is loaded, so a bad sweep point fails in seconds.
    """
    _validate_root(cfg)
    for group in SCHEMAS:
        if group not in cfg or group == "paths":
            continue
        node = cfg[group]
        if not isinstance(node, DictConfig):
            continue
        try:
            _group_object(group, node)
        except _FieldError as err:
            value = OmegaConf.select(cfg, f"{group}.{err.key}", throw_on_missing=False)
            raise ConfigError(f"{group}.{err.key}={value!r} is invalid: {err.message}") from None
