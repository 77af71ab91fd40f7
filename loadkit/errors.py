"""One root error for everything a user can cause and fix.

Every message is one line that says what is wrong and where (file, line, key, address), so the
CLI can print it as-is and exit non-zero without a traceback. Foreign errors are mapped at the
boundary to the most specific class here, with ``raise ... from err``.
"""

from __future__ import annotations


class LoadkitError(Exception):
    """Base of all loadkit errors; ``str(err)`` is the one-line message for the user."""

    #: process exit status the CLI uses for this error
    exit_code: int = 2


class InputFileError(LoadkitError):
    """A file given by the user (names, accounts, credentials) is missing or malformed.

    Messages name the file and, where it applies, the line:
    ``names file queries.txt line 12: 'exa mple.com' is not a valid DNS name``.
    """


class ProfileError(LoadkitError):
    """A profile or an option value is invalid: messages name the file, key and problem."""


class TargetError(LoadkitError):
    """A target cannot be resolved, or is outside the allowlist."""


class TargetNotAllowed(TargetError):
    """A target resolves to an address outside the allowlist; nothing was sent."""


class LabError(LoadkitError):
    """The local lab could not be brought up, inspected or brought down."""


class PortInUse(LabError):
    """A port the lab needs is taken by another process."""


class RecordError(LoadkitError):
    """A run record is missing, incomplete or unreadable."""


class ModelError(LoadkitError):
    """A model cannot be fitted to the data it was given (too few points, no variation...)."""


class ReportError(LoadkitError):
    """The capacity report could not be produced."""


class CollectorError(LoadkitError):
    """The collector was misconfigured (bad group spec, bad interval, unreachable URL)."""
