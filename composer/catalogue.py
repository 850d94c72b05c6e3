"""The component catalogue: every registered name with its options, defaults and summary.

``composer-components`` prints it; ``component_yaml`` writes the YAML file of a component
(``conf/model/<family>/<name>.yaml``) from its config dataclass, so the files and the
schema cannot drift apart (a test compares them).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from rich.console import Console
from rich.table import Table

from .registry import FAMILIES, Entry
from .schema import _type_name


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    help: str


def options(entry: Entry) -> list[OptionInfo]:
    """The YAML options of a component (its config fields, ``type`` excluded)."""
    hints = typing.get_type_hints(entry.config)
    out = []
    for f in dataclasses.fields(entry.config):
        if f.name == "type":
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "???"
        out.append(OptionInfo(f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return out


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def component_yaml(family: str, name: str) -> str:
    """The config-group file for component ``name`` of ``family``."""
    entry = FAMILIES[family].get(name)
    lines = [
        f"# {entry.description}",
        f"# Options of {family} '{name}' (generated from {entry.config.__qualname__}; null = inherit or derive).",
        f"type: {name}",
    ]
    for opt in options(entry):
        lines.append(
            f"{opt.name}: {_yaml_value(opt.default)}  # {opt.help}"
            if opt.help
            else f"{opt.name}: {_yaml_value(opt.default)}"
        )
    return "\n".join(lines) + "\n"


# families that are a string option of the model, not a config group (no conf/model/<family>/)
NO_GROUP = ("block",)


def selectors(family: str) -> list[str]:
    """How a command line selects a component of ``family`` (``<name>`` stands for its name)."""
    if family in NO_GROUP:
        return [f"model.{family}=<name>", f"model.{family}={{type: <name>, <option>: ...}}"]
    return [f"model/{family}=<name>", f"model.{family}.type=<name>"]


def catalogue() -> dict[str, list[Entry]]:
    return {family: reg.entries() for family, reg in FAMILIES.items()}


def render(family: str | None = None) -> None:
    """Print the catalogue (one table per family) with rich."""
    console = Console()
    for fam, entries in catalogue().items():
        if family and fam != family:
            continue
        table = Table(title=f"{fam}  ({' / '.join(selectors(fam))})", show_lines=True, title_justify="left")
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description")
        table.add_column("options (default)")
        for e in entries:
            opts = "\n".join(
                f"{o.name}: {o.type} = {_yaml_value(o.default)}" + (f"  [dim]{o.help}[/dim]" if o.help else "")
                for o in options(e)
            )
            table.add_row(e.name, e.description, opts or "[dim]none[/dim]")
        console.print(table)
