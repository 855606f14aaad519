"""Exception types of Lattice: every error a user can meet names the bad input and the fix."""

from __future__ import annotations


class LatticeError(Exception):
    """Base class of every error Lattice raises on purpose."""


class ConfigError(LatticeError, ValueError):
    """A bad option or directory; the message names the option and the value."""


class UnsupportedObjectError(LatticeError, TypeError):
    """No adapter handles a registered object (or a leaf inside its state)."""


class StateMismatchError(LatticeError, ValueError):
    """A checkpoint does not fit the registered object (shape, dtype, keys, adapter)."""


class CheckpointError(LatticeError):
    """A checkpoint could not be written or no usable checkpoint could be read."""


class AlreadyCommittedError(CheckpointError):
    """A store refused a file for a step it already holds committed (delete the step first)."""


class CorruptCheckpointError(CheckpointError):
    """One committed checkpoint is damaged; restore falls back to an older one.

    Attributes:
        path: the checkpoint directory.
        file: the damaged file (relative to ``path``), or ``None`` for the directory.
        reason: what is wrong, in words.
    """

    def __init__(self, path: str, file: str | None, reason: str):
        self.path, self.file, self.reason = path, file, reason
        where = f"{path}/{file}" if file else path
        super().__init__(f"{where}: {reason}")


class PluginError(LatticeError):
    """A third-party plugin (entry point) failed to load."""
