"""The configuration error, on the ground floor by itself: ``config`` and ``st_folder`` (which the config
check uses to read model folders) both raise it, and neither may import the other's importer. Everyone else
imports it from ``b3stream.config``, which re-exports it."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""
