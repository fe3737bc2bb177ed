"""``adalora merge`` (fold a run's adapter into its base model) and ``adalora export`` (PEFT, GGUF, rank pattern)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .arguments import UsageError

SubParsers = Any


def _check_source(path: str, command: str) -> None:
    """A run directory with an ``adapter/``, or an adapter directory: refused in one line before a model loads."""
    from ..run.convert import find_adapter_dir

    if Path(path).is_file():
        raise FileNotFoundError(f"adalora {command} {path}: a file, not a run or adapter directory")
    find_adapter_dir(path)  # FileNotFoundError saying what was expected where


def _check_target(out: Path, marker: str, option: str) -> None:
    """``out`` may be created or replaced (new, empty, or holding ``marker``) and can be written."""
    from ..run.directory import check_writable
    from ..run.settings import RunError

    if out.exists() and not out.is_dir():
        raise RunError(f"{option} {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise RunError(
            f"{option} {out} is not empty and holds no {marker}: refusing to replace it; choose another {option} "
            "or an empty directory"
        )
    check_writable(out, option)


def _runs_touched(source: str, out: str | None) -> list[Path]:
    """The directories that may be runs of ours which a command reads (``source``) or writes into (``out``, or
    by default a path inside or beside ``source``): locked shared while it works (run/lock.py)."""
    paths = [Path(source), Path(source).parent]
    if out is not None:
        paths += [Path(out), Path(out).parent]
    return paths


def cmd_merge(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ..run.convert import merge_output_dir
    from ..run.lock import locked_runs

    hf_logging.disable_progress_bar()  # loading and writing bars: a merge says one line, or one error line
    with locked_runs(_runs_touched(args.output_dir, args.out), "merge", fix=""):
        _check_source(args.output_dir, "merge")
        _check_target(Path(args.out), "config.json", "--out")
        out = merge_output_dir(args.output_dir, args.out, base=args.base, safe=not args.unsafe)
    print(f"merged model written to {out} (load it with from_pretrained; no adalora needed)")
    return 0


def register_merge(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("merge", help="fold a trained adapter into its base model and save a plain model")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training output directory, or an adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (save_pretrained)")
    p.add_argument("--base", metavar="PATH", help="the base model (default: the one recorded at training time)")
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="merge even if a merged weight overflows to inf in the base's dtype (an adapter that holds NaN or inf "
        "is refused all the same)",
    )
    p.set_defaults(func=cmd_merge)


def cmd_export(args: argparse.Namespace) -> int:
    from ..run.lock import locked_runs

    with locked_runs(_runs_touched(args.output_dir, args.out), "export", fix=""):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from ..files.exports import EXPORT_FORMATS
    from ..run.convert import default_export_dir, export_output_dir
    from ..run.directory import check_writable
    from ..run.settings import RunError

    _check_source(args.output_dir, "export")
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank must be a positive rank, got {args.rank}")
    entry = EXPORT_FORMATS[args.format]
    option = "--out" if args.out is not None else "the default --out"
    out = Path(args.out) if args.out is not None else default_export_dir(args.output_dir, args.format)
    if entry.directory_marker is not None:
        _check_target(out, entry.directory_marker, option)
    elif out.is_dir():
        raise RunError(f"{option} {out} is a directory; {args.format} writes one file: name the file")
    else:
        check_writable(out.parent, option)
    out = export_output_dir(
        args.output_dir,
        args.out,
        format=args.format,
        layout=args.layout or "compact",
        rank=args.rank,
        base_model_name_or_path=args.base_model_name,
    )
    print(f"{args.format} {entry.noun} written to {out}")
    return 0


def register_export(subparsers: SubParsers) -> None:
    from ..files.exports import EXPORT_FORMATS
    from ..files.lora_layout import LAYOUTS

    formats = "; ".join(f"{name}: {entry.help}" for name, entry in EXPORT_FORMATS.items())
    p = subparsers.add_parser(
        "export",
        help="convert a trained adapter for other tools (PEFT, llama.cpp GGUF, a rank pattern for LoRA)",
        description=f"Formats: {formats}. Which PEFT layout each serving tool reads exactly: docs/adapter-files.md.",
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training output directory, or an adapter directory")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="peft", help="output format (default: peft)")
    p.add_argument("--out", metavar="PATH", help="where to write it (default: inside OUTPUT_DIR, named by format)")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="peft: compact (default; per-module ranks in rank_pattern: exact in PEFT, vLLM 0.32, llama.cpp) or "
        "uniform (one padded rank, r = lora_alpha: also readers that ignore rank_pattern, e.g. SGLang, older vLLM)",
    )
    p.add_argument("--rank", type=int, metavar="R", help="peft --layout uniform: pad to R (default: largest rank)")
    p.add_argument("--base-model-name", metavar="NAME", help="base model recorded in the export (default: training's)")
    p.set_defaults(func=cmd_export)
