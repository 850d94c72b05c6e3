"""What every data module shares: the endless deterministic training stream, sharding, resume state.

Training data is an endless stream of ready-made batches. Batch ``k`` of rank ``r`` (of ``W``) is
the *global* batch ``k * W + r``, and a source turns a global batch index into a batch with an RNG
seeded by ``(seed, index)`` only. So the stream is a pure function of (seed, k, rank, world_size):
resuming at batch ``n`` is just starting the counter at ``n``, and ranks never see the same batch.

    dm = build_datamodule(cfg.data, seed=0, model_max_positions=256)
    dm.setup("fit")                      # cheap to call again
    batch = next(iter(dm.train_dataloader()))   # {"input_ids": [B, T], "labels": [B, T]}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..errors import ConfigError, DataError
from .util import stream_problems


class BatchSource(Protocol):
    """Makes training batch number ``index`` (a global index across ranks) deterministically."""

    def train_batch(self, index: int) -> dict[str, torch.Tensor]: ...


class BatchStream(IterableDataset):
    """Batches ``start, start + 1, ...`` of one rank, forever.

    Rank ``rank`` of ``world_size`` reads global batches ``k * world_size + rank``. With DataLoader
    workers, worker ``w`` of ``n`` makes batches ``k ≡ w (mod n)``; the DataLoader interleaves the
    workers round-robin, so the order is the same for any number of workers.
    """

    def __init__(self, source: BatchSource, start: int = 0, rank: int = 0, world_size: int = 1):
        self.source, self.start, self.rank, self.world_size = source, start, rank, world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + worker
        while True:
            yield self.source.train_batch(k * self.world_size + self.rank)
            k += workers


class DataModule(L.LightningDataModule, ABC):
    """Base of the composer data modules (see the module docstring for the stream's contract).

    Attributes every subclass sets in ``_build`` (called once by ``setup``):
        vocab_size  tokenizer size (the model's vocabulary follows it)
        tokenizer   ``tokenizers.Tokenizer`` or None
        task        "lm" (labels [B, T], shifted inside the model) | "classification" (labels [B])
        num_classes classes of a classification task, else None
        metric      "answer_accuracy" | "accuracy" | None: the task metric the trainer reports
    """

    task: str = "lm"
    metric: Optional[str] = None
    name: str = ""

    def __init__(
        self,
        *,
        seed: int,
        seq_len: int,
        batch_size: int,
        num_workers: int = 0,
        model_max_positions: Optional[int] = None,
        where: str = "",
    ):
        super().__init__()
        problems = stream_problems(seq_len, batch_size, num_workers)  # subclasses report these with their own
        if problems:
            raise ConfigError.of(problems)
        if model_max_positions is not None and seq_len > model_max_positions:
            origin = f"{where}: " if where else ""
            raise DataError(
                f"{origin}data.seq_len={seq_len} is longer than the model's max_position_embeddings="
                f"{model_max_positions}; lower data.seq_len or raise model.max_position_embeddings"
            )
        self.seed, self.seq_len, self.batch_size, self.num_workers = seed, seq_len, batch_size, num_workers
        self.vocab_size: int = 0
        self.tokenizer: Any = None
        self.num_classes: Optional[int] = None
        self.rank: Optional[int] = None  # set rank / world_size to shard by hand (else from the trainer)
        self.world_size: Optional[int] = None
        self._batches_consumed = 0
        self._ready = False

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def _build(self) -> None:
        """Load / generate the data and set vocab_size, tokenizer, num_classes."""

    @abstractmethod
    def _train_source(self) -> BatchSource:
        """The object that makes training batches from global batch indices."""

    @abstractmethod
    def _val_dataset(self) -> Dataset:
        """The fixed validation set (map-style: Lightning shards it under DDP)."""

    def _collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: Optional[str] = None) -> None:
        if not self._ready:
            self._build()
            self._ready = True

    def shard(self) -> tuple[int, int]:
        """(rank, world_size): set by hand, else the attached trainer's, else (0, 1)."""
        if self.rank is not None:
            return self.rank, self.world_size or 1
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self.shard()
        stream = BatchStream(self._train_source(), self._batches_consumed, rank, world)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(
            self._val_dataset(),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, int]:
        """{"batches_consumed": n}: global_step * accumulate_grad_batches under a trainer."""
        trainer = self.trainer
        if trainer is not None:
            return {"batches_consumed": int(trainer.global_step * trainer.accumulate_grad_batches)}
        return {"batches_consumed": self._batches_consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The next ``train_dataloader()`` starts at batch ``state_dict["batches_consumed"]``."""
        self._batches_consumed = int(state_dict["batches_consumed"])


def pad_sequences(seqs: Sequence[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id arrays to the longest: (input_ids [B, T], attention_mask [B, T], 1 token / 0 pad)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[i, : len(s)] = 1
    return ids, mask
