"""Errors and warnings of the report, and the place that collects warnings for report.md."""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger("tracking.report")


class ReportError(ValueError):
    """Bad data in the MLflow store: the message names the run, artifact, tag or subject at fault."""

    exit_code = 1


class ReportArgumentError(ReportError):
    """A bad command-line argument (unknown experiment, unknown sweep run): the CLI exits 2."""

    exit_code = 2


class ReportWarning(UserWarning):
    """Something the reader of the report must know (missing subjects, ignored runs, ...)."""


class WarningLog:
    """Collects warnings so that report.md can list them, and emits each as a ReportWarning."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def warn(self, message: str) -> None:
        if message in self.messages:  # the same fact found twice is reported once
            return
        self.messages.append(message)
        warnings.warn(message, ReportWarning, stacklevel=2)
