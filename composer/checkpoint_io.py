"""Crash-safe Lightning checkpoints: ``Trainer(plugins=[AtomicCheckpointIO()])``, and
``RunCheckpoint``, which keeps one copy of a checkpoint that is both the best and the last.

Each checkpoint is written to a temporary file beside its target (same file system), fsynced,
then renamed over the target with ``os.replace`` and the folder fsynced
(``composer.weights.atomic_path``): a crash or kill mid-write leaves the previous
``last.ckpt`` intact and no partial file under the checkpoint's name (a killed write leaves its
``.last.ckpt.<random>.tmp``, removed when the next run starts in the folder:
:func:`composer.files.remove_orphan_temps`). A full disk is a :class:`~composer.files.NoSpaceLeft`
naming the folder; the previous checkpoint stays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .files import no_space
from .weights import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp, open(tmp, "wb") as f:  # a file object: a full disk is an OSError
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as exc:
            full = no_space(exc, target, keep="the checkpoints written before are intact")
            if full is None:
                raise
            raise full from None


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` after every validation (Lightning 2.6 writes it
    only when the best one improved, so a resume went back to the best step), and makes it a hard
    link to the best checkpoint when that was saved at the same step (the two would be the same
    bytes): the run folder keeps one copy, and nothing is written twice. The next save of
    ``last.ckpt`` replaces the name with a new file (``os.replace``), so the best one keeps its
    contents. Where hard links are not possible (some network shares) the file is copied."""

    def _last_name(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> str:
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        if self._enable_version_counter:  # as Lightning names it: last-v1.ckpt beside another run's last.ckpt
            version = self.STARTING_VERSION
            while self.file_exists(filepath, trainer) and filepath != self.last_model_path:
                filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST, ver=version)
                version += 1
        return filepath

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        self._previous_last = self.last_model_path
        if self.save_last and self.save_top_k != 0:  # the best checkpoint's state names the last one, as
            self.last_model_path = self._last_name(trainer, monitor_candidates)  # last.ckpt's own would
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        previous = getattr(self, "_previous_last", None)
        self._previous_last = None
        source = self._last_checkpoint_saved
        linkable = self.save_last and bool(source) and self._last_global_step_saved == trainer.global_step
        filepath = self.last_model_path if previous is not None else ""
        if not linkable or not filepath or not _is_local(filepath) or _same(filepath, source):
            if previous is not None:
                self.last_model_path = previous  # Lightning's own bookkeeping from here
            super()._save_last_checkpoint(trainer, monitor_candidates)
            return
        if trainer.is_global_zero:
            link_file(Path(source), Path(filepath))
        trainer.strategy.barrier()
        if previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and not self._should_save_on_train_epoch_end(trainer)
            and self._last_global_step_saved != trainer.global_step  # no better val_loss: nothing saved yet
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _is_local(path: str) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def link_file(source: Path, target: Path) -> None:
    """Make ``target`` name the same file as ``source`` (a hard link; else a copy), atomically."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        full = no_space(exc, target)
        if full is not None:
            raise full from None
        raise


__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "link_file"]
