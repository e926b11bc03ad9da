"""Errors that reach the user as one line: `path:line: what is wrong`."""

from __future__ import annotations

import functools
import sys


class DataError(ValueError):
    """Bad input data. str() is `path:line: message` (line omitted when unknown)."""

    def __init__(self, path, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ModelError(ValueError):
    """A model, tokenizer or adapter folder that cannot be used, with the reason."""


class ConfigError(ValueError):
    """A setting that cannot work (unknown template, format, dtype …), with the accepted values."""


def exit_on_error(main):
    """Wrap a script's main(): known errors print one line to stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (DataError, ModelError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
