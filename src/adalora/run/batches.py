"""The training data of one epoch as batches of pre-tokenised tensors, in an order fixed by (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class TensorBatches(Sequence):
    """Shuffled fixed-size batches of pre-tokenised tensors for one epoch (the last partial batch is
    dropped so that every step has the same shape); the order depends only on (seed, epoch).

    With several processes, ``batch_size`` is the global batch and process ``rank`` of ``world`` gets rows
    ``rank * batch_size / world`` up to the next process's share of every batch: the same global batches, the
    same number of steps and (DDP averaging the equal-sized shares) the same gradients as one process.

    Args:
        tensors: ``{name: (n, ...)}`` tensors of equal first dimension, including ``labels`` of shape ``(n,)``.
        batch_size: rows per batch (over all processes).
        seed, epoch: fix the order.
        rank, world: this process and the number of processes.
    """

    def __init__(
        self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
    ) -> None:
        n = len(tensors["labels"])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.order = torch.randperm(n, generator=generator)
        self.tensors, self.batch_size = tensors, batch_size
        self.share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Batch ``index``: ``{name: (batch_size / world, ...)}``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size][self.share]
        return {key: value[rows] for key, value in self.tensors.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))
