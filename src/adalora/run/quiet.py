"""What optional packages print, kept out of a run's output: each known notice is silenced where it arises,
by its logger and the start of its message, or by switching off the progress bar that prints it (never a blanket
filter, so anything new still shows)."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

# Loggers of optional packages that transformers imports when they are installed (torchao at least), whose
# import-time warnings (missing CUDA kernels, no triton, torch's pytree deprecations) say nothing about a run.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


class DropMessages(logging.Filter):
    """Drops a logger's records whose message (the format string, before arguments) starts with a prefix."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def dropped(logger: str, *prefixes: str) -> Iterator[None]:
    """Within the block, ``logger``'s records starting with one of ``prefixes`` are dropped.

    The filter sits on the logger object itself, so it also applies to a logger that a package configures (level,
    handlers) when it is imported inside the block.
    """
    target, drop = logging.getLogger(logger), DropMessages(*prefixes)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def quiet_import(name: str) -> ModuleType:
    """Import module ``name`` without the import-time warnings of the optional packages it imports."""
    loggers = [logging.getLogger(noisy) for noisy in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Importing transformers' model classes without the import-time warnings of optional packages."""
    quiet_import("transformers.modeling_utils")  # imports the optional packages once, quietly
    yield


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Loading or saving a transformers model without its progress bars, and without what deepspeed prints when
    ``save_pretrained`` imports it.

    transformers draws "Loading weights" and "Writing model shards" with its own tqdm (switched off by
    ``disable_progress_bar``), but converts a GGUF file under a plain ``tqdm`` ("Converting and de-quantizing GGUF
    tensors"), which only a disabled ``tqdm`` in its place silences. ``save_pretrained`` imports deepspeed when it
    is installed (accelerate checks whether the model is wrapped in its engine), which on a machine without CUDA
    logs to stdout that it falls back to the CPU.
    """
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = gguf_loading.tqdm
    gguf_loading.tqdm = partial(tqdm, disable=True)
    try:
        with dropped("DeepSpeed", "Setting accelerator to CPU"):
            yield
    finally:
        gguf_loading.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()
