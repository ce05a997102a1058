"""Run configuration: one dataclass per concern, nested in `RunConfig`; YAML + `key=value` overrides.

The package's names are importable from here (`from higgs_lora.config import RunConfig, load_config`). The modules:
schema (the dataclasses, ConfigError), validate (cross-field checks), load (YAML, overrides, building, saving) and
help (field help, the shared command line, `higgs-lora config`). Imports no torch: every entry point parses and
validates its command line before paying for heavy imports. See docs/training.md ("Configuration") and
`higgs-lora config --help-keys`.
"""

from higgs_lora.config.help import (
    add_config_arguments,
    config_from_args,
    describe_keys,
    field_docs,
    format_help,
)
from higgs_lora.config.load import build_config, load_config, load_yaml, save_config
from higgs_lora.config.schema import (
    DEFAULT_LORA_TARGETS,
    AudioConfig,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PlanConfig,
    PrepareConfig,
    RunConfig,
    TrainConfig,
)
from higgs_lora.config.validate import max_sample_audio_positions

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "AudioConfig",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "PlanConfig",
    "PrepareConfig",
    "RunConfig",
    "TrainConfig",
    "add_config_arguments",
    "build_config",
    "config_from_args",
    "describe_keys",
    "field_docs",
    "format_help",
    "load_config",
    "load_yaml",
    "max_sample_audio_positions",
    "save_config",
]
