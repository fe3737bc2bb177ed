"""The table of export formats: one entry per format, each a writer of an :class:`ExportSource`.

``adalora export --format NAME`` and :func:`adalora.run.convert.export_output_dir` look formats up here; the
CLI's ``--format`` choices are this table's keys. Adding a format is one writer and one entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .export_source import ExportSource
from .gguf_lora import write_gguf
from .peft import write_peft
from .rank_pattern import write_rank_pattern


@dataclass(frozen=True)
class ExportOptions:
    """Options of ``adalora export`` that some formats read.

    Attributes:
        layout: PEFT only: ``"compact"`` or ``"uniform"`` (see :mod:`adalora.files.lora_layout`).
        rank: PEFT uniform layout only: the rank to pad to.
    """

    layout: str = "compact"
    rank: int | None = None


def _write_peft(source: ExportSource, out: Path, options: ExportOptions) -> Path:
    return write_peft(source, out, layout=options.layout, rank=options.rank)


def _write_gguf(source: ExportSource, out: Path, options: ExportOptions) -> Path:
    _only_peft_options("gguf", options)
    return write_gguf(source, out)


def _write_rank_pattern(source: ExportSource, out: Path, options: ExportOptions) -> Path:
    _only_peft_options("rank-pattern", options)
    return write_rank_pattern(source, out)


def _only_peft_options(name: str, options: ExportOptions) -> None:
    if options != ExportOptions():
        raise ValueError(f"--layout and --rank apply to --format peft only; {name} has one layout (drop them).")


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        write: ``write(source, out, options) -> out``; writes atomically.
        default_name: the output's name, ``{layout}`` standing for the PEFT layout, so that each format and layout
            has its own (adalora.run.convert.default_export_dir: ``export-`` before it inside a run directory, the
            adapter directory's name and a dash beside an adapter directory).
        help: one line for ``adalora export --help``.
        noun: what is written, for the CLI's report (``"peft adapter written to ..."``).
        directory_marker: for a format written as a directory, the file that marks one of ours (an existing
            directory without it is never replaced); None for a format written as one file.
    """

    write: Callable[[ExportSource, Path, ExportOptions], Path]
    default_name: str
    help: str
    noun: str = "adapter"
    directory_marker: str | None = None


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "peft": ExportFormat(
        _write_peft,
        "peft-{layout}",
        "a PEFT LoRA adapter directory (--layout compact or uniform)",
        directory_marker="adapter_config.json",
    ),
    "gguf": ExportFormat(_write_gguf, "lora.gguf", "a llama.cpp LoRA adapter file, for decoders"),
    "rank-pattern": ExportFormat(
        _write_rank_pattern,
        "rank-pattern.json",
        "the per-module ranks as a LoRA recipe (PEFT kwargs, YAML keys)",
        "recipe",
    ),
}


def export(
    source: ExportSource, format: str, out: str | os.PathLike[str], options: ExportOptions | None = None
) -> Path:
    """Write ``source`` in ``format`` (a key of :data:`EXPORT_FORMATS`) to ``out``.

    Raises:
        ValueError: for an unknown format, or what the format's writer refuses.
    """
    entry = EXPORT_FORMATS.get(format)
    if entry is None:
        raise ValueError(f"unknown export format {format!r}; supported: {', '.join(EXPORT_FORMATS)}.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return entry.write(source, out, options or ExportOptions())
