"""Typed run configuration."""

from vlmtune.config.load import ConfigError, describe_keys, load_config, valid_keys
from vlmtune.config.schema import COMPONENTS, RunConfig

__all__ = ["COMPONENTS", "ConfigError", "RunConfig", "describe_keys", "load_config", "valid_keys"]
