"""argparse value types shared by the command-line tools (errors are one readable line)."""

from __future__ import annotations

import argparse


def _number(text: str, kind: type, what: str) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def unit_interval(text: str) -> float:
    """A float in [0, 1] (the ROI-quality and rate knobs)."""
    value = _number(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]")
    return value


def positive(text: str) -> float:
    """A float > 0."""
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def positive_int(text: str) -> int:
    """An integer > 0."""
    value = _number(text, int, "a whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value
