"""Network configurations built from an estimator's parameters: every default lives once, in the estimator."""

from __future__ import annotations

import ast
import functools
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

Config = TypeVar("Config")


def config_from_params(config_class: type[Config], params: Mapping[str, Any], **derived: Any) -> Config:
    """The dataclass ``config_class`` with its fields taken from ``params`` (an estimator's ``get_params()``; other
    keys are ignored), then from ``derived``: what ``fit`` works out from the data (channel count, classes)."""
    names = {field.name for field in fields(config_class)}
    return config_class(**{**{k: v for k, v in params.items() if k in names}, **derived})


@functools.cache
def estimator_defaults(source: str | Path, class_name: str) -> dict[str, Any]:
    """The keyword defaults of ``class_name.__init__`` in the Python file ``source``, read from its text: what a
    command line shows as its options' defaults without importing the estimator (and torch) to print ``--help``."""
    tree = ast.parse(Path(source).read_text())
    init = next(node for cls in tree.body if isinstance(cls, ast.ClassDef) and cls.name == class_name
                for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    return {arg.arg: ast.literal_eval(default) for arg, default in zip(init.args.kwonlyargs, init.args.kw_defaults)
            if default is not None}
