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
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import conf_dir, load_config
from .errors import ComposerError, ConfigError, Problem

log = logging.getLogger(__name__)
MAX_PRECHECKED_JOBS = 64  # sweeps larger than this compose only their first jobs up front
# what Lightning's DDP launcher sets in the launching process's environment
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")
# metrics.json values a sweeper can optimise (optimized_metric=...)
SWEEP_METRICS = ("best_val_loss", "val_loss", "val_ppl", "best_val_accuracy", "val_accuracy", "tokens_per_s", "wall_s")


# ----------------------------------------------------------------------------- validation
def _overridden_model_keys(overrides: Sequence[str]) -> set[str]:
    """Model options the user set on the command line: ``model.vocab_size=...`` -> "vocab_size"."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            keys.add(key[len("model.") :])
    return keys


def plain_config(cfg: Any) -> dict:
    """``cfg`` as plain Python data with every interpolation resolved (ConfigError if one fails)."""
    from omegaconf.errors import OmegaConfBaseException

    from .config import to_container

    try:
        return to_container(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(
            [Problem(str(key), str(exc).splitlines()[0], "fix the value or the ${...} reference")]
        ) from None


def check_config(cfg: Any) -> None:
    """Every problem of the training config that needs no data (ConfigError listing them all)."""
    from .optim import check_optim, check_scheduler
    from .training import check_callbacks, check_logger, check_precision_for_device, check_trainer

    cfg = plain_config(cfg)
    problems: list[Problem] = []
    problems += check_trainer(cfg["trainer"]) + check_precision_for_device(cfg["trainer"])
    problems += check_optim(cfg["optim"]) + check_scheduler(cfg["scheduler"], cfg["optim"].get("lr"))
    problems += check_callbacks(cfg["callbacks"]) + check_logger(cfg["logger"])
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(Problem("seed", f"{seed!r} must be an integer", "e.g. seed=0"))
    if not isinstance(cfg.get("compile", False), (bool, dict)):
        problems.append(
            Problem(
                "compile",
                f"{cfg['compile']!r} must be true, false or a mapping of torch.compile arguments",
                "compile=true or compile='{mode: max-autotune}'",
            )
        )
    if cfg.get("ckpt_path") is not None:
        path = Path(str(cfg["ckpt_path"]))
        if not path.is_file():
            problems.append(
                Problem(
                    "ckpt_path",
                    f"{path} is not a file",
                    "pass a Lightning checkpoint, e.g. outputs/<date>/<time>/checkpoints/last.ckpt",
                )
            )
        elif not zipfile.is_zipfile(path):
            problems.append(
                Problem(
                    "ckpt_path",
                    f"{path} is not a PyTorch checkpoint (truncated or corrupt?)",
                    "use another checkpoint, e.g. checkpoints/last.ckpt or a best-*.ckpt",
                )
            )
    if cfg.get("init_from") is not None and not Path(str(cfg["init_from"])).exists():
        problems.append(
            Problem(
                "init_from",
                f"{cfg['init_from']} does not exist",
                "pass a folder written by save_pretrained (e.g. outputs/<date>/<time>/model)",
            )
        )
    if cfg.get("optimized_metric", "best_val_loss") not in SWEEP_METRICS:
        problems.append(
            Problem(
                "optimized_metric",
                f"{cfg['optimized_metric']!r} is not a metrics.json value a sweeper can optimise",
                f"use one of {', '.join(SWEEP_METRICS)}",
            )
        )
    if cfg.get("init_from") is not None and cfg.get("ckpt_path") is not None:
        problems.append(
            Problem(
                "init_from",
                "is given together with ckpt_path",
                "use ckpt_path to resume a run, or init_from to start a new run from saved weights",
            )
        )
    if problems:
        raise ConfigError.of(problems)


def _head_type(head: Any) -> str:
    return head if isinstance(head, str) else dict(head or {}).get("type", "lm")


def fit_model_to_data(raw: dict, data: Any, data_cfg: Any, user_keys: set[str], source: str = "") -> dict:
    """The model config adapted to the data: vocab_size follows the tokenizer unless the user set
    it (then it must be large enough); a classification task needs a classification head, whose
    num_classes comes from the data. ``source`` is "init_from" when the config was loaded."""
    raw = copy.deepcopy(raw)
    problems: list[Problem] = []
    vocab_key = "data.tokenizer" if "tokenizer" in data_cfg else "data.vocab_size"
    vocab_src = f"{vocab_key}={data_cfg.get(vocab_key.split('.')[1])}"
    if "vocab_size" in user_keys or source:
        if raw["vocab_size"] < data.vocab_size:
            where = "model.vocab_size" if "vocab_size" in user_keys else f"model.vocab_size (of init_from={source})"
            problems.append(
                Problem(
                    where,
                    f"{raw['vocab_size']} is smaller than the data's vocabulary of "
                    f"{data.vocab_size} tokens ({vocab_src})",
                    f"drop the model.vocab_size override (it follows the data) or use at least {data.vocab_size}"
                    if not source
                    else "train on data with the tokenizer saved in init_from, or start without init_from",
                )
            )
    else:
        raw["vocab_size"] = data.vocab_size
    head = raw.get("head", "lm")
    kind = _head_type(head)
    if data.task == "classification":
        if kind != "classification":
            problems.append(
                Problem(
                    "model.head",
                    f"is {kind!r} but data={data.name} is a classification task",
                    "add model/head=classification (or use model=bert_tiny)",
                )
            )
        else:
            head = {"type": "classification"} if isinstance(head, str) else dict(head)
            given = head.get("num_classes")
            if ("head.num_classes" in user_keys or source) and given != data.num_classes:
                problems.append(
                    Problem(
                        "model.head.num_classes",
                        f"{given} but the data has {data.num_classes} classes",
                        "drop the override (it follows the data)",
                    )
                )
            head["num_classes"] = data.num_classes
            raw["head"] = head
    elif kind == "classification":
        problems.append(
            Problem(
                "model.head",
                f"is 'classification' but data={data.name} is language modelling",
                "use model/head=lm, or classification data (a JSONL file of text and label)",
            )
        )
    if problems:
        raise ConfigError.of(problems)
    return raw


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {"type": node[k]} if isinstance(node.get(k), str) else {}
        node = node[k]
    node[keys[-1]] = value


def init_from_config(saved: Any, cfg_model: Any, user_keys: set[str], source: str) -> dict:
    """The saved model's config with the user's ``model.*`` overrides applied; ConfigError naming
    each override that would change a weight's shape."""
    from omegaconf import OmegaConf

    from .config import to_container
    from .model import compose
    from .weights import unique_state

    def shapes(raw: dict) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in unique_state(compose(raw, device="meta")).items()}

    base = saved.to_dict()
    want = shapes(base)
    merged, problems = copy.deepcopy(base), []
    for key in sorted(user_keys):
        value = to_container(OmegaConf.select(cfg_model, key))
        trial = copy.deepcopy(base)
        _set_path(trial, key, value)
        _set_path(merged, key, value)
        try:
            got = shapes(trial)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if changed:
            problems.append(
                Problem(
                    f"model.{key}",
                    f"changes the shape of {', '.join(changed[:4])}"
                    f"{' ...' if len(changed) > 4 else ''} of the model in init_from={source}",
                    "drop this override (init_from keeps the saved architecture) or train "
                    "from scratch without init_from",
                )
            )
    if problems:
        raise ConfigError.of(problems)
    return merged


# ----------------------------------------------------------------------------- the run
@dataclass
class Prepared:
    """Everything built before training: validated, nothing trained yet."""

    model: Any
    data: Any
    lit: Any
    tokenizer: Any
    flops_per_token: Optional[float]


def prepare(cfg: Any, overrides: Sequence[str] = ()) -> Prepared:
    """Validate ``cfg`` and build the data module, the model and the LightningModule."""
    from lightning.pytorch import seed_everything

    from .config import to_container
    from .data import build_datamodule
    from .lit import LitComposer
    from .model import ComposedModel, compose
    from .schema import resolve_model_config

    check_config(cfg)
    user_keys = _overridden_model_keys(overrides)
    init_from = cfg.get("init_from")
    saved, saved_tokenizer = None, None
    if init_from is not None:
        from .checkpoint import load_tokenizer

        saved = ComposedModel.from_pretrained(str(init_from))
        saved_tokenizer = load_tokenizer(str(init_from))
        raw = init_from_config(saved.config, cfg.model, user_keys, str(init_from))
    else:
        raw = to_container(cfg.model)
    model_cfg = resolve_model_config(raw)  # the model is checked before any data is read
    data_cfg = to_container(cfg.data)
    if saved_tokenizer is not None and "tokenizer_path" in data_cfg and data_cfg["tokenizer_path"] is None:
        data_cfg["tokenizer_path"] = str(Path(str(init_from)) / "tokenizer.json")  # keep the saved model's ids
    data = build_datamodule(data_cfg, seed=cfg.seed, model_max_positions=model_cfg.max_position_embeddings)
    data.prepare_data()
    data.setup("fit")
    tokenizer = data.tokenizer
    if saved_tokenizer is not None and tokenizer is not None and saved_tokenizer.to_str() != tokenizer.to_str():
        raise ConfigError(
            [
                Problem(
                    "init_from",
                    f"the tokenizer saved in {init_from} differs from the data's (data.tokenizer)",
                    "train on the same data / tokenizer settings as the saved model, or start without init_from",
                )
            ]
        )
    raw = fit_model_to_data(model_cfg.to_dict(), data, data_cfg, user_keys, source=str(init_from or ""))
    compose(raw, device="meta")  # the final config, checked again without allocating anything
    seed_everything(cfg.seed, workers=True, verbose=False)
    model = compose(raw, seed=cfg.seed)
    if saved is not None:
        model.load_state_dict(saved.state_dict())
    lit = LitComposer(
        model,
        optim=to_container(cfg.optim),
        scheduler=to_container(cfg.scheduler),
        task=data.task,
        metric=data.metric,
        compile=to_container(cfg.get("compile", False)),
    )
    flops = None
    try:
        from .plan import training_flops_per_token

        flops = training_flops_per_token(model.config, data.seq_len)
    except ComposerError as exc:  # a component the planner cannot measure: no MFU, training goes on
        log.warning("no MFU: %s", exc)
    return Prepared(model, data, lit, data.tokenizer, flops)


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _export(trainer: Any, lit: Any, run_dir: Path, tokenizer: Any) -> tuple[Any, Optional[Path]]:
    """Write the trained model with save_pretrained (rank 0); returns (model on rank 0, folder)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from .model import compose

    if isinstance(trainer.strategy, FSDPStrategy):  # gather the full weights (every rank takes part)
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return None, None
        model = compose(lit.model.config, device="cpu")
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    else:
        if not trainer.is_global_zero:
            return None, None
        model = lit.model
    out = run_dir / "model"
    model.save_pretrained(out, tokenizer=tokenizer)
    return model, out


def _sample(model: Any, prepared: Prepared, parts: Any) -> Optional[str]:
    """A short sample for the summary: answers of one validation example, or generated text."""
    from .summary import answer_sample

    data = prepared.data
    if data.metric is not None:
        batch = next(iter(data.val_dataloader()))
        return answer_sample(model, batch, prepared.tokenizer)
    if parts.sample is not None:
        return parts.sample.last or parts.sample.generate(model)
    return None


def train(cfg: Any, run_dir: str | os.PathLike, overrides: Sequence[str] = (), console: Any = None) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the metrics.json record.

    On failure metrics.json records ``status: failed`` and the error, then the error is raised.
    """
    from .summary import print_summary, write_metrics

    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "status": "running",
        "error": None,
        "overrides": list(overrides),
        "seed": cfg.get("seed"),
        "run_dir": str(run_dir),
    }
    try:
        return _train(cfg, run_dir, overrides, record, start, console)
    except BaseException as exc:
        if _is_rank_zero():
            record.update(
                status="failed",
                error=str(exc) or type(exc).__name__,
                error_type=type(exc).__name__,
                wall_s=time.perf_counter() - start,
            )
            write_metrics(run_dir, record)
            if cfg.get("callbacks", {}).get("summary", True) and record.get("steps"):
                print_summary(record, console)
        raise
    finally:
        from lightning.fabric.utilities.distributed import _destroy_dist_connection

        _destroy_dist_connection()  # a later run in this process (a sweep job) starts a new group


def _train(cfg: Any, run_dir: Path, overrides: Sequence[str], record: dict, start: float, console: Any) -> dict:
    import torch

    from .training import cpu_threads

    threads = cpu_threads(cfg.trainer.get("cpu_threads", "auto"), str(cfg.trainer.get("accelerator", "auto")))
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    record["cpu_threads"] = torch.get_num_threads() if threads is not None else None
    try:
        return _run(cfg, run_dir, overrides, record, start, console)
    finally:
        torch.set_num_threads(before)


def _proc_status_mb(field: str) -> Optional[float]:
    """A memory line of /proc/self/status (Linux) in MiB; None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _reset_peak_memory() -> Optional[float]:
    """Start this run's peak-memory count (a sweep runs many jobs in one process): the CUDA
    allocator's peak and, on Linux, the process's peak resident set (VmHWM, reset via clear_refs).
    Returns the resident set now (MiB; None off Linux): what the run's peak is measured from."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    _release_freed_memory()
    with contextlib.suppress(OSError):  # not Linux (or not allowed): peak_rss_mb is the process's peak so far
        Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_mb("VmRSS")


def _release_freed_memory() -> None:
    """Hand the memory an earlier run of this process freed back to the OS, so that this run's
    resident set starts low and its peak counts its own allocations: glibc keeps freed heap
    pages (a sweep's second run would otherwise reuse them unseen); malloc_trim returns them."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def _peak_memory() -> dict[str, Optional[float]]:
    """``peak_rss_mb`` (host, this process) and ``peak_gpu_mb`` (CUDA allocator; None without CUDA)."""
    import resource

    import torch

    rss = _proc_status_mb("VmHWM")
    if rss is None:
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    gpu = (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu}


def _run(cfg: Any, run_dir: Path, overrides: Sequence[str], record: dict, start: float, console: Any) -> dict:
    from .summary import print_summary, write_metrics
    from .training import build_trainer

    record["start_rss_mb"] = _reset_peak_memory()
    prepared = prepare(cfg, overrides)
    model, data, lit = prepared.model, prepared.data, prepared.lit
    record.update(
        model=model.config.name or "custom",
        params=model.num_parameters(),
        task=data.task,
        metric=data.metric,
        seq_len=data.seq_len,
        batch_size=data.batch_size,
    )
    trainer, parts = build_trainer(cfg, run_dir, model, data, prepared.flops_per_token)
    record.update(precision=str(trainer.precision), world_size=trainer.world_size)
    try:
        trainer.fit(lit, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
    finally:
        _collect(record, trainer, lit, parts)
        record.update(_peak_memory())
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")
    exported, model_dir = _export(trainer, lit, run_dir, prepared.tokenizer)
    if not trainer.is_global_zero:
        return record
    record["model_dir"] = str(model_dir)
    record["sample"] = _sample(exported, prepared, parts)
    record.update(status="completed", wall_s=time.perf_counter() - start)
    write_metrics(run_dir, record)
    if cfg.callbacks.get("summary", True):
        print_summary(record, console)
    return record


def _collect(record: dict, trainer: Any, lit: Any, parts: Any) -> None:
    """Final and best validation metrics, throughput and checkpoint paths into ``record``."""
    history = list(lit.val_history)
    last = history[-1] if history else {}
    record.update(
        steps=trainer.global_step,
        history=history,
        val_loss=last.get("val_loss"),
        val_ppl=last.get("val_ppl"),
        val_accuracy=last.get("val_accuracy"),
        best_val_loss=lit.best_val_loss if history else None,
        best_val_accuracy=max((h["val_accuracy"] for h in history if "val_accuracy" in h), default=None),
        tokens=parts.throughput.tokens,
        tokens_per_s=parts.throughput.tokens_per_s,
    )
    if parts.checkpoint is not None:
        record.update(
            checkpoint_last=parts.checkpoint.last_model_path or None,
            checkpoint_best=parts.checkpoint.best_model_path or None,
        )


# ----------------------------------------------------------------------------- the command line
def _normalise(argv: list[str]) -> list[str]:
    # experiment is a defaults-list group (null by default): "+experiment=x" means "experiment=x"
    return [a[1:] if a.startswith("+experiment=") else a for a in argv]


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a sweep's jobs (choice / range sweeps; sampled intervals left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

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
    from hydra._internal.utils import get_args_parser

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
    from .config import EXPERIMENTS_ENV

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
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

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
    from hydra._internal.utils import get_args_parser
    from omegaconf import read_write

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
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

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
            from .summary import write_metrics

            print(f"error in job {hc.job.num} ({' '.join(overrides)}): {exc}", file=sys.stderr)
            if not (Path(hc.runtime.output_dir) / "metrics.json").exists():  # failed before train() began
                write_metrics(
                    Path(hc.runtime.output_dir),
                    {
                        "status": "failed",
                        "error": str(exc),
                        "error_type": type(exc).__name__,
                        "overrides": overrides,
                        "seed": cfg.get("seed"),
                    },
                )
            return None  # recorded in its metrics.json; the sweep goes on (Optuna: a failed trial)
        if isinstance(exc, ComposerError):
            _fail(exc)
        raise
    finally:
        if multirun:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    name = str(cfg.get("optimized_metric", "best_val_loss"))
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
    import warnings

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
    import hydra

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
