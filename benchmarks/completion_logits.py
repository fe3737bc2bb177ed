"""Causal-LM training steps with the LM head on every position against the labelled positions only.

``adalora.run.lm_loss.next_token_loss`` asks the model for the logits of the positions that predict a completion
token only (rows are left-padded, so those are the last few); transformers' ``model(**batch).loss`` computes the
logits of every position. The losses are equal (tests/run/test_lm_loss.py); this measures the time per step on the
decoder table's runs: the packaged SmolLM2-135M, every projection adapted (AdaLoRA 3 -> 2), batches of 16 of the
table's TREC-6 and SMS spam prompts (``benchmarks/decoder_table.py``'s data files, written here if missing), cut
to their longest row, under bf16 autocast as in the table.

Each case runs the same batches both ways, alternating one step each, so that machine noise hits both alike; the
table reports the median seconds per optimizer step (forward and backward), the mean batch length, the mean
number of positions the LM head ran on, and the ratio. One torch thread by default (``--threads``).

Usage (repository root, PYTHONPATH=src):
    python benchmarks/completion_logits.py                # both tasks, 10 steps each
    python benchmarks/completion_logits.py --tasks trec --steps 20 --precision fp32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results
from decoder_table import benchmark_settings

TASKS = ("trec", "sms-spam")


def measure(task: str, steps: int, threads: int, precision: str) -> dict[str, Any]:
    from adalora.run.batches import TensorBatches
    from adalora.run.hardware import DeviceLoss, resolve_device
    from adalora.run.lm_loss import kept_positions, next_token_loss, position_ids
    from adalora.run.train import prepare

    settings = benchmark_settings(task, threads, precision=precision)
    settings = settings.replace(device=resolve_device(settings.device))  # as the run's check stage decides it
    data, model, _ = prepare(settings)
    ways = {
        "every position": DeviceLoss(model.device, precision),  # transformers' loss from the labels
        "labelled positions": DeviceLoss(model.device, precision, next_token_loss),
    }
    batches = TensorBatches(data.train, settings.batch_size, settings.seed, 0)
    chosen = [batches[i] for i in range(min(steps, len(batches)))]
    for batch in chosen:  # both ways see the same inputs: position ids counted from each row's first token
        batch["position_ids"] = position_ids(batch["attention_mask"])
    parameters = [p for p in model.module.parameters() if p.requires_grad]

    def step(way: str, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        start = time.perf_counter()
        loss = ways[way](model.module, batch)
        loss.backward()
        for p in parameters:
            p.grad = None
        return time.perf_counter() - start, float(loss.detach())

    for way in ways:
        step(way, chosen[0])  # warm-up
    times: dict[str, list[float]] = {way: [] for way in ways}
    losses: dict[str, list[float]] = {way: [] for way in ways}
    for batch in chosen:
        for way in ways:
            seconds, loss = step(way, batch)
            times[way].append(seconds)
            losses[way].append(loss)
    every, labelled = (statistics.median(times[way]) for way in ways)
    return {
        "task": task,
        "steps": len(chosen),
        "batch_size": settings.batch_size,
        "precision": precision,
        "mean_length": statistics.mean(b["input_ids"].shape[1] for b in chosen),
        "mean_kept_positions": statistics.mean(kept_positions(b["labels"]) for b in chosen),
        "every_position_s_per_step": every,
        "labelled_positions_s_per_step": labelled,
        "speedup": every / labelled,
        "largest_loss_difference": max(abs(a - b) for a, b in zip(*(losses[way] for way in ways), strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps timed per task and way")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = parser.parse_args()
    results = [measure(task, args.steps, args.threads, args.precision) for task in args.tasks]
    print_table(
        ["task", "batch", "mean length", "mean kept", "every position s/step", "labelled s/step", "speedup",
         "largest loss difference"],
        [
            [
                r["task"],
                str(r["batch_size"]),
                f"{r['mean_length']:.1f}",
                f"{r['mean_kept_positions']:.1f}",
                f"{r['every_position_s_per_step']:.3f}",
                f"{r['labelled_positions_s_per_step']:.3f}",
                f"{r['speedup']:.2f}x",
                f"{r['largest_loss_difference']:.1e}",
            ]
            for r in results
        ],
    )  # fmt: skip
    path = write_results(f"completion_logits_cpu_{args.precision}", {"threads": args.threads, "results": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
