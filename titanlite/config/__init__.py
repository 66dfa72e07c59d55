"""Job configuration: one dataclass per TOML section, loaded from defaults < TOML < command line."""

from titanlite.config.help import help_text
from titanlite.config.parse import (ConfigError, build_config, config_from_toml_text, load_config,
                                    resolve_config_file)
from titanlite.config.sections import (
    SECTIONS,
    ActivationCheckpointConfig,
    CheckpointConfig,
    CompileConfig,
    DataConfig,
    DebugConfig,
    EvalConfig,
    Float8Config,
    JobConfig,
    JobSectionConfig,
    LRSchedulerConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    TrainingConfig,
)
from titanlite.config.toml_io import config_to_toml
from titanlite.config.validate import ConfigValueError

__all__ = [
    "SECTIONS", "ActivationCheckpointConfig", "CheckpointConfig", "CompileConfig", "ConfigError",
    "ConfigValueError", "DataConfig", "DebugConfig", "EvalConfig", "Float8Config", "JobConfig",
    "JobSectionConfig", "LRSchedulerConfig", "MetricsConfig", "ModelConfig", "OptimizerConfig",
    "ParallelismConfig", "TrainingConfig", "build_config", "config_from_toml_text", "config_to_toml", "help_text",
    "load_config",
    "resolve_config_file",
]
