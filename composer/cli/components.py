"""composer-components: the catalogue of registered components, their options and defaults.

composer-components                 every family
composer-components attention       one family
composer-components --yaml ffn/moe  the config-group file of one component
"""

from __future__ import annotations

import sys

from ..catalogue import component_yaml, render
from ..errors import ConfigError, Problem
from ..registry import FAMILIES
from . import run


def main_(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if argv and argv[0] == "--yaml":
        family, _, name = (argv[1] if len(argv) > 1 else "").partition("/")
        if family not in FAMILIES or not name:
            raise ConfigError(
                [
                    Problem(
                        "--yaml",
                        f"expected <family>/<name>, got {argv[1:]!r}",
                        f"families: {', '.join(FAMILIES)}; e.g. --yaml attention/gqa",
                    )
                ]
            )
        print(component_yaml(family, name), end="")
        return 0
    family = argv[0] if argv else None
    if family is not None and family not in FAMILIES:
        raise ConfigError([Problem("family", f"unknown family {family!r}", f"use one of {', '.join(FAMILIES)}")])
    render(family)
    return 0


def main() -> None:
    sys.exit(run(main_))


if __name__ == "__main__":
    main()
