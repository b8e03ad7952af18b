"""Typed run configuration: schema (dataclasses), YAML loader with inheritance and overrides, validation."""
from megahybrid.config.loader import ConfigError, dump_yaml, load_config, to_dict
from megahybrid.config.schema import AlgorithmConfig, RunConfig

__all__ = ["AlgorithmConfig", "ConfigError", "RunConfig", "dump_yaml", "load_config", "to_dict"]
