"""The console scripts' entry points, in a module whose name nothing else owns, so that they can say what
is wrong when the import name ``composer`` does not reach this project's package:

- a folder named ``composer`` (a clone of this project, say) in the current directory or beside a script
  is a namespace package that hides an editable install (``ImportError ... from 'composer' (unknown
  location)``);
- MosaicML Composer (the ``mosaicml`` distribution, which llm-foundry installs) owns the same import name.

Each entry point checks where ``composer`` resolves before importing it, and exits 2 with the reason and
the fix. (``import composer`` from your own scripts cannot be intercepted; ``check_import_name()`` gives
the same diagnosis: ``python -c "import transformer_composer as t; t.check_import_name()"``.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

OURS = Path(__file__).resolve().parent / "composer" / "__init__.py"
MOSAICML = "mosaicml"


def import_name_problem() -> Optional[str]:
    """Why ``import composer`` would not import this project's package (None when it would)."""
    spec = importlib.util.find_spec("composer")
    if spec is not None and spec.origin and Path(spec.origin).resolve() == OURS:
        return None
    if spec is None:
        return "the package 'composer' is not importable: reinstall with `pip install -e .` in the clone"
    if spec.origin is None:  # a namespace package: a folder named composer without __init__.py
        where = ", ".join(str(p) for p in (spec.submodule_search_locations or []))
        return (
            f"the import name 'composer' resolves to the folder {where}, not to the package (a folder named "
            "'composer', e.g. a clone of this project, in the current directory or beside your script hides "
            f"the installed package at {OURS.parent}). Fix: run from another folder, or rename the clone "
            "(git clone <url> transformer-composer), or reinstall with "
            "`pip install -e . --config-settings editable_mode=compat` (the Makefile's way), which the folder "
            "cannot hide"
        )
    other = _owner(Path(spec.origin))
    return (
        f"the import name 'composer' resolves to {spec.origin}"
        + (f", which belongs to {other}" if other else ", which is not this project's package")
        + f" (this project's is {OURS.parent}). MosaicML Composer uses the same import name; the two cannot "
        "share an environment. Fix: use a separate virtual environment for transformer-composer "
        "(python -m venv .venv && .venv/bin/pip install -e .), or `pip uninstall mosaicml` here"
    )


def _owner(origin: Path) -> Optional[str]:
    """The installed distribution that ships ``origin`` ("mosaicml 0.x"), if one says so."""
    for name in (MOSAICML,):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if Path(dist.locate_file(f)).resolve() == origin.resolve():
                return f"{name} {dist.version} (MosaicML Composer)"
    return None


def check_import_name() -> None:
    """Exit 2 with the reason and the fix when ``composer`` is not this project's package."""
    problem = import_name_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def _entry(module: str, function: str = "main"):
    def run() -> Any:  # what the tool's main returns (an exit status, or None)
        check_import_name()
        return getattr(importlib.import_module(module), function)()

    run.__name__ = f"{module.rsplit('.', 1)[-1]}_{function}"
    return run


plan = _entry("composer.cli.plan")
components = _entry("composer.cli.components")
prepare = _entry("composer.prepare")
train = _entry("composer.train")
import_hf = _entry("composer.cli.convert", "main_import")
export_hf = _entry("composer.cli.convert", "main_export")
generate = _entry("composer.cli.generate")
report = _entry("composer.report")
