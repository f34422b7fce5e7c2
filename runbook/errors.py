"""The one exception tree of the runbook.

Domain code raises these; only the task layer (:mod:`runbook.tasks`) turns them
into ``invoke.Exit`` with a message. Messages never carry a secret: build them
from redacted values (:func:`runbook.redact.redact`).
"""

from __future__ import annotations


class RunbookError(Exception):
    """Base of every error tern raises on purpose. ``exit_code`` is the CLI's."""

    exit_code = 1

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.context = context


class ConfigError(RunbookError):
    """Bad input: an option, a settings value, an outputs file."""

    exit_code = 2


class ContractError(ConfigError):
    """The outputs contract is missing, malformed, or names a field wrongly."""


class SandboxError(RunbookError):
    """The local sandbox could not be built, started or stopped."""


class CommandError(RunbookError):
    """A host command failed or timed out."""


class DatabaseError(RunbookError):
    """A database could not be reached or answered unexpectedly."""


class TimeoutExpired(RunbookError):
    """A bounded wait ran out of time."""


class CommandTimeout(CommandError, TimeoutExpired):
    """A host command ran out of time: killed on the host at its timeout, or not finished by the deadline.
    Both a :class:`CommandError` (the host contract) and a :class:`TimeoutExpired` (the runbook's timeout)."""


class PreflightError(RunbookError):
    """A precondition of a step does not hold; nothing was changed."""


class VerificationError(RunbookError):
    """Two databases differ where they must be equal."""


class StepError(RunbookError):
    """A runbook step failed; carries the step's name."""


class Refused(StepError):
    """A run stopped by its preflight before any step acted: nothing was changed. An unmet
    precondition, so the CLI exits 2 (a StepError still, for callers that catch a run's failures)."""


class NotPromoted(StepError):
    """A point-of-no-return step refused to cross it (nothing irreversible happened): fall back."""
