"""Argument checks the public faces share: a number is a real number (not a bool, not NaN or
Inf) in its range, and the message names the argument and what it got."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional


def check_number(name: str, value: Any, *, minimum: Optional[float] = None, above: Optional[float] = None,
                 maximum: Optional[float] = None, integer: bool = False, owner: str = "") -> Any:
    """``value`` when it is a finite real number (an integer with ``integer``) with ``minimum <= value``,
    ``above < value`` and ``value <= maximum`` as given; else a ``TypeError`` (not a number) or a
    ``ValueError`` (non-finite, out of range) that names ``name``."""
    prefix = f"{owner}: " if owner else ""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{prefix}{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{prefix}{name} must be finite, got {value}")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{prefix}{name} must be in [{minimum}, {maximum}], got {value}")
    bounds = []
    if minimum is not None and value < minimum:
        bounds.append(f">= {minimum}")
    if above is not None and not value > above:
        bounds.append("positive" if above == 0 else f"> {above}")
    if maximum is not None and value > maximum:
        bounds.append(f"<= {maximum}")
    if bounds:
        raise ValueError(f"{prefix}{name} must be {' and '.join(bounds)}, got {value}")
    return value
