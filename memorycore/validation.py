"""Parameter validation: each estimator declares its parameters' constraints in one table, one function checks it.

As scikit-learn's ``_parameter_constraints``: a table maps a parameter's name to the list of what it may be (any one
suffices), and :func:`check_params` raises :class:`~memorycore.errors.InputError` naming the first parameter that
fits none. Constraints between parameters (``d_model`` divisible by ``heads``) stay as code beside the table.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from memorycore.errors import InputError


@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (``numbers.Integral`` or ``numbers.Real``; never a bool) between ``low`` and ``high``
    (None: unbounded); ``closed`` says which ends belong: "both", "left", "right" or "neither". Reals must be finite."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if self.kind is not numbers.Integral and not math.isfinite(value):
            return False
        low_ok = self.low is None or value > self.low or (value == self.low and self.closed in ("both", "left"))
        high_ok = self.high is None or value < self.high or (value == self.high and self.closed in ("both", "right"))
        return low_ok and high_ok

    def describe(self) -> str:
        if self.kind is numbers.Integral and self.high is None:
            low = self.low if self.closed in ("both", "left") else self.low + 1
            return "a positive integer" if low == 1 else f"an integer >= {low}"
        if self.high is None:
            return f"a finite number {'>=' if self.closed in ('both', 'left') else '>'} {self.low}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


@dataclass(frozen=True)
class Options:
    """One of the given values."""

    values: tuple

    def __init__(self, *values: Any) -> None:
        object.__setattr__(self, "values", values)

    def accepts(self, value: Any) -> bool:
        return any(isinstance(value, type(option)) and value == option for option in self.values)

    def describe(self) -> str:
        if len(self.values) == 1:
            return repr(self.values[0])
        return f"one of {', '.join(map(str, self.values))}"


POSITIVE_INT = Interval(numbers.Integral, 1)
NON_NEGATIVE_INT = Interval(numbers.Integral, 0)
POSITIVE = Interval(numbers.Real, 0, None, "neither")  # a learning rate
NON_NEGATIVE = Interval(numbers.Real, 0, None, "left")  # a weight decay
FRACTION = Interval(numbers.Real, 0, 1, "left")  # dropout, a held-out share: [0, 1)
# the parameters every estimator's training takes
TRAINING_CONSTRAINTS = {"lr": [POSITIVE], "weight_decay": [NON_NEGATIVE], "dropout": [FRACTION],
                        "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT], "patience": [POSITIVE_INT, None]}


def check_params(params: Mapping[str, Any], constraints: Mapping[str, Sequence[Any]]) -> None:
    """Raise InputError for the first parameter of ``params`` that fits none of its ``constraints``.

    A constraint is an :class:`Interval`, :class:`Options`, or None (the value None is allowed). Parameters without an
    entry are not checked.

    Examples
    --------
    >>> check_params({"epochs": 5}, {"epochs": [POSITIVE_INT]})
    >>> check_params({"epochs": 0}, {"epochs": [POSITIVE_INT, None]})
    Traceback (most recent call last):
    ...
    memorycore.errors.InputError: epochs must be a positive integer or None, got 0
    """
    for name, allowed in constraints.items():
        if name not in params:
            continue
        value = params[name]
        if not any(value is None if rule is None else rule.accepts(value) for rule in allowed):
            wanted = " or ".join("None" if rule is None else rule.describe() for rule in allowed)
            raise InputError(f"{name} must be {wanted}, got {value!r}")


def check_positive(**values: Any) -> None:
    """Raise InputError unless every keyword is a positive integer (a bool is not)."""
    check_params(values, {name: [POSITIVE_INT] for name in values})


def head_width(dim: int, heads: int, width: int | None, name: str) -> int:
    """The width of each head of a layer: ``width``, or ``dim // heads`` when None (``dim`` must then be divisible by
    ``heads``); ``name`` is the layer's argument for it, named in the error."""
    if width is None:
        if dim % heads:
            raise InputError(f"dim={dim} is not divisible by heads={heads}; pick heads that divide dim or set {name}")
        width = dim // heads
    check_positive(**{name: width})
    return width
