"""Adapters that hold NaN or inf are refused, with one line, wherever they would be used or written.

A run whose training diverged ends with NaN or inf factors. Saved, exported or merged, such an adapter is a
file that loads without error and computes NaN: the worst kind of wrong result, found days later. So
:func:`adalora.save_adapter`, :func:`adalora.load_adapter` (and the adapter reads of ``adalora export`` and
``adalora merge``), every export format (:class:`adalora.files.export_source.ExportSource`) and
:func:`adalora.merge` call :func:`require_finite`, and all say the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the ``(name, tensor)`` pairs whose tensor holds NaN or inf, sorted."""
    return sorted(name for name, tensor in tensors if not bool(torch.isfinite(tensor).all()))


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise a one-line ValueError if a tensor holds NaN or inf.

    Args:
        tensors: ``(name, tensor)`` pairs: adapter factors, task-head weights.
        where: what holds them, for the message (``"the adapter in 'run/adapter'"``).
    """
    named = list(tensors)
    bad = non_finite(named)
    if bad:
        raise ValueError(
            f"{where} holds NaN or inf ({len(bad)} of {len(named)} tensors, e.g. '{bad[0]}'): its training "
            "diverged, so it is refused; train again with a lower learning rate (--lr)"
        )
