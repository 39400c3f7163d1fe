"""Run configuration: typed dataclasses from YAML plus `section.key=value` overrides.

`load_config` builds a `Config` and checks key names and value types; `validate` checks the
values and how they fit a world size, and resolves `parallel.dp=-1`. Both run before any
process group exists and raise `ConfigError` with a message that says what to change.
"""

from engine.config.checks import validate
from engine.config.loader import ALIASES, config_to_dict, dump_yaml, load_config, parse_cli
from engine.config.schema import (CheckpointConfig, Config, ConfigError, DataConfig, DistConfig, FlexSPConfig, HardwareConfig, ModelConfig, OptimConfig,
                                  ParallelConfig, TrainConfig)

__all__ = ["ALIASES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistConfig", "FlexSPConfig", "HardwareConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "TrainConfig", "config_to_dict", "dump_yaml", "load_config", "parse_cli",
           "validate"]
