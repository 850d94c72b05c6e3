"""Resuming a run (``ckpt_path=<run>/checkpoints/last.ckpt``), checked before Lightning loads anything.

    info = read_checkpoint(path)            # torch.load(weights_only=True, mmap=True): no code from the file runs
    check_resume(info, plain_cfg)           # RunFinished, or a ConfigError naming every key that differs
    check_state(info, model)                # the weights' names and shapes against the built model
    checkpoint_run_dir(path)                # <run>/checkpoints/x.ckpt -> <run> when <run> is a run folder

Why ``weights_only=True`` rather than a side file: the checkpoint itself carries the run's config
(``checkpoint["composer"]``, written by :class:`~composer.lit.LitComposer`) as plain data, so a
checkpoint copied alone still describes itself and cannot disagree with a second file; the
restricted unpickler loads tensors and plain containers only (anything else is refused, not
run), and ``mmap=True`` maps the tensors instead of reading them, so the check costs little even
for a large model. Lightning then loads the same file with ``weights_only=True`` too.

The model and the data must be those the checkpoint was trained with; the trainer, optimizer
settings, schedule, callbacks and logger may change (e.g. a larger ``trainer.max_steps``), as may
the options that change no weight (:data:`RUNTIME_KEYS`).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .contract.options import is_int
from .errors import ComposerError, ConfigError, Problem

# options that change how the model runs, not its weights (the last part of the dotted key)
RUNTIME_KEYS = ("gradient_checkpointing", "dropout", "fused_loss", "loss_chunk_size", "kernel", "num_workers")
COMPARED = ("model", "data")  # the config sections a resume must keep
COMPARED_KEYS = ("optim.name", "optim.decay_embeddings")  # and these (they shape the optimizer's state)
_ABSENT = object()

if TYPE_CHECKING:
    import torch


class RunFinished(ComposerError):
    """``ckpt_path`` names a run that already reached ``trainer.max_steps``: nothing to train."""


@dataclass
class CheckpointInfo:
    """What a resume needs from a Lightning checkpoint (read without running code from it)."""

    path: Path
    global_step: int
    config: Optional[dict] = None  # the training config composer stored (None: another writer, or older)
    model_config: Optional[dict] = None
    overrides: list[str] = field(default_factory=list)  # the command line of the run that wrote it
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # state_dict name -> shape


def _refused(path: Path, message: str, fix: str) -> ConfigError:
    return ConfigError([Problem("ckpt_path", f"{path}: {message}", fix)])


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """The step, stored config and weight shapes of the Lightning checkpoint at ``path``
    (ConfigError when it is not one, or holds anything but tensors and plain data)."""
    path = Path(path)
    if not path.is_file():
        raise _refused(path, "is not a file", "pass a Lightning checkpoint, e.g. <run>/checkpoints/last.ckpt")
    if not zipfile.is_zipfile(path):
        raise _refused(path, "is not a PyTorch checkpoint (truncated or corrupt?)", "use another checkpoint")
    import torch  # late: only reading a checkpoint needs torch (composer-train's light half imports RunFinished)

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _refused(
            path,
            f"holds objects other than tensors and plain data ({str(exc).splitlines()[0][:200]}); loading it "
            "would run code from the file",
            "resume from a checkpoint composer-train wrote; a file from elsewhere is not loaded",
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise _refused(
            path,
            f"is a zip file but not a PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            "pass a checkpoint written by composer-train (<run>/checkpoints/*.ckpt)",
        ) from None
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("state_dict"), Mapping)
        or not is_int(ckpt.get("global_step"))
    ):
        raise _refused(
            path,
            "is not a Lightning checkpoint (no state_dict and global_step)",
            "pass a checkpoint written by composer-train (<run>/checkpoints/*.ckpt); to start from saved "
            "weights use init_from=<run>/model",
        )
    own = ckpt.get("composer") if isinstance(ckpt.get("composer"), Mapping) else {}
    config, model_config, overrides = own.get("config"), own.get("model_config"), own.get("overrides")
    shapes = {str(k): tuple(v.shape) for k, v in ckpt["state_dict"].items() if hasattr(v, "shape")}
    return CheckpointInfo(
        path,
        int(ckpt["global_step"]),
        config if isinstance(config, dict) else None,
        model_config if isinstance(model_config, dict) else None,
        [str(o) for o in overrides] if isinstance(overrides, list) else [],
        shapes,
    )


def checkpoint_run_dir(path: str | Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<name>.ckpt`` with ``<run>/.hydra``
    or ``<run>/metrics.json``), else None."""
    path = Path(path).expanduser().resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and ((run / ".hydra").is_dir() or (run / "metrics.json").is_file()):
        return run
    return None


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _is_runtime(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return any(last == k or last.endswith("_" + k) for k in RUNTIME_KEYS)


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in the checkpoint, value now) for every compared key that differs."""
    a = {k: v for s in COMPARED for k, v in _flat(saved.get(s, {}), s).items()}
    b = {k: v for s in COMPARED for k, v in _flat(now.get(s, {}), s).items()}
    for key in COMPARED_KEYS:
        section, _, name = key.partition(".")
        a[key] = (saved.get(section) or {}).get(name, _ABSENT)
        b[key] = (now.get(section) or {}).get(name, _ABSENT)
    diffs = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old != new and not _is_runtime(key):
            diffs.append((key, old, new))
    return diffs


def _show(value: Any) -> str:
    return "(not set)" if value is _ABSENT else repr(value)


def check_resume(info: CheckpointInfo, cfg: Mapping[str, Any]) -> None:
    """RunFinished when the checkpoint is at or past ``trainer.max_steps``; ConfigError naming each
    key of the model and data configs (and the optimizer's kind) that differs from the checkpoint's."""
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    if is_int(max_steps) and info.global_step >= max_steps:
        raise RunFinished(
            f"{info.path} is at step {info.global_step}, and trainer.max_steps={max_steps}: the run has "
            f"finished, nothing to train. To train further, raise it: trainer.max_steps={2 * info.global_step}"
        )
    if info.config is None:
        return  # not written by this composer: check_state compares the weights themselves
    diffs = config_differences(info.config, cfg)
    if not diffs:
        return
    run = " ".join(o for o in info.overrides if not o.startswith(("ckpt_path=", "hydra."))) or "the defaults"
    raise ConfigError(
        [
            Problem(
                key,
                f"is {_show(new)} but the checkpoint {info.path.name} was trained with {_show(old)}",
                "resume with the checkpoint's settings, or start a new run from its weights with init_from=<run>/model",
            )
            for key, old, new in diffs
        ],
        header=f"cannot resume from {info.path} (its run: composer-train {run})",
    )


def check_state(info: CheckpointInfo, model: torch.nn.Module, prefix: str = "model.") -> None:
    """ConfigError naming the weights whose names or shapes differ between the checkpoint and ``model``."""
    want = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: v for k, v in info.shapes.items() if k.startswith(prefix)}
    if not have:
        return  # nothing of ours in it: Lightning reports what it finds
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if not bad:
        return
    shown = ", ".join(f"{k.removeprefix(prefix)} {have.get(k, 'missing')} vs {want.get(k, 'missing')}" for k in bad[:4])
    raise ConfigError(
        [
            Problem(
                "ckpt_path",
                f"{info.path}: {len(bad)} weight(s) differ from this run's model (checkpoint vs now: {shown}"
                f"{' ...' if len(bad) > 4 else ''})",
                "resume with the model and data settings the checkpoint was trained with, or start a new run "
                "with init_from=<run>/model",
            )
        ]
    )


__all__ = [
    "RUNTIME_KEYS",
    "CheckpointInfo",
    "RunFinished",
    "check_resume",
    "check_state",
    "checkpoint_run_dir",
    "config_differences",
    "read_checkpoint",
]
