"""Argument types for the ``evssd`` command line: each checks one kind of value at parse time.

argparse turns the :class:`argparse.ArgumentTypeError` these raise into a one-line
``evssd <cmd>: error: argument --x: ...`` and exit code 2, so a bad number never reaches the
code behind a subcommand (no traceback, no silent default). :class:`UsageError` is for the few
checks that need several arguments together; :func:`evssd.host.cli.main` prints it the same way.
"""
from __future__ import annotations

import argparse
import math

__all__ = ["UsageError", "positive_int", "nonneg_int", "int_range", "power_of_two", "port",
           "positive_float", "nonneg_float", "fraction", "share", "percent", "int_list", "float_list",
           "choice_list"]


class UsageError(ValueError):
    """Arguments that are each valid but do not fit together; exit code 2, one line."""


def _int(text: str) -> int:
    try:
        return int(text, 0) if text.strip().lower().startswith(("0x", "0b", "0o")) else int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _named(fn, name: str):
    fn.__name__ = name  # argparse names the type in its "invalid <name> value" fallback
    return fn


def int_range(lo: int | None = None, hi: int | None = None, what: str = "an integer"):
    """An integer in ``lo..hi`` (either bound may be open)."""
    def check(text: str) -> int:
        value = _int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {what} {span}")
        return value
    return _named(check, what)


positive_int = int_range(1, None, "a positive integer")
nonneg_int = int_range(0, None, "a non-negative integer")
port = int_range(0, 65535, "a TCP port")


def power_of_two(text: str) -> int:
    value = _int(text)
    if value < 1 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a power of two")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0")
    return value


def nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be >= 0")
    return value


def fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not a fraction in (0, 1]")
    return value


def share(text: str) -> float:
    """A share in [0, 1] (0 allowed: none)."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not a share in [0, 1]")
    return value


def percent(text: str) -> float:
    """A percentage in (0, 100]."""
    value = _float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{value:g} is not a percentage in (0, 100]")
    return value


def _items(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list (empty item)")
    return items


def int_list(item=positive_int):
    """A comma-separated list of values each checked by ``item``, e.g. ``64,128,256``; the
    text is returned as given (the subcommands split it themselves)."""
    def check(text: str) -> str:
        for t in _items(text):
            item(t)
        return text
    return _named(check, "comma-separated list")


def float_list(item=positive_float):
    """Like :func:`int_list` for numbers."""
    return int_list(item)


def choice_list(choices):
    """A comma-separated list of names from ``choices`` (kept as the original string)."""
    choices = tuple(choices)

    def check(text: str) -> str:
        for t in _items(text):
            if t not in choices:
                raise argparse.ArgumentTypeError(f"{t!r} is not one of {', '.join(choices)}")
        return text
    return _named(check, "comma-separated list")
