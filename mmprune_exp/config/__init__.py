"""Config schemas (registered in Hydra's ConfigStore) and post-compose validation."""

from mmprune_exp.config.schema import (  # noqa: F401
    BenchmarkConfig,
    CalibrationConfig,
    ConfigError,
    LoggerConfig,
    ModelConfig,
    PathsConfig,
    PrunerConfig,
    SparsityConfig,
    register_configs,
    validate,
)
