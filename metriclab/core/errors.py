"""The error every usage mistake raises: entry points print its message as one line, with no traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value, a file or a folder given by the user is wrong. The message names the key or the file and says
    what to do."""
