"""Crash-safe Lightning checkpoints: ``Trainer(plugins=[AtomicCheckpointIO()])``.

Each checkpoint is written to a temporary file beside its target (same file system), fsynced,
then renamed over the target with ``os.replace`` and the folder fsynced
(``composer.weights.atomic_path``): a crash or kill mid-write leaves the previous
``last.ckpt`` intact and no partial file under the checkpoint's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .weights import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, (tuple, list)) else (protocol,)):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            torch.save(checkpoint, tmp)


__all__ = ["AtomicCheckpointIO"]
