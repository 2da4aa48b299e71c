"""Kong 3.x declarative configuration: loading, validation and the normalised model."""

from fastgate.config.load import ConfigError, Problem, load_config, parse_config
from fastgate.config.model import Config

__all__ = ["Config", "ConfigError", "Problem", "load_config", "parse_config"]
