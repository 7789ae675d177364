"""Value checks shared by the library and the apps: each returns the value it was given, or raises one
`VBShareError` line naming the key, the value and what is allowed.

    integer("trainer.batch_size", 0, low=1)        -> "trainer.batch_size must be a positive integer, got 0"
    number("optim.warmup_ratio", -1, 0, 1)         -> "optim.warmup_ratio must be a number in [0, 1], got -1"
    number("alpha", "big", 0, low_open=True, null=True)
                                                   -> "alpha must be a finite number > 0 or null, got 'big'"
    boolean(key, value), choice(key, value, options)

Booleans are never integers or numbers here (`True` is not a batch size), and NaN or infinity is never a
number. `first_nonfinite` finds a NaN or infinite value among tensors before they are written anywhere;
`refuse_nonfinite` turns one into an error.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from .errors import VBShareError


def fail(key: str, value: Any, allowed: str) -> None:
    raise VBShareError(f"{key} must be {allowed}, got {value!r}")


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _or_null(text: str, null: bool) -> str:
    return f"{text} or null" if null else text


def integer(key: str, value: Any, low: int | None = None, null: bool = False, allowed: str | None = None) -> int | None:
    """An integer >= `low` (None: any integer); `null`: None is allowed too."""
    if value is None and null:
        return None
    if not is_integer(value) or (low is not None and value < low):
        ranges = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}
        fail(key, value, allowed or _or_null(ranges.get(low, f"an integer >= {low}"), null))
    return value


def number(key: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, null: bool = False, allowed: str | None = None) -> float | None:
    """A finite number within [low, high] (either end open with `low_open` / `high_open`, left out with None);
    `null`: None is allowed too. Returns it as a float."""
    if value is None and null:
        return None
    inside = is_number(value) and (
        (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high)))
    if not inside:
        if low is not None and high is not None:
            text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            text = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            text = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            text = "a finite number"
        fail(key, value, allowed or _or_null(text, null))
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(key, value, "true or false")
    return value


def choice(key: str, value: Any, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        fail(key, value, f"one of {', '.join(options)}")
    return value


def first_nonfinite(tensors: Mapping[str, Any] | Iterable[Any], prefix: str = "") -> str | None:
    """The name (dotted path) of the first floating-point tensor holding a NaN or an infinite value, searching
    nested dicts, lists and tuples; None when every tensor is finite. One device synchronisation per tensor."""
    items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value.detach()).all()):
                return name
        elif isinstance(value, (Mapping, list, tuple)):
            found = first_nonfinite(value, name)
            if found is not None:
                return found
    return None


def refuse_nonfinite(tensors: Mapping[str, Any] | Iterable[Any], what: str) -> None:
    """One VBShareError line when any floating-point tensor in `tensors` holds a NaN or an infinite value;
    `what` says what was about to be written ("the adapter in out/adapter")."""
    name = first_nonfinite(tensors)
    if name is not None:
        raise VBShareError(f"not writing {what}: {name} holds NaN or infinite values (the training diverged); "
                           "lower the learning rate")
