"""The kinds of failure a job reports to its user, each a one-line message and an exit status.

Code raises these with a message that names the file or key and what is wrong; only the CLI layer
(`tb_train.cli.run_main`) turns them into `prog: error: <message>` and the exit status, so a library
caller gets an exception it can catch by kind instead of a printed line.
"""
from __future__ import annotations


class TBError(Exception):
    """Base: a failure the user can fix; `exit_code` is what the command line exits with."""

    exit_code = 2


class ConfigError(TBError, ValueError):
    """A config file, override or command-line option is wrong (unknown key, bad value, bad combination)."""


class InputError(TBError, ValueError):
    """An input file or folder is missing, truncated, corrupt or of the wrong kind (images, shards, weights)."""


class CheckpointError(TBError):
    """A checkpoint to resume or export from is missing or damaged."""


class FollowerExit(TBError):
    """Another rank failed and rank 0 reports it: this rank exits with that status and prints nothing
    (one line per failure, not one per rank)."""

    def __init__(self, exit_code: int):
        super().__init__(f"another rank failed (exit status {exit_code})")
        self.exit_code = exit_code


__all__ = ["TBError", "ConfigError", "InputError", "CheckpointError", "FollowerExit"]
