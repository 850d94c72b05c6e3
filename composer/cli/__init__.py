"""Command-line tools. Each prints a ComposerError's message and exits 2 (no traceback unless
HYDRA_FULL_ERROR=1); an interrupted tool exits 130."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from ..config import to_container
from ..errors import ComposerError, ConfigError, Problem

log = logging.getLogger("composer")


def run(
    main: Callable[[list[str]], int | None],
    argv: list[str] | None = None,
    prog: str | None = None,
    interrupted: str = "interrupted",
) -> int:
    """Call ``main(argv)``; turn project errors into a message on stderr (``error: ...``, or
    ``<prog>: ...`` when given) and exit status 2; an interrupt prints ``interrupted`` and exits 130."""
    argv = sys.argv[1:] if argv is None else argv
    lead = f"{prog}: " if prog else ""
    try:
        return int(main(argv) or 0)
    except ComposerError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{lead or 'error: '}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(lead + interrupted, file=sys.stderr)
        return 130


def take_config_dirs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``--config-dir DIR`` / ``-cd DIR`` / ``--config-dir=DIR`` out of argv."""
    dirs, rest, it = [], [], iter(argv)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            value = next(it, None)
            if value is None:
                raise ComposerError(f"{arg} needs a folder: {arg} path/to/configs")
            dirs.append(value)
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return dirs, rest


def parse_value(
    key: str, text: str, kind: Callable[[str], Any], what: str, header: str = "invalid configuration"
) -> Any:
    """``kind(text)`` for the ``key=text`` argument of a tool; a ConfigError ``key: 'text' is not <what>``
    (fix: ``write key=<what>``) when ``kind`` raises ValueError."""
    try:
        return kind(text.strip())
    except ValueError:
        raise ConfigError([Problem(key, f"{text!r} is not {what}", f"write {key}=<{what}>")], header=header) from None


def drop_leftovers(cfg: Any, overrides: list[str]) -> Any:
    """``cfg`` without the options its preset set for a component whose type an override replaces
    (:func:`composer.schema.leftover_options`), with a note naming them. Hydra cannot delete them with
    ``~key`` overrides (it refuses to delete a null), so the precheck and the task both call this."""
    if not any(re.match(r"\+?model\.\w+\.type=", o) for o in overrides):  # cheap: before importing torch
        return cfg
    from ..schema import leftover_options  # late: the component registry needs torch (2 s); rarely needed

    try:
        found = leftover_options(to_container(cfg.model), overrides)
    except OmegaConfBaseException:
        return cfg  # an interpolation that fails: check_job names it
    for slot, key in found:
        with open_dict(cfg.model[slot]):
            del cfg.model[slot][key]
    if found:
        names = ", ".join(f"model.{slot}.{key}" for slot, key in found)
        log.info("the component type changed: dropped the preset's options the new type does not have (%s)", names)
    return cfg
