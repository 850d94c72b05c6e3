"""``composer-train``: the Hydra app that trains a composed model (also ``python -m composer.train``).

    composer-train                                        # tiny model, recall task, this machine
    composer-train model=gpt2 data=text data.path=input.txt trainer=gpu
    composer-train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # resume exactly
    composer-train -m model/attention=mha,gqa seed=1,2                    # a sweep, one folder per run

A run's folder (Hydra's run dir) receives ``.hydra/``, ``train.log``, ``metrics.csv``,
``metrics.json``, ``checkpoints/{last,best-...}.ckpt`` and ``model/`` (``save_pretrained``).

Before Hydra starts (and before torch or Lightning is imported) every job's config is composed: a
misspelt key is one line within about a second. Then each job's training and model config is
checked (every job of a sweep, before the first one runs), and a resume is checked against its
checkpoint. A ComposerError prints one message and exits with status 2 (full traceback with
HYDRA_FULL_ERROR=1); a single run that fails before training leaves no folder behind. Ctrl-C exits
130 naming the last checkpoint. ``ckpt_path=<run>/checkpoints/last.ckpt`` continues in ``<run>``
unless ``hydra.run.dir`` is given; a run that already reached ``trainer.max_steps`` says so and
exits 0 without training.

In a sweep a failing run is recorded as failed in its metrics.json and the sweep goes on; the task
returns ``metrics[optimized_metric]`` to sweepers (None for a failed run: Optuna records a failed
trial; a NaN would stop its sweep). A basic sweep with a failed job exits 1 naming the jobs and the
configurations that have no completed run (an Optuna search: only when every trial failed).

This module is the command line only (Hydra's app, the pre-checks, the experiments search path);
the run itself is :mod:`composer.run`, imported once the config has composed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
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
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from .cli import drop_leftovers
from .config import EXPERIMENTS_ENV, conf_dir, load_config, to_container, with_model_problems
from .errors import ComposerError, ConfigError, Problem
from .resume import RunFinished

log = logging.getLogger(__name__)
MAX_PRECHECKED_JOBS = 64  # sweeps larger than this compose only their first jobs up front
# what Lightning's DDP launcher sets in the launching process's environment
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")


# ----------------------------------------------------------------------------- before Hydra starts
def _normalise(argv: list[str]) -> list[str]:
    # experiment is a defaults-list group (null by default): "+experiment=x" means "experiment=x"
    return [a[1:] if a.startswith("+experiment=") else a for a in argv]


def _sweep_jobs(overrides: list[str]) -> tuple[list[list[str]], bool]:
    """The override lists of a sweep's jobs (choice / range sweeps; sampled intervals left out),
    and whether they are all of its jobs' values (False with an interval or glob)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError([Problem("", str(exc).splitlines()[0], "check the override syntax (key=value)")]) from None
    choices, complete = [], True
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
        elif o.is_choice_sweep() or o.is_range_sweep():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            complete = False
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_PRECHECKED_JOBS)], complete


def precheck(argv: list[str]) -> list[str]:
    """Check the run (each job of a sweep) before Hydra starts; returns ``argv`` (with the
    checkpoint's run folder as ``hydra.run.dir`` for a resume that names none).

    First every job's config is composed (Hydra only: a misspelt key fails here, before torch is
    imported), then its model config is resolved (torch, before Lightning is imported), then it is
    validated as its run would validate it before reading data
    (:func:`composer.train_config.check_job`): a sweep launches no job until all of them pass.
    An Optuna (or other sampling) search composes its jobs only: their values come from the sweeper."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.cfg:
        return argv
    config_dirs = [args.config_dir] if args.config_dir else []
    name = args.config_name or "train"
    try:
        jobs, complete = _sweep_jobs(args.overrides)
    except ConfigError:
        if args.multirun:
            raise
        jobs, complete = [args.overrides], True  # composing it names the override that fails
    first = drop_leftovers(_first_job(jobs[0], name, config_dirs), jobs[0])
    multirun = args.multirun or str(first.hydra.get("mode")).endswith("MULTIRUN")  # -m, or hydra.mode in a file
    _check_output_dir(first, multirun)
    if not multirun:
        jobs, complete = [args.overrides], True
    cfgs = [first] if jobs[0] == args.overrides or multirun else []
    cfgs += [
        drop_leftovers(load_config(job, name, config_dirs, return_hydra_config=True), job) for job in jobs[len(cfgs) :]
    ]
    if multirun and not (complete and _basic_sweeper(cfgs[0])):
        return argv  # the sweeper chooses the values: each job checks its own
    cfgs = [_without_hydra(c) for c in cfgs]
    _check_jobs(jobs, cfgs, _check_model, multirun)  # torch, not Lightning yet
    from .train_config import check_job  # late: the training config's checks need Lightning (seconds)

    plains = _check_jobs(jobs, cfgs, check_job, multirun)
    if multirun or plains[0].get("ckpt_path") is None:
        return argv
    return _resume_dir(argv, args.overrides, plains[0])


def _check_output_dir(cfg: Any, multirun: bool) -> None:
    """The run (or sweep) folder Hydra will make can be made: its nearest existing parent is a folder this
    process may write to (Hydra's own error would be a FileNotFoundError / PermissionError traceback)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        folder = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)).expanduser().absolute()
    except OmegaConfBaseException:
        return  # an interpolation that fails: Hydra names it
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)  # tried, then undone: Hydra makes it when the run starts
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            [Problem(key, f"cannot make {folder} ({reason})", f"set {key}=<a folder you can write to>")]
        ) from None
    finally:
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()


def _first_job(overrides: list[str], name: str, config_dirs: list) -> Any:
    """The first job composed. When overrides fail to compose and other ``model.*`` overrides were given,
    the model composed with those is checked too, so every problem of the command line is reported at once
    (a lone misspelt key is still reported before torch is imported)."""
    try:
        return load_config(overrides, name, config_dirs, return_hydra_config=True)
    except ConfigError as exc:
        raise with_model_problems(exc, _check_model, name, config_dirs) from None


def _check_model(cfg: Any) -> None:
    """The job's model config, resolved as its run will (not with init_from: the saved model's is used)."""
    from .schema import resolve_model_config  # late: the model check needs torch (2 s), Lightning not yet

    try:
        model, init_from = to_container(cfg.model), cfg.get("init_from")
    except OmegaConfBaseException:
        return  # an interpolation that fails: check_job names it
    if init_from is None:
        resolve_model_config(model)


def _check_jobs(jobs: list[list[str]], cfgs: list[Any], check: Any, multirun: bool) -> list[Any]:
    """``check(cfg)`` of every job (its results); a sweep's problems in one ConfigError."""
    if not multirun:
        return [check(cfgs[0])]
    return _check_sweep(jobs, cfgs, check)


def _resume_dir(argv: list[str], overrides: list[str], plain: dict) -> list[str]:
    """A resume is checked against its checkpoint (RunFinished when there is nothing to train) and,
    unless hydra.run.dir is given, continues in the checkpoint's own run folder."""
    from . import resume as resume_checks  # late: reading a checkpoint needs torch (imported by now)

    info = resume_checks.read_checkpoint(plain["ckpt_path"])
    resume_checks.check_resume(info, plain)
    run = resume_checks.checkpoint_run_dir(info.path)
    given = any(o.lstrip("+").partition("=")[0] == "hydra.run.dir" for o in overrides)
    return argv if run is None or given or _external_rank() > 0 else _add_override(argv, "hydra.run.dir", str(run))


def _without_hydra(cfg: Any) -> Any:
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _basic_sweeper(cfg: Any) -> bool:
    """Whether Hydra's basic sweeper runs the sweep, with no sweep parameters of its own in the config."""
    sweeper = cfg.hydra.get("sweeper") or {}
    return "BasicSweeper" in str(sweeper.get("_target_", "")) and not sweeper.get("params")


def _check_sweep(jobs: list[list[str]], cfgs: list[Any], check: Any) -> list[Any]:
    """``check(cfg)`` of every job; one ConfigError for every job whose config is invalid (the same
    problem of several jobs once)."""
    varying = _varying_keys(jobs)
    found: dict[tuple[str, str], list[int]] = {}
    results = []
    for num, (job, cfg) in enumerate(zip(jobs, cfgs, strict=True)):
        try:
            results.append(check(cfg))
        except ConfigError as exc:
            shown = " ".join(o for o in job if o.partition("=")[0] in varying and not o.startswith("seed="))
            for problem in exc.problems:
                found.setdefault((str(problem), shown), []).append(num)
    if not found:
        return results
    bad = sorted({n for nums in found.values() for n in nums})
    problems = [
        Problem(
            "", f"job{'s' if len(nums) > 1 else ''} {', '.join(map(str, nums))}{f' ({shown})' if shown else ''}: {text}"
        )
        for (text, shown), nums in found.items()
    ]
    raise ConfigError(problems, header=f"{len(bad)} of {len(jobs)} jobs of the sweep are invalid (none was started)")


def _varying_keys(jobs: list[list[str]]) -> set[str]:
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1}


def _add_override(argv: list[str], key: str, value: str) -> list[str]:
    """``argv`` with ``key=value`` (quoted as Hydra reads it) right after its last override."""
    try:
        overrides = get_args_parser().parse_args(argv).overrides
    except SystemExit:
        return argv
    item = f"{key}='" + value.replace("'", "\\'") + "'"  # Hydra's quoting (as with_experiments)
    last = max((i for i, a in enumerate(argv) if a in overrides), default=-1)
    return [*argv[: last + 1], item, *argv[last + 1 :]]


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
    run_dir = Path(hc.runtime.output_dir)
    fresh = not multirun and _is_fresh(run_dir)  # made by Hydra for this run: removed if it fails early
    # Lightning's DDP launcher leaves its variables in this process's environment; a sweep's
    # next job must find the environment as it was, or it would not launch its own processes
    saved_env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    if multirun and str(cfg.trainer.get("strategy", "")).startswith("ddp"):
        sys.argv = _single_run_argv(hc)
    try:
        if multirun:
            check_launcher(cfg.trainer, hc.launcher)
        record = train(drop_leftovers(cfg, overrides), run_dir, overrides, record_early_failure=multirun)
    except (Exception, KeyboardInterrupt) as exc:
        if multirun and not isinstance(exc, KeyboardInterrupt):
            _job_failed(exc, hc, overrides, cfg.get("seed"))
            return None  # recorded in its metrics.json; the sweep goes on (Optuna: a failed trial)
        if fresh and not (run_dir / "metrics.json").exists():  # failed before training: nothing to keep
            _remove_run_dir(run_dir, Path(str(cfg.paths.get("output_root", run_dir.parent))))
        if isinstance(exc, KeyboardInterrupt):
            _interrupted(exc)
        if isinstance(exc, ComposerError):
            _fail(exc)
        raise
    finally:
        if multirun:
            _restore_env(saved_env)
    return _sweeper_value(record, str(cfg.get("optimized_metric", "best_val_loss")), multirun)


def _is_fresh(run_dir: Path) -> bool:
    """The run folder holds only what Hydra wrote when the job started."""
    return run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}


def _remove_run_dir(run_dir: Path, root: Path) -> None:
    """Remove a failed run's folder, and the folders above it (up to ``root``) it leaves empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    root, folder = root.resolve(), run_dir.resolve().parent
    while folder == root or root in folder.parents:
        with contextlib.suppress(OSError):  # not empty (other runs), or gone
            folder.rmdir()
        if folder.exists() or folder == root:
            break
        folder = folder.parent


def _interrupted(exc: BaseException) -> None:
    print(f"composer-train: {exc or 'interrupted'}", file=sys.stderr)
    sys.exit(130)


def _job_failed(exc: BaseException, hc: Any, overrides: list[str], seed: Any) -> None:
    """A sweep job's error on stderr and, when it failed before train() began, in its metrics.json."""
    from .summary import RunRecord, write_metrics  # late: the run's half (torch) loads once the config composed

    print(f"error in job {hc.job.num} ({' '.join(overrides)}): {exc}", file=sys.stderr)
    run_dir = Path(hc.runtime.output_dir)
    if not (run_dir / "metrics.json").exists():
        record = RunRecord(status="failed", error=str(exc), overrides=overrides, seed=seed)
        record.error_type = type(exc).__name__
        write_metrics(run_dir, record)


# ----------------------------------------------------------------------------- after a sweep
class SweepOutcome(Callback):
    """Hydra callback (``hydra.callbacks.composer_outcome`` in conf/train.yaml): when a multirun
    ends, the jobs of its folder that did not complete, for :func:`main`'s exit status."""

    failed: list[dict] = []  # the last sweep's: {"num", "overrides", "error"}
    jobs = 0
    sweep = ""
    sampled = False  # an Optuna (or other sampling) search: failed trials are part of it

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweeper = str((config.hydra.get("sweeper") or {}).get("_target_", ""))
        SweepOutcome.sampled = "BasicSweeper" not in sweeper
        SweepOutcome.sweep = str(config.hydra.sweep.dir)
        SweepOutcome.jobs, SweepOutcome.failed = sweep_failures(Path(SweepOutcome.sweep))


def sweep_failures(sweep: Path) -> tuple[int, list[dict]]:
    """(job folders, the ones whose metrics.json does not say completed) of a multirun folder (its
    job folders: those holding .hydra/ or metrics.json, whatever hydra.sweep.subdir names them).
    Each failed job: ``num``, ``overrides`` (those that differ between the sweep's jobs), ``error``."""
    folders = {p.parent for name in (".hydra", "metrics.json") for p in sweep.rglob(name)} - {sweep}
    records = {}
    for folder in sorted(folders, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p)):
        try:
            record = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            record = None
        record = record if isinstance(record, dict) else {"status": "unfinished", "error": "no metrics.json"}
        overrides = record.get("overrides") if isinstance(record.get("overrides"), list) else []
        record["overrides"] = [str(o) for o in overrides]
        records[folder.name if folder.name.isdigit() else str(folder.relative_to(sweep))] = record
    varying = _varying_keys([r["overrides"] for r in records.values()])
    failed = [
        {
            "num": num,
            "overrides": [o for o in r["overrides"] if o.partition("=")[0] in varying] or r["overrides"],
            "error": str(r.get("error")),
        }
        for num, r in records.items()
        if r.get("status") != "completed"
    ]
    return len(records), failed


def sweep_failure_message(jobs: int, failed: list[dict], sweep: str = "") -> str:
    """What main prints when jobs of a sweep failed: each job, and the configurations without a completed run."""
    lines = [f"{len(failed)} of {jobs} jobs of the sweep did not complete:"]
    for f in failed:
        error = " ".join(f["error"].split())
        lines.append(
            f"  job {f['num']} ({' '.join(f['overrides'])}): {error[:300]}{' ...' if len(error) > 300 else ''}"
        )
    configs: dict[str, int] = {}
    for f in failed:
        key = " ".join(o for o in f["overrides"] if not str(o).startswith("seed="))
        configs[key] = configs.get(key, 0) + 1
    shown = "; ".join(f"{k or '(the defaults)'} ({n} job{'s' if n > 1 else ''})" for k, n in configs.items())
    lines.append(f"configurations with a failed job: {shown}")
    if sweep:
        lines.append(f"composer-report {sweep} reports the sweep as it stands")
    return "\n".join(lines)


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
        argv = precheck(with_experiments(argv))
    except ComposerError as exc:
        if isinstance(exc, RunFinished):
            print(f"composer-train: {exc}")
            sys.exit(0)
        _fail(exc)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    sys.argv = [sys.argv[0], *argv]
    _quiet_lightning()
    SweepOutcome.failed, SweepOutcome.jobs = [], 0
    hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)(_task)()
    if SweepOutcome.failed and (not SweepOutcome.sampled or len(SweepOutcome.failed) == SweepOutcome.jobs):
        message = sweep_failure_message(SweepOutcome.jobs, SweepOutcome.failed, SweepOutcome.sweep)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
