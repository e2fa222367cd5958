"""The errors epamx raises for input a user can fix.

Each message names the argument, config key or file and says what was expected. The command line prints an
:class:`EpamxError` as one line and exits with code 2; any other exception is a bug and keeps its traceback.

    EpamxError
    ├── ConfigError          a config file, key or override (also a ValueError)
    ├── DataError            annotations, videos, frame folders, samples (also a ValueError)
    │   └── DataFileNotFound a data file or folder that does not exist (also a FileNotFoundError)
    ├── CheckpointError      a checkpoint or run folder that cannot be used here (also a ValueError)
    │   └── CheckpointNotFound                      (also a FileNotFoundError)
    ├── RunExistsError       a run folder that already holds a run (also a FileExistsError)
    └── MissingExtra         an optional extra a command needs is not installed (also an ImportError)

The data layer's own errors (``AnnotationError``, ``DecodeError``, ``SampleError``) are DataErrors.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointNotFound", "ConfigError", "DataError", "DataFileNotFound", "EpamxError",
           "MissingExtra", "RunExistsError"]


class EpamxError(Exception):
    """Bad input a user can fix; the message says what and where."""


class ConfigError(EpamxError, ValueError):
    """A config file or override that cannot be used; the message names the key and where it came from."""


class DataError(EpamxError, ValueError):
    """A dataset file, folder or sample that does not hold what the pipeline needs; the message names it."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A data file or folder (annotations, a video, a frame folder) that does not exist."""


class CheckpointError(EpamxError, ValueError):
    """A checkpoint that cannot be used here; the message names the file and what is wrong."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint file or run folder that does not exist or holds no checkpoint."""


class RunExistsError(EpamxError, FileExistsError):
    """A run folder that already holds a run the command would overwrite."""


class MissingExtra(EpamxError, ImportError):
    """An optional extra (pyproject.toml's [project.optional-dependencies]) that a command needs; the message says
    how to install it."""
