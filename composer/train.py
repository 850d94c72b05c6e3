"""``composer-train``: the Hydra app that trains a composed model (also ``python -m composer.train``).

    composer-train                                        # tiny model, recall task, this machine
    composer-train model=gpt2 data=text data.path=input.txt trainer=gpu
    composer-train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # resume exactly
    composer-train -m model/attention=mha,gqa seed=1,2                    # a sweep, one folder per run

A run's folder (Hydra's run dir) receives ``.hydra/``, ``metrics.csv``, ``metrics.json``,
``checkpoints/{last,best-...}.ckpt`` and ``model/`` (``save_pretrained``). Everything is validated
before training starts; a ComposerError prints one message and exits with status 2 (full
traceback with HYDRA_FULL_ERROR=1). In a sweep a failing run is recorded as failed in its
metrics.json and the sweep goes on; the task returns ``metrics[optimized_metric]`` to sweepers
(None for a failed run: Optuna records a failed trial; a NaN would stop its sweep).

This module is the command line only (Hydra's app, the pre-checks of a sweep, the experiments
search path); the run itself is :mod:`composer.run`, imported once the config has composed.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import read_write

from .config import EXPERIMENTS_ENV, conf_dir, load_config
from .errors import ComposerError, ConfigError, Problem
from .summary import RunRecord, write_metrics

log = logging.getLogger(__name__)
MAX_PRECHECKED_JOBS = 64  # sweeps larger than this compose only their first jobs up front
# what Lightning's DDP launcher sets in the launching process's environment
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")


# ----------------------------------------------------------------------------- before Hydra starts
def _normalise(argv: list[str]) -> list[str]:
    # experiment is a defaults-list group (null by default): "+experiment=x" means "experiment=x"
    return [a[1:] if a.startswith("+experiment=") else a for a in argv]


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a sweep's jobs (choice / range sweeps; sampled intervals left out)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError([Problem("", str(exc).splitlines()[0], "check the override syntax (key=value)")]) from None
    choices = []
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
        elif o.is_choice_sweep() or o.is_range_sweep():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_PRECHECKED_JOBS)]


def precheck(argv: list[str]) -> None:
    """Compose the config of the run (each job of a sweep) before Hydra starts, so a bad override
    is one ConfigError instead of Hydra's trace. Values are checked later, per run."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.cfg:
        return
    config_dirs = [args.config_dir] if args.config_dir else []
    name = args.config_name or "train"
    jobs = _sweep_jobs(args.overrides) if args.multirun else [args.overrides]
    for job in jobs:
        load_config(job, name, config_dirs)


def experiments_dir() -> Optional[Path]:
    """The experiments root that composer-train puts on the config search path: ``$COMPOSER_EXPERIMENTS``
    if set, else the checkout's ``experiments/`` (beside ``conf/``); None when there is none (a wheel).

    It is a config root like ``--config-dir``: ``<root>/experiment/<name>.yaml`` is ``experiment=<name>``.
    """
    env = os.environ.get(EXPERIMENTS_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(
                [
                    Problem(
                        EXPERIMENTS_ENV,
                        f"{path} is not a directory",
                        "point it at a folder holding experiment/<name>.yaml, or unset it",
                    )
                ]
            )
        return path
    path = conf_dir().parent / "experiments"
    return path if (path / "experiment").is_dir() else None


def with_experiments(argv: list[str]) -> list[str]:
    """``argv`` with :func:`experiments_dir` appended to ``hydra.searchpath`` (once; the user's entries
    kept), placed among the overrides so that Hydra's argument parser accepts it anywhere."""
    root = experiments_dir()
    if root is None:
        return argv
    entry = f"file://{root}"
    try:
        overrides = get_args_parser().parse_args(argv).overrides
    except SystemExit:
        return argv  # malformed command line: Hydra reports it
    given = [i for i, a in enumerate(argv) if a in overrides and a.partition("=")[0] == "hydra.searchpath"]
    paths: list = []
    if given:
        try:
            paths = list(OverridesParser.create().parse_override(argv[given[-1]]).value() or [])
        except HydraException:
            return argv  # malformed: precheck names it
        if not all(isinstance(p, str) for p in paths) or entry in paths:
            return argv
    quoted = ",".join("'" + p.replace("'", "\\'") + "'" for p in [*paths, entry])  # Hydra's quoting
    item = f"hydra.searchpath=[{quoted}]"
    argv = list(argv)
    if given:
        argv[given[-1]] = item
    else:  # right after the last override (argparse takes the overrides as one run of positionals)
        last = max((i for i, a in enumerate(argv) if a in overrides), default=-1)
        argv.insert(last + 1, item)
    return argv


def _single_run_argv(hydra_cfg: Any) -> list[str]:
    """The command line of this one job (for Lightning's DDP launcher, which re-runs the command
    in each new process): the job's own overrides, no -m, in the job's folder."""
    args = get_args_parser().parse_args(sys.argv[1:])
    flags = []
    for flag, value in (("--config-dir", args.config_dir), ("--config-name", args.config_name)):
        if value:
            flags += [flag, value]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    return [sys.argv[0], *flags, *hydra_cfg.overrides.task]


def _fail(exc: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def check_launcher(trainer: Any, launcher: Any) -> None:
    """Lightning's DDP launcher starts ranks > 0 by re-running this process's command: in a job of
    a worker-process launcher (joblib, submitit_local) that command is the worker's, not
    composer-train's. ConfigError for that combination (SLURM starts every rank itself: fine)."""
    strategy = str(trainer.get("strategy", ""))
    devices = trainer.get("devices", 1)
    one = devices in (1, "1") or (isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1)
    target = str((launcher or {}).get("_target_", ""))
    if strategy.startswith("ddp") and not one and any(k in target for k in ("joblib", "LocalLauncher")):
        raise ConfigError(
            [
                Problem(
                    "hydra.launcher",
                    f"{target.rsplit('.', 1)[-1]} runs each job in a worker process, "
                    f"which Lightning cannot re-run for trainer.strategy={strategy} on "
                    f"trainer.devices={devices}",
                    "drop hydra/launcher (the default launcher runs "
                    "DDP jobs one after another), use hydra/launcher=slurm, or trainer.devices=1",
                )
            ]
        )


def _task(cfg: Any) -> Optional[float]:
    """The Hydra task: one run in Hydra's run dir (or the sweep job's dir)."""
    from .run import train  # late: the run's half (Lightning: seconds to import) loads once the config composed

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    # Lightning's DDP launcher leaves its variables in this process's environment; a sweep's
    # next job must find the environment as it was, or it would not launch its own processes
    saved_env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    if multirun and str(cfg.trainer.get("strategy", "")).startswith("ddp"):
        sys.argv = _single_run_argv(hc)
    try:
        if multirun:
            check_launcher(cfg.trainer, hc.launcher)
        record = train(cfg, hc.runtime.output_dir, overrides)
    except (Exception, KeyboardInterrupt) as exc:
        if multirun and not isinstance(exc, KeyboardInterrupt):
            _job_failed(exc, hc, overrides, cfg.get("seed"))
            return None  # recorded in its metrics.json; the sweep goes on (Optuna: a failed trial)
        if isinstance(exc, ComposerError):
            _fail(exc)
        raise
    finally:
        if multirun:
            _restore_env(saved_env)
    return _sweeper_value(record, str(cfg.get("optimized_metric", "best_val_loss")), multirun)


def _job_failed(exc: BaseException, hc: Any, overrides: list[str], seed: Any) -> None:
    """A sweep job's error on stderr and, when it failed before train() began, in its metrics.json."""
    print(f"error in job {hc.job.num} ({' '.join(overrides)}): {exc}", file=sys.stderr)
    run_dir = Path(hc.runtime.output_dir)
    if not (run_dir / "metrics.json").exists():
        record = RunRecord(status="failed", error=str(exc), overrides=overrides, seed=seed)
        record.error_type = type(exc).__name__
        write_metrics(run_dir, record)


def _restore_env(saved: dict[str, Optional[str]]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _sweeper_value(record: dict, name: str, multirun: bool) -> Optional[float]:
    """``record[name]`` for the sweeper; None when the run has no such number."""
    value = record.get(name)
    if isinstance(value, (int, float)):
        return float(value)
    if multirun:  # e.g. an accuracy on a task without one: Optuna records a failed trial
        log.warning("optimized_metric=%s has no value in this run's metrics.json", name)
    return None


def _external_rank() -> int:
    """This process's global rank when torchrun or SLURM launched it (0 otherwise)."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _quiet_lightning() -> None:

    # the run dir already holds .hydra/ when the CSV logger starts; metrics.csv is new either way
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``composer-train``."""
    argv = _normalise(list(sys.argv[1:] if argv is None else argv))
    if _external_rank() > 0:  # torchrun / SLURM started this process: only rank 0 writes .hydra/
        argv.append("hydra.output_subdir=null")
    try:
        argv = with_experiments(argv)
        precheck(argv)
    except ComposerError as exc:
        _fail(exc)
    sys.argv = [sys.argv[0], *argv]
    _quiet_lightning()
    hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)(_task)()


if __name__ == "__main__":
    main()
