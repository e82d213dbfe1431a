"""Errors that mean "the input is wrong or the run cannot go on", reported by the CLI as one clear line
(``dar CMD: error: ...``, exit status 2) instead of a traceback."""

from __future__ import annotations


class DarError(Exception):
    """Base of the project's own errors."""


class CheckpointError(DarError):
    """A checkpoint is missing, corrupt, truncated or does not fit the model."""


class TrainingDiverged(DarError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class RunDirBusy(DarError):
    """Another live process holds the run (or output) directory."""


USER_ERRORS = (ValueError, DarError)
