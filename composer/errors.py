"""The project's error hierarchy.

    ComposerError
    ├── ConfigError            a model / training configuration is wrong (nothing was built)
    │   ├── InvalidParameter   a value breaks a rule
    │   └── MissingParameter   a required value is absent
    ├── DataError              a data source is unusable (missing, empty, not UTF-8, too short)
    └── ModelError             a built model was misused (bad input tensors, bad checkpoint)
        └── CheckpointError    a weights file is unreadable, corrupt, unsafe or does not match
            └── IncompatibleVersion   written by a newer, incompatible format version

A ConfigError carries every problem found, each with the full config path, the offending
value, the rule it breaks and the fix, so one run shows all of them.
"""

from __future__ import annotations

from dataclasses import dataclass


class ComposerError(Exception):
    """Base class of every error this project raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where, what, which rule, how to fix."""

    path: str
    message: str
    fix: str = ""
    missing: bool = False

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text}. Fix: {self.fix}" if self.fix else text


class ConfigError(ComposerError):
    """A configuration is invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem] | str, *, header: str = "invalid configuration"):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems, self.header = list(problems), header
        if len(self.problems) == 1:
            text = f"{header}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{header} ({len(self.problems)} problems):\n{lines}"
        super().__init__(text)

    @staticmethod
    def of(problems: list[Problem], header: str = "invalid configuration") -> ConfigError:
        """The most specific subclass that describes all ``problems``."""
        if all(p.missing for p in problems):
            return MissingParameter(problems, header=header)
        if not any(p.missing for p in problems):
            return InvalidParameter(problems, header=header)
        return ConfigError(problems, header=header)


class InvalidParameter(ConfigError):
    """A parameter has a value that breaks a rule (type, range, cross-field constraint)."""


class MissingParameter(ConfigError):
    """A required parameter was not given."""


class DataError(ComposerError):
    """A data source cannot be used as configured."""


class ModelError(ComposerError):
    """A model was called or loaded with something it cannot accept."""


class CheckpointError(ModelError):
    """A checkpoint is unreadable, unsafe, corrupt, or does not match its config."""


class IncompatibleVersion(CheckpointError):
    """A checkpoint was written by a newer major format version than this code reads."""
