"""Exception types shared by the library and the CLIs.

Everything derived from :class:`InputError` is the user's to fix (a config key, a file, a value):
CLIs print its message on one line and exit with code 2, without a traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input; the message names the file, key or value and what was expected."""


class ConfigError(InputError):
    """A configuration file failed validation; ``errors`` holds every problem found."""

    def __init__(self, path: str, errors: list[str]):
        self.path = path
        self.errors = list(errors)
        lines = "\n".join(f"  {path}: {e}" for e in self.errors)
        super().__init__(f"invalid config {path} ({len(self.errors)} problem(s)):\n{lines}")


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable or does not fit the network it is meant for."""


class VolumeError(InputError):
    """A volume (image or mask) is missing, unreadable or not what the job needs."""


class RunFailure(Exception):
    """A runtime failure with a clear cause (exit code 1, the message without a traceback)."""


class TrainingDiverged(RunFailure):
    """A loss term became NaN or infinite; the message names the step and the term."""
