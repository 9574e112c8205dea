"""One exception type for mistakes a user can fix, so the CLI can print them as one line instead of a traceback."""


class ConfigError(ValueError):
    """A setting, path or input the user controls is wrong. The message names the key or file and the fix."""
