"""Presses by name, as the command line and benchmarks spell them: ``full``, ``h2o``, ``l2``, ``namm:<file>``."""

from __future__ import annotations

from memorycore.errors import InputError
from memorycore.namm.press import DEFAULT_INTERVAL, H2OPress, L2NormPress, Press
from memorycore.namm.scorer import BAMScorer, NAMMPress

PRESSES = ("full", "h2o", "l2", "namm")


def make_press(spec: str, *, budget: float | None = None, interval: int = DEFAULT_INTERVAL) -> Press | None:
    """The press named by ``spec``; None for ``full`` (no eviction).

    Parameters
    ----------
    spec : str
        ``full``, ``h2o``, ``l2`` or ``namm:<scorer.safetensors>``.
    budget : float, optional
        Kept share of the cache in (0, 1] for ``h2o`` and ``l2`` (required there), and for a NAMM scorer evolved for
        a budget (``fit_namm(budget=)``: it ranks the entries); a scorer evolved without one decides by itself.
    interval : int, default 512
        Tokens between evictions.
    """
    if not isinstance(spec, str):
        raise InputError(f"a press is named by a string ({', '.join(PRESSES)}), got {type(spec).__name__}")
    name, _, argument = spec.strip().partition(":")
    name = name.lower()
    if name not in PRESSES:
        raise InputError(f"unknown press {spec!r}; pick one of full, h2o, l2, namm:<scorer file>")
    if name == "namm":
        if not argument:
            raise InputError("the namm press needs its scorer file: namm:<path to the .safetensors fit_namm wrote>")
        scorer = BAMScorer.load(argument)  # one evolved for a budget press ranks entries at `budget`
        return NAMMPress(scorer, budget=budget if scorer.budget is not None else None, interval=interval)
    if argument:
        raise InputError(f"press {name!r} takes no ':' argument, got {spec!r}")
    if name == "full":
        return None
    if budget is None:
        raise InputError(f"press {name!r} needs a budget: the share of the cache to keep, in (0, 1] (e.g. 0.25)")
    return (H2OPress if name == "h2o" else L2NormPress)(budget, interval=interval)
