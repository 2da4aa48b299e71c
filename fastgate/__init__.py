"""fastgate: an API gateway with Kong's declarative configuration and a compiled hot path."""

__version__ = "0.1.0"
