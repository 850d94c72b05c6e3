"""The option toolkit of component configs: ``option`` fields, the ``Checker`` their ``resolve`` hooks
report to, inherited values, and the small checks every layer of the project shares.

    @dataclass
    class MyAttentionConfig(ComponentConfig):
        num_heads: Optional[int] = option(None, help="query heads (null: model.num_heads)", min=1)

        def resolve(self, model, check: Checker) -> None:
            inherit(self, "num_heads", model.num_heads)
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Iterable
from dataclasses import field
from typing import Any

from ..errors import Problem

log = logging.getLogger("composer")

IGNORE_INDEX = -100  # labels with this value (padding, prompts) do not count in any loss


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with a one-line ``help`` and optional ``choices`` / ``min`` / ``max``
    / ``family`` (the registry of a nested component) / ``inherit`` (null takes this model field)
    / ``finite`` (False: the float may be inf or nan; every other float option must be finite)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda d=default: type(d)(d)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(**kwargs)


class Checker:
    """Collects problems under a config path; passed to each config's ``resolve`` hook."""

    def __init__(self, path: str, problems: list[Problem]):
        self.path = path
        self.problems = problems

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem(self.at(name), message, fix))

    def missing(self, name: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem(self.at(name), message, fix, missing=True))

    def warn(self, name: str, message: str) -> None:
        log.warning("%s: %s", self.at(name), message)

    def child(self, name: str) -> Checker:
        return Checker(self.at(name), self.problems)


def check_probability(cfg: Any, name: str, check: Checker) -> None:
    """A dropout-like option must lie in [0, 1) (inherited values were checked where they came from)."""
    value = getattr(cfg, name)
    if value is not None and name not in cfg.__dict__.get("_inherited", ()) and not 0.0 <= value < 1.0:
        check.fail(name, f"{value} is outside [0, 1)", "use a probability like 0.1")


def inherit(cfg: Any, name: str, value: Any) -> None:
    """Set ``cfg.name = value`` if it is None, remembering it was inherited (saved as null)."""
    if getattr(cfg, name) is None:
        setattr(cfg, name, value)
        inherited = cfg.__dict__.setdefault("_inherited", set())
        inherited.add(name)


# --------------------------------------------------------------------------- shared small checks
def is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """An int or float that is not a bool and not inf / nan."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f"did you mean '{close[0]}'? " if close else ""
