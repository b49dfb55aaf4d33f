"""Network configurations built from an estimator's parameters: every default lives once, in the estimator."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, TypeVar

Config = TypeVar("Config")


def config_from_params(config_class: type[Config], params: Mapping[str, Any], **derived: Any) -> Config:
    """The dataclass ``config_class`` with its fields taken from ``params`` (an estimator's ``get_params()``; other
    keys are ignored), then from ``derived``: what ``fit`` works out from the data (channel count, classes)."""
    names = {field.name for field in fields(config_class)}
    return config_class(**{**{k: v for k, v in params.items() if k in names}, **derived})
