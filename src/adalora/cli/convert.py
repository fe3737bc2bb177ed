"""``adalora merge`` (fold a run's adapter into its base model) and ``adalora export`` (PEFT, GGUF, rank pattern)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..files.exports import EXPORT_FORMATS
from ..files.lora_layout import LORA_LAYOUTS
from ..run.convert import default_export_dir, export_output_dir, find_adapter_dir, merge_output_dir
from ..run.directory import check_writable
from ..run.lock import locked_runs
from ..run.settings import RunError
from .arguments import UsageError

SubParsers = Any


def _check_source(path: str, command: str) -> None:
    """A run directory with an ``adapter/``, or an adapter directory: refused in one line before a model loads."""
    if Path(path).is_file():
        raise FileNotFoundError(f"adalora {command} {path}: a file, not a run or adapter directory")
    find_adapter_dir(path)  # FileNotFoundError saying what was expected where


def _check_target(out: Path, marker: str | None, option: str, what: str, overwrite: bool) -> None:
    """``out`` may be written, and can be: it is new or an empty directory, or it holds an earlier output of the
    command (a directory holding ``marker``; for an output of one file, ``marker`` None, a file) and ``overwrite``
    says to replace it. Nothing is ever replaced silently: a second export or merge to the same place, the default
    one included, is refused unless ``--overwrite`` is given.

    Args:
        what: what the command writes, for the messages (``a peft adapter``).
    """
    if marker is None and out.is_dir():
        raise RunError(f"{option} {out} is a directory; {what} is one file: name the file")
    if marker is not None and out.exists() and not out.is_dir():
        raise RunError(f"{option} {out} is a file; choose a directory")
    earlier = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if earlier and marker is not None and not (out / marker).exists():
        raise RunError(
            f"{option} {out} is not empty and holds no {marker}: refusing to replace it; choose another --out "
            "or an empty directory"
        )
    if earlier and not overwrite:
        raise RunError(f"{option} {out} already holds {what}: add --overwrite to replace it, or choose another --out")
    check_writable(out if marker is not None else out.parent, option)


def _runs_touched(source: str, out: str | None) -> list[Path]:
    """The directories that may be runs of ours which a command reads (``source``) or writes into (``out``, or
    by default a path inside or beside ``source``): locked shared while it works (run/lock.py)."""
    paths = [Path(source), Path(source).parent]
    if out is not None:
        paths += [Path(out), Path(out).parent]
    return paths


def cmd_merge(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading and writing bars: a merge says one line, or one error line
    with locked_runs(_runs_touched(args.output_dir, args.out), "merge", fix=""):
        _check_source(args.output_dir, "merge")
        _check_target(Path(args.out), "config.json", "--out", "a merged model", args.overwrite)
        out = merge_output_dir(args.output_dir, args.out, base=args.base, safe=not args.unsafe)
    print(f"merged model written to {out} (load it with from_pretrained; no adalora needed)")
    return 0


def register_merge(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("merge", help="fold a trained adapter into its base model and save a plain model")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training output directory, or an adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (save_pretrained)")
    p.add_argument("--base", metavar="PATH", help="the base model (default: the one recorded at training time)")
    p.add_argument("--overwrite", action="store_true", help="replace a merged model already in --out")
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="merge even if a merged weight overflows to inf in the base's dtype (an adapter that holds NaN or inf "
        "is refused all the same)",
    )
    p.set_defaults(func=cmd_merge)


def cmd_export(args: argparse.Namespace) -> int:
    with locked_runs(_runs_touched(args.output_dir, args.out), "export", fix=""):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    _check_source(args.output_dir, "export")
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank must be a positive rank, got {args.rank}")
    entry, layout = EXPORT_FORMATS[args.format], args.layout or "compact"
    option = "--out" if args.out is not None else "the default --out"
    out = Path(args.out) if args.out is not None else default_export_dir(args.output_dir, args.format, layout)
    _check_target(out, entry.directory_marker, option, f"a {args.format} {entry.noun}", args.overwrite)
    out = export_output_dir(
        args.output_dir,
        out,
        format=args.format,
        layout=layout,
        rank=args.rank,
        base_model_name_or_path=args.base_model_name,
    )
    print(f"{args.format} {entry.noun} written to {out}")
    return 0


def register_export(subparsers: SubParsers) -> None:
    formats = "; ".join(f"{name}: {entry.help}" for name, entry in EXPORT_FORMATS.items())
    p = subparsers.add_parser(
        "export",
        help="convert a trained adapter for other tools (PEFT, llama.cpp GGUF, a rank pattern for LoRA)",
        description=f"Formats: {formats}. Which PEFT layout each serving tool reads exactly: docs/adapter-files.md.",
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training output directory, or an adapter directory")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="peft", help="output format (default: peft)")
    p.add_argument(
        "--out",
        metavar="PATH",
        help="where to write it (default: one per format and layout inside OUTPUT_DIR: export-peft-compact/, "
        "export-peft-uniform/, export-lora.gguf, export-rank-pattern.json; beside an adapter directory ADAPTER: "
        "ADAPTER-peft-compact/, ...)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out (or the default)")
    p.add_argument(
        "--layout",
        choices=LORA_LAYOUTS,
        help="peft: compact (default; per-module ranks in rank_pattern: exact in PEFT, vLLM 0.32, llama.cpp) or "
        "uniform (one padded rank, r = lora_alpha: also readers that ignore rank_pattern, e.g. SGLang, older vLLM)",
    )
    p.add_argument("--rank", type=int, metavar="R", help="peft --layout uniform: pad to R (default: largest rank)")
    p.add_argument("--base-model-name", metavar="NAME", help="base model recorded in the export (default: training's)")
    p.set_defaults(func=cmd_export)
