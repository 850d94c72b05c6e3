"""Loading configs: the packaged Hydra config tree, composed from any working directory.

    cfg = load_config(["model=llama3_8b", "model.num_layers=4"])

Hydra's and OmegaConf's own errors (a preset that does not exist, a misspelt key, a value of
the wrong type, a malformed override) come back as :class:`~composer.errors.ConfigError`
naming the key and the fix.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable, Sequence
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


def _with_search_path(overrides: list[str], config_dirs: Iterable[str | Path]) -> list[str]:
    """``overrides`` with ``config_dirs`` put first on ``hydra.searchpath``, merged with a searchpath the
    overrides give (two overrides of it would keep only the last: composer-train's experiments folder
    would hide the user's ``--config-dir``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # late: only composing needs Hydra
    from hydra.errors import HydraException  # late: only composing needs Hydra (0.3 s)

    dirs = [Path(d).expanduser().resolve() for d in config_dirs]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(
                [Problem("config_dir", f"{d} is not a directory", "pass an existing folder of YAML configs")]
            )
    if not dirs:
        return overrides
    paths, rest = [f"file://{d}" for d in dirs], []
    for o in overrides:
        if o.partition("=")[0].lstrip("+") != "hydra.searchpath":
            rest.append(o)
            continue
        try:
            given = OverridesParser.create().parse_override(o).value()
        except HydraException:
            return overrides + ["hydra.searchpath=[" + ",".join(paths) + "]"]  # malformed: composing names it
        paths += [p for p in given or [] if isinstance(p, str) and p not in paths]
    quoted = ",".join("'" + p.replace("'", "\\'") + "'" for p in paths)  # Hydra's quoting
    return rest + [f"hydra.searchpath=[{quoted}]"]


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
    sweeper, the run dir); raises ConfigError on any composition problem, with every override that fails
    named (its ``remaining`` attribute: the overrides that did not). Imports Hydra, not torch.
    """
    rest, problems = [str(o) for o in overrides], []
    for _ in range(len(rest) + 1):
        try:
            cfg = _compose(rest, config_name, config_dirs, return_hydra_config)
        except ConfigError as exc:
            culprit = _failing_override(exc, rest)
            if culprit is not None and _new_option_of_switched_type(exc, culprit, rest):
                rest[rest.index(culprit)] = "+" + culprit  # the new type's option: the schema checks it
                continue
            problems += [p for p in exc.problems if p not in problems]
            if culprit is None:
                raise _with_remaining(ConfigError.of(problems, exc.header), rest) from None
            rest.remove(culprit)  # compose without it: the other overrides' problems are reported too
            continue
        if problems:
            raise _with_remaining(ConfigError.of(problems), rest)
        return cfg
    raise _with_remaining(ConfigError.of(problems), rest)


def with_model_problems(
    exc: ConfigError, check: Callable[[Any], Any], config_name: str = "train", config_dirs: Iterable = ()
) -> ConfigError:
    """``exc`` (overrides that failed to compose) with the problems ``check`` finds in the config composed
    from the other overrides, when some of them set ``model.*``: every problem of a command line at once.
    A lone misspelt key is returned as it is (no model check: reported before torch is imported)."""
    rest = getattr(exc, "remaining", [])
    if not any(o.lstrip("+~").startswith("model") for o in rest):
        return exc
    try:
        check(load_config(rest, config_name, config_dirs))
    except ConfigError as more:
        return ConfigError.of([*exc.problems, *(p for p in more.problems if p not in exc.problems)])
    return exc


def _with_remaining(exc: ConfigError, rest: list[str]) -> ConfigError:
    exc.remaining = list(rest)
    return exc


def _new_option_of_switched_type(exc: ConfigError, culprit: str, overrides: list[str]) -> bool:
    """``model.ffn.num_experts=8`` beside ``model.ffn.type=moe``: an option the preset's old type did not have
    (Hydra knows no such key) of a component whose type the overrides change."""
    if exc.problems[0].message != "no such key" or culprit.startswith(("+", "~")):
        return False
    m = re.match(r"model\.(\w+)\.\w+=", culprit)
    return bool(m) and any(o.lstrip("+").startswith(f"model.{m.group(1)}.type=") for o in overrides)


def _failing_override(exc: ConfigError, overrides: list[str]) -> str | None:
    """The override a composition error names (None: a config file's own problem, or not one override)."""
    if exc.header != "invalid configuration" or len(exc.problems) != 1:
        return None
    where = exc.problems[0].path
    for o in overrides:
        key = o.partition("=")[0].lstrip("+~")
        if key and (where == key or where.startswith(key + ".")):
            return o
    return None


def _compose(
    overrides: list[str], config_name: str, config_dirs: Iterable, return_hydra_config: bool, hints: bool = True
) -> Any:
    import yaml  # late: only composing reads YAML
    from hydra import compose as hydra_compose  # late: only composing needs Hydra (0.3 s)
    from hydra import initialize_config_dir  # late: only composing needs Hydra (0.3 s)
    from hydra.core.global_hydra import GlobalHydra  # late: only composing needs Hydra (0.3 s)
    from hydra.errors import HydraException  # late: only composing needs Hydra (0.3 s)
    from hydra.initialize import get_gh_backup, restore_gh_from_backup  # late: only composing needs Hydra (0.3 s)
    from omegaconf.errors import OmegaConfBaseException  # late: only composing needs OmegaConf

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="composer"):
            try:
                return hydra_compose(
                    config_name,
                    overrides=_with_search_path(overrides, config_dirs),
                    return_hydra_config=return_hydra_config,
                )
            except (HydraException, OmegaConfBaseException, TypeError, ValueError) as exc:  # Type/ValueError:
                raise _wrap(exc, overrides, config_name, config_dirs, hints) from None  # Hydra's, on odd options
            except yaml.YAMLError as exc:  # a config file that is not YAML
                raise _yaml_error(exc) from None
    finally:
        restore_gh_from_backup(backup)


def _yaml_error(exc: Exception) -> ConfigError:
    """A YAML syntax error as the file, line and column it is at (PyYAML's marks count from 0)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "config file"
    context, opened = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and opened is not None and opened is not mark:
        context = f"{context} opened at line {opened.line + 1}, column {opened.column + 1}:"
    what = " ".join(str(x) for x in (context, getattr(exc, "problem", None)) if x)
    return ConfigError(
        [Problem(where, f"is not valid YAML ({what or type(exc).__name__})", "fix the syntax at that line")],
        header="cannot read a config file",
    )


def _siblings(key: str, overrides: list[str], config_name: str, config_dirs: Iterable) -> list[str]:
    """Keys next to ``key`` in the config composed without the failing override."""
    from omegaconf import OmegaConf  # late: only composing needs OmegaConf

    choices = [o for o in overrides if re.fullmatch(r"[\w/\-]+=[\w\-]+", o)]  # group=option only
    try:  # the presets chosen (model=gpt2), without the other overrides (more of them may fail)
        cfg = _compose(choices, config_name, config_dirs, False, hints=False)  # no hints of hints: no recursion
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
                _compose([override], config_name, config_dirs, False)
        except (HydraException, ConfigError):
            return override
    return ""


def _wrap(
    exc: Exception, overrides: list[str], config_name: str, config_dirs: Iterable, hints: bool = True
) -> ConfigError:
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
        siblings = _siblings(key, overrides, config_name, config_dirs) if hints else []
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


__all__ = ["conf_dir", "load_config", "split_overrides", "to_container", "with_model_problems"]
