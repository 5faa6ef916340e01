"""Exceptions raised by the conus library, each carrying its documented exit code.

Only ``bids_app.cli`` turns these into process exit codes; the library never exits.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BIDS_INVALID = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_BAD_DATA = 65
EXIT_INPUT_MISSING = 66
EXIT_CANNOT_CREATE = 73
EXIT_IO_ERROR = 74


class ConusError(Exception):
    """Base class: a clear message for the user and the exit code that goes with it."""

    exit_code = EXIT_BAD_DATA

    def __init__(self, message: str, *, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(ConusError):
    exit_code = EXIT_USAGE


class BadDataError(ConusError):
    """The input exists but cannot be used (not a NIfTI, broken header, wrong shape...)."""

    exit_code = EXIT_BAD_DATA


class InputMissingError(ConusError):
    exit_code = EXIT_INPUT_MISSING


class CannotCreateOutputError(ConusError):
    exit_code = EXIT_CANNOT_CREATE


class ConusIOError(ConusError):
    exit_code = EXIT_IO_ERROR


class BidsValidationError(ConusError):
    exit_code = EXIT_BIDS_INVALID


class UnknownAnalysisLevelError(ConusError):
    exit_code = EXIT_UNKNOWN_LEVEL


class NoMatchError(ConusError):
    """Filters (participant, session, contrast, filter file) matched no files."""

    exit_code = EXIT_NO_MATCH


class BundleError(ConusError):
    """A model bundle is missing, incomplete or fails its checksum."""

    exit_code = EXIT_BAD_DATA
