"""What every command line of the project shares: argparse errors on one line, and the argument
types for counts and positive numbers (``python -m calib.data``, ``python -m calib.apply``,
``python -m tracking.apply``, ``python sweeps/launch.py``)."""

from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """argparse whose bad arguments are reported on one line of stderr (no usage block) and exit
    with status 2. ``line`` is the message's template (``{prog}``, ``{message}``): a command
    whose other errors read differently sets its own, so all its errors look alike."""

    line = "{prog}: error: {message}\n"

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, self.line.format(prog=self.prog, message=message))


def positive_int(text: str) -> int:
    """An argument that must be an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str, what: str = "a positive number") -> float:
    """An argument that must be a finite number > 0; ``what`` names it in the error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value
