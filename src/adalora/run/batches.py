"""The training data of one epoch as batches of pre-tokenised tensors, in an order fixed by (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

PAD_MULTIPLE = 8  # batch lengths are rounded up to this (few distinct shapes for torch.compile, GPU-friendly)


class TensorBatches(Sequence):
    """Shuffled fixed-size batches of pre-tokenised tensors for one epoch (the last partial batch is
    dropped so that every step has the same number of rows); the order depends only on (seed, epoch). Columns
    that are padding in every row of a batch are cut (:func:`trim_padding`).

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
        return trim_padding({key: value[rows] for key, value in self.tensors.items()})

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


def trim_padding(batch: dict[str, torch.Tensor], multiple: int = PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """``batch`` without the columns that are padding in every row, kept to a multiple of ``multiple``.

    Rows are padded to the run's ``--max-length``, but a batch of short examples needs only its longest row:
    the cut columns are masked out for every real token (causal and bidirectional attention both ignore masked
    keys, and their labels are ignored), so the loss is the same, at the cost of the tokens kept. Right-padded
    rows (classification) lose trailing columns, left-padded ones (causal LM, whose position ids count from each
    row's first real token) leading columns. The length is rounded up to ``multiple``, the extra columns taken
    from the padding side, so that a compiled model sees few distinct shapes.

    Args:
        batch: ``{name: (rows, ...)}``; tensors of shape ``(rows, length)`` (or more dimensions) whose second
            dimension is the ``attention_mask``'s length are cut; the others (class labels ``(rows,)``) are kept.

    Returns:
        the same names, sequence tensors of shape ``(rows, kept, ...)`` with ``kept`` <= length.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] == 0:
        return batch
    length = mask.shape[1]
    used = mask.bool().any(0).nonzero()
    first, last = (int(used.min()), int(used.max()) + 1) if len(used) else (0, 1)
    kept = min(length, -(-(last - first) // multiple) * multiple)
    if kept == length:
        return batch
    start = min(first, length - kept)  # right padding: 0; left padding: length - kept
    columns = slice(start, start + kept)
    return {
        key: value[:, columns] if value.dim() >= 2 and value.shape[1] == length else value
        for key, value in batch.items()
    }
