"""``adalora generate``: try a finished causal-LM run on a prompt (its base model and adapter, or merged)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..run.generate import generate, load_run_model
from ..run.lock import locked_runs
from ..run.settings import DEVICE
from .arguments import UsageError

SubParsers = Any  # argparse's private _SubParsersAction


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be 0 (greedy) or a finite number above it, got {args.temperature}")
    if DEVICE.problem(args.device) is not None:
        raise UsageError(f"--device {args.device}: not a device; use auto, cpu, cuda, cuda:N or mps")
    with locked_runs([Path(args.output_dir)], "generate", fix=""):  # not while a run writes its weights there
        model = load_run_model(args.output_dir, merged=args.merged, device=args.device)
    completion = generate(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(completion)
    return 0


def register_generate(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="complete a prompt with a finished causal-lm run (its base model and adapter, or merged)",
        description="Load the run's base model as training did (same --model, --quantize and --precision), put its "
        "adapter on it (or fold it in with --merged), and print the completion of --prompt. The prompt goes "
        "through the tokenizer's chat template as a user turn when the tokenizer has one; use --no-chat-template "
        "for a run trained on plain prompt/completion text. Greedy decoding unless --temperature is given.",
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a directory written by adalora train --task causal-lm")
    p.add_argument("--prompt", required=True, help="the text to complete (one user turn under a chat template)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most N new tokens (default: 64)")
    p.add_argument(
        "--merged", action="store_true", help="fold the adapter into the base weights first, as adalora merge does"
    )
    p.add_argument("--no-chat-template", action="store_true", help="tokenise the prompt as it is, as training did")
    p.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="sample at temperature T (default: 0, greedy)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seeds the sampling (default: 0)")
    p.add_argument(
        "--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}", help="where to compute (default: auto)"
    )
    p.set_defaults(func=cmd_generate)
