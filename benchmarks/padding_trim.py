"""Training steps with every row padded to ``--max-length`` against batches cut to their longest row.

``adalora.run.batches.trim_padding`` cuts the columns that are padding in every row of a batch (rounded up to a
multiple of 8) before the forward. The loss is the same (tests/run/test_batches.py); this measures what it saves
on the runs ``adalora train`` makes, built by :func:`adalora.run.train.prepare` exactly as the CLI builds them:

- ``default``: the CLI's default run (packaged all-MiniLM-L6-v2, Rotten Tomatoes, AdaLoRA, its defaults);
- ``trec``: the same model on TREC-6 questions (short texts) at ``--max-length 64``, batch 32;
- ``smollm2-trec``: the packaged SmolLM2-135M on the decoder table's TREC-6 prompts (``--task causal-lm``,
  ``--max-length 48``, batch 16, every projection adapted; needs ``benchmarks/decoder_table.py``'s data files,
  written on the first run of that script or here).

Each case runs the same batches (the first ``--steps`` of epoch 0) both ways, alternating one step each, so that
machine noise hits both alike; the table reports median seconds per optimizer step, the tokens per batch and the
ratio. One torch thread by default (``--threads``).

Usage (repository root, PYTHONPATH=src):
    python benchmarks/padding_trim.py                 # all cases, 12 steps each
    python benchmarks/padding_trim.py --cases default --steps 20
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

CASES = ("default", "trec", "smollm2-trec")


def settings_for(case: str, threads: int) -> Any:
    from adalora.run.settings import RunSettings

    if case == "default":
        return RunSettings(threads=threads, seed=0)
    if case == "trec":
        return RunSettings(task="trec", max_length=64, batch_size=32, threads=threads, seed=0)
    from decoder_table import benchmark_settings

    return benchmark_settings("trec", threads)


def measure(case: str, steps: int, threads: int) -> dict[str, Any]:
    from adalora.run.batches import TensorBatches
    from adalora.run.hardware import DeviceLoss, resolve_device
    from adalora.run.tasks import kind_of
    from adalora.run.train import prepare

    settings = settings_for(case, threads)
    settings = settings.replace(device=resolve_device(settings.device))  # as the run's check stage decides it
    data, model, _ = prepare(settings)
    loss_fn = DeviceLoss(model.device, settings.precision, kind_of(settings.task).loss)
    batches = TensorBatches(data.train, settings.batch_size, settings.seed, 0)
    cut = [batches[i] for i in range(min(steps, len(batches)))]
    rows = batches.order[: len(cut) * batches.batch_size].view(len(cut), -1)
    full = [{key: value[r] for key, value in data.train.items()} for r in rows]
    parameters = [p for p in model.module.parameters() if p.requires_grad]

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        loss_fn(model.module, batch).backward()
        for p in parameters:
            p.grad = None
        return time.perf_counter() - start

    step(full[0]), step(cut[0])  # warm-up
    times: dict[str, list[float]] = {"padded": [], "cut": []}
    for padded_batch, cut_batch in zip(full, cut, strict=True):
        times["padded"].append(step(padded_batch))
        times["cut"].append(step(cut_batch))
    padded_s, cut_s = statistics.median(times["padded"]), statistics.median(times["cut"])
    return {
        "case": case,
        "steps": len(cut),
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "mean_cut_length": statistics.mean(b["input_ids"].shape[1] for b in cut),
        "padded_s_per_step": padded_s,
        "cut_s_per_step": cut_s,
        "speedup": padded_s / cut_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps timed per case and way")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results = [measure(case, args.steps, args.threads) for case in args.cases]
    print_table(
        ["case", "batch x max length", "mean cut length", "padded s/step", "cut s/step", "speedup"],
        [
            [
                r["case"],
                f"{r['batch_size']} x {r['max_length']}",
                f"{r['mean_cut_length']:.1f}",
                f"{r['padded_s_per_step']:.3f}",
                f"{r['cut_s_per_step']:.3f}",
                f"{r['speedup']:.2f}x",
            ]
            for r in results
        ],
    )
    path = write_results("padding_trim_cpu", {"threads": args.threads, "results": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
