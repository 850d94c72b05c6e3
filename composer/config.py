"""Loading configs: the packaged Hydra config tree, composed from any working directory.

    cfg = load_config(["model=llama3_8b", "model.num_layers=4"])

Hydra's and OmegaConf's own errors (a preset that does not exist, a misspelt key, a value of
the wrong type, a malformed override) come back as :class:`~composer.errors.ConfigError`
naming the key and the fix.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .contract.options import did_you_mean
from .errors import ConfigError, Problem

EXPERIMENTS_ENV = "COMPOSER_EXPERIMENTS"


def conf_dir() -> Path:
    """The config tree: ``conf/`` beside the package in a checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "train.yaml").is_file():
        return checkout
    spec = importlib.util.find_spec("composer.conf")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "train.yaml").is_file():
                return Path(location)
    raise ConfigError("the config tree (conf/) is missing from this installation; reinstall composer")


def _search_path_overrides(config_dirs: Iterable[str | Path]) -> list[str]:
    dirs = [Path(d).expanduser().resolve() for d in config_dirs]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(
                [Problem("config_dir", f"{d} is not a directory", "pass an existing folder of YAML configs")]
            )
    if not dirs:
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]"]


def load_config(
    overrides: Sequence[str] = (),
    config_name: str = "train",
    config_dirs: Iterable[str | Path] = (),
    return_hydra_config: bool = False,
) -> Any:
    """Compose ``conf/<config_name>.yaml`` with command-line style ``overrides``.

    ``config_dirs`` adds folders to the search path, so a user's own presets
    (``my_configs/model/my_model.yaml``) are selectable as ``model=my_model``.
    Returns an OmegaConf DictConfig (with its ``hydra`` node when ``return_hydra_config``: the
    sweeper, the run dir); raises ConfigError on any composition problem. Imports Hydra, not torch.
    """
    from hydra import compose as hydra_compose  # late: only composing needs Hydra (0.3 s)
    from hydra import initialize_config_dir  # late: only composing needs Hydra (0.3 s)
    from hydra.core.global_hydra import GlobalHydra  # late: only composing needs Hydra (0.3 s)
    from hydra.errors import HydraException  # late: only composing needs Hydra (0.3 s)
    from hydra.initialize import get_gh_backup, restore_gh_from_backup  # late: only composing needs Hydra (0.3 s)
    from omegaconf.errors import OmegaConfBaseException  # late: only composing needs OmegaConf

    overrides = [str(o) for o in overrides]
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="composer"):
            try:
                return hydra_compose(
                    config_name,
                    overrides=overrides + _search_path_overrides(config_dirs),
                    return_hydra_config=return_hydra_config,
                )
            except (HydraException, OmegaConfBaseException, TypeError, ValueError) as exc:  # Type/ValueError:
                raise _wrap(exc, overrides, config_name, config_dirs) from None  # Hydra's, on odd group options
    finally:
        restore_gh_from_backup(backup)


def _siblings(key: str, overrides: list[str], config_name: str, config_dirs: Iterable) -> list[str]:
    """Keys next to ``key`` in the config composed without the failing override."""
    from omegaconf import OmegaConf  # late: only composing needs OmegaConf

    rest = [o for o in overrides if not (key + ".").startswith(o.lstrip("+~").partition("=")[0] + ".")]
    try:
        cfg = load_config(rest, config_name, config_dirs)
    except ConfigError:
        return []
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return [str(k) for k in node] if hasattr(node, "keys") else []


def _culprit(exc: Exception, overrides: list[str], config_name: str, config_dirs: Iterable) -> str:
    """The override that fails on its own (Hydra's parse errors and TypeErrors do not name it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # late: only composing needs Hydra (0.3 s)
    from hydra.errors import HydraException  # late: only composing needs Hydra (0.3 s)

    if len(overrides) == 1:
        return overrides[0]
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
            if isinstance(exc, (TypeError, ValueError)):
                load_config([override], config_name, config_dirs)
        except (HydraException, ConfigError):
            return override
    return ""


def _wrap(exc: Exception, overrides: list[str], config_name: str, config_dirs: Iterable) -> ConfigError:
    from hydra.errors import MissingConfigException, OverrideParseException  # late: only composing needs Hydra (0.3 s)

    text = str(exc)
    if isinstance(exc, (OverrideParseException, TypeError, ValueError)):
        bad = _culprit(exc, overrides, config_name, config_dirs)
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return ConfigError(
            [
                Problem(
                    bad.partition("=")[0].lstrip("+~"),
                    f"cannot apply override {bad!r} ({first})",
                    "write key=value or group=option (one option name, e.g. model=gpt2); "
                    "quote values with special characters",
                )
            ]
        )
    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or ""
        group, _, name = missing.rpartition("/")
        options = list(exc.options or [])
        if group and options:
            return ConfigError(
                [
                    Problem(
                        group.replace("/", "."),
                        f"no config named {name!r}",
                        f"{did_you_mean(name, options)}available: {', '.join(sorted(options))}",
                    )
                ]
            )
        return ConfigError(
            [Problem(missing or config_name, "config not found", "check the name and the --config-dir / search path")]
        )
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    cause = str(exc.__cause__ or "")
    if m:
        inner = re.search(r"full_key: (\S+)", cause)  # a mapping merged into a node: the key inside it
        key = inner.group(1) if inner and inner.group(1).startswith(m.group(1) + ".") else m.group(1)
        siblings = _siblings(key, overrides, config_name, config_dirs)
        hint = did_you_mean(key.rsplit(".", 1)[-1], siblings)
        return ConfigError([Problem(key, "no such key", f"{hint}to add a new key write +{key}=...")])
    m = re.search(r"full_key: (\S+)", text) or re.search(r"full_key: (\S+)", cause)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if m:
        return ConfigError([Problem(m.group(1), first, "fix the value or the override")])
    return ConfigError([Problem("", first, "check the override syntax (key=value, group=option)")])


def to_container(cfg: Any) -> Any:
    """A DictConfig as plain Python data, interpolations resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf  # late: not on `import composer` (0.2 s)

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg


def split_overrides(argv: Sequence[str], options: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Separate ``name=value`` arguments for ``options`` from Hydra overrides (for CLI tools)."""
    wanted, mine, rest = set(options), {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in wanted:
            mine[key] = value
        else:
            rest.append(arg)
    return mine, rest


__all__ = ["conf_dir", "load_config", "split_overrides", "to_container"]
