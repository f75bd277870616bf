"""The exception tree of Tidal.

Every error says what was expected, what came, and what to do::

    TidalError
    ├── ConfigError            an invalid config value (names the field, value, range)
    ├── BatchError             a malformed SparseBatch or gradient (names the array, shape)
    ├── DataError              an unreadable data file or a bad row (names file and line)
    │   └── DataPathError      a data path that names no file to read
    ├── CheckpointError        a checkpoint that cannot be written or read
    │   └── CorruptCheckpointError   a truncated, altered or incomplete file (names it)
    ├── RunStoppedError        a run that lost a worker or shard it cannot do without
    └── serving errors, defined in `tidal.serving` (the layer that raises them):
        RequestError (a request the server refuses, answered with its `status`: 400, 408,
        413, 415 or 501), SessionError (an unknown, ended or expired sequence: 400),
        Overloaded (too many rows waiting: 503), ShuttingDown (the server is stopping: 503)

`ConfigError`, `BatchError` and `DataError` are also `ValueError`s, so code that already catches
`ValueError` keeps working.
"""

from __future__ import annotations

__all__ = [
    "BatchError",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "DataError",
    "DataPathError",
    "RunStoppedError",
    "TidalError",
]


class TidalError(Exception):
    """Base class of every error Tidal raises on purpose."""


class ConfigError(TidalError, ValueError):
    """A config value is invalid; the message names the field, the value and the range."""


class BatchError(TidalError, ValueError):
    """A batch or gradient does not have the expected layout, dtype or shape."""


class DataError(TidalError, ValueError):
    """A data file cannot be read, or a row is bad and the run was told to fail on it."""


class DataPathError(DataError):
    """A data path names no file to read: nothing there, a folder, a file named twice."""


class RunStoppedError(TidalError):
    """A run stopped part way: a worker or a table shard it cannot do without died
    (`what`). Its last checkpoint, if it wrote one, resumes it."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}. The run stopped; its last checkpoint, if it wrote one, resumes it")
        self.what = what

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.what,)  # from a Ray actor to the driver as it was raised


class CheckpointError(TidalError):
    """A checkpoint cannot be written or read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, altered or missing; the message names it."""
