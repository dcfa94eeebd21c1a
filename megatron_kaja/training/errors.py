"""The error every configuration check raises."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag and the fix."""
