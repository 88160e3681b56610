"""Exceptions shared across layers. A leaf module: it imports nothing from realign, so any module may raise these
without importing the module that validates a study (realign.config re-exports ConfigError for its callers)."""


class ConfigError(ValueError):
    """A study configuration, or an input it names (a model directory, a GGUF file, a resource), is unusable; the
    message names the offending key."""
