"""argparse ``type=`` checks the subcommands share: a bad flag value is a usage error naming the value."""

from __future__ import annotations

import argparse
from typing import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """``type=int_at_least(1)``: an integer no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """``type=positive_float``: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """``type=int_list(1)``: a comma list of integers, each no smaller than ``minimum`` (``"1,4,16"``); repeats
    dropped, order kept."""
    one = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        values = [one(item.strip()) for item in str(text).split(",") if item.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}")
        return list(dict.fromkeys(values))
    return parse
