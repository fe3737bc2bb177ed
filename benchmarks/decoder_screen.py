"""Screening and confirming the opt-in start of AdaLoRA's triplets on the decoder table (decoder_table.py).

On SmolLM2-135M AdaLoRA trails LoRA in every cell of the decoder table and needs 3-10x LoRA's lr, while pruned LoRA
(the same scores and schedule in LoRA form) is level with LoRA: the loss comes from the SVD parametrisation, whose
lambda starts at 0 so that P and Q get no gradient until lambda moves (``adalora.layers.TripletStart`` has the
algebra). ``AdaLoRAConfig.triplet_init="lora"`` (P = 0, lambda = 1, Q as LoRA's A) lets P learn from step 0. This
script measures it with the decoder table's model, data, prompts, schedule and budget (its ``DecoderGrid``), at
r = 8 (init_r 12):

- the screen: seed 0 on the validation slice (300 examples carved from the training split), at the lrs of
  ``adapter_lrs``, which include LoRA's best (the goal: AdaLoRA's searched lr within 3x LoRA's); the baselines are
  the decoder table's own seed-0 search runs of AdaLoRA and LoRA at r = 8 (same grid, same keys);
- the confirmation: seeds 1-3 on the test split at the lr the screen chose (the decoder table's rule), to set
  beside the table's final AdaLoRA and LoRA rows at r = 8.

Runs are trained and scored as the decoder table's (``DecoderRunner``: ``adalora train``, then label accuracy by
log-likelihood with the saved adapter reloaded, and the completion perplexity). Results go to
benchmarks/results/decoder_confirm.json. benchmarks/results/decoder_screen.json and decoder_screen_precheck.json hold
the first screen, which a prototype ran with more options (starts that subtract their product from the base
weights, a learning rate of its own for lambda); those options are not in the library, so this script cannot run
them again, and the renderer shows their records as measured but not offered.

``--precheck`` is the cheaper step that came first: the first ``--precheck-steps`` optimizer steps of TREC-6 runs
(the same data order, schedule and allocator as a full run), the training loss per 10 steps and the validation
completion loss at the end, for each start at one or two lrs. It reproduces the recorded pre-check of the lora start
(same factors under the seed).

Usage (from the repository root, PYTHONPATH=src; one worker and one thread on the shared 2-core machine):
    setsid nohup python benchmarks/decoder_screen.py --workers 1 --threads 1 > screen.log 2>&1 &
    python benchmarks/decoder_screen.py --plan                   # what is done and left; trains nothing
    python benchmarks/decoder_screen.py --budget 2 --tasks trec  # another cell (decoder_confirm_r2.json)
    python benchmarks/decoder_screen.py --budget 2 --tasks sms-spam \
        --results benchmarks/results/decoder_confirm_r2_sms.json     # the other task's cell, a file of its own
    python benchmarks/decoder_screen.py --start lora-no-orth --tasks trec --lrs 3e-3   # a variation of the start
    python benchmarks/decoder_screen.py --precheck --threads 1   # the pre-check entries not yet recorded
    python benchmarks/decoder_screen.py --smoke                  # the whole pipeline on a tiny grid
    python benchmarks/render_decoder_screen.py                   # the markdown section
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from decoder_table import DECODER_RUNS, DecoderGrid, DecoderRunner, cpu_seconds, decoder_settings, progress
from paper_table import RESULTS, VARIANTS, Cell, RunSpec, Variant, line_log, run_table, save_results

LORA_START = "adalora-init-lora"  # the key of its runs in every results file (screen, pre-check, confirmation)
# Two variations of the lora start, each testing one reason it might still trail LoRA: with P = 0, Q gets no
# gradient from the loss at first, so Adam moves it by the orthogonal regulariser's gradient alone (gamma = 0 removes
# that); and its scale alpha / init_r = 16 / (1.5 r) is 2/3 of LoRA's 16 / r (alpha 24 makes it LoRA's).
LORA_START_NO_ORTH, LORA_START_LORA_SCALE = "adalora-init-lora-no-orth", "adalora-init-lora-lora-scale"
SCREEN_VARIANTS = (
    Variant(LORA_START, "adalora", "AdaLoRA, triplet_init lora (P = 0, lambda = 1, Q as LoRA's A)",
            overrides=(("triplet_init", "lora"),)),
    Variant(LORA_START_NO_ORTH, "adalora", "AdaLoRA, triplet_init lora, no orthogonal regulariser (gamma = 0)",
            overrides=(("triplet_init", "lora"), ("orth_reg_weight", 0.0))),
    Variant(LORA_START_LORA_SCALE, "adalora", "AdaLoRA, triplet_init lora, alpha 24 (LoRA's scale 16 / r)",
            overrides=(("triplet_init", "lora"), ("alpha", 24.0))),
)  # fmt: skip
VARIANTS.update({v.name: v for v in SCREEN_VARIANTS})
# --start NAME -> the variant it screens; its results files end in _NAME (the lora start's in nothing)
STARTS = {"lora": LORA_START, "lora-no-orth": LORA_START_NO_ORTH, "lora-scale": LORA_START_LORA_SCALE}

# The pre-check: (variant, lr) on TREC-6; adalora at 3e-2 is its searched best at r = 8, 3e-3 LoRA's.
PRECHECK: tuple[tuple[str, float], ...] = (("lora", 3e-3), ("adalora", 3e-3), ("adalora", 3e-2), (LORA_START, 3e-3))


@dataclass(frozen=True)
class ScreenGrid(DecoderGrid):
    """The decoder grid at r = 8 for the lora start alone: its seed-0 search on the validation slice (the screen;
    no extension of the lr grid), then seeds 1-3 on the test split at the chosen lr (the confirmation).

    ``main`` names no ``adalora`` or ``lora`` row (their runs are the decoder table's): paper_table.cells runs the
    option in its last tier, task by task.
    """

    budgets: tuple[int, ...] = (8,)
    main: tuple[str, ...] = (LORA_START,)
    ablations: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (1, 2, 3)
    adapter_lrs: tuple[float, ...] = (1e-3, 3e-3)  # the first screen tried 1e-2 too (decoder_screen.json)
    max_extensions: int = 0

    @classmethod
    def smoke(cls) -> ScreenGrid:
        """TREC only, 4 steps, one lr, one seed: every path."""
        return cls(
            tasks=("trec",),
            adapter_lrs=(3e-3,),
            seeds=(1,),
            train_size=16,
            val_size=8,
            test_limit=8,
            batch_size=8,
            mask_interval=1,
        )


# ---------------------------------------------------------------------------------------------- pre-check
def precheck_run(grid: DecoderGrid, runner: DecoderRunner, variant: str, lr: float, steps: int) -> dict[str, Any]:
    """The first ``steps`` optimizer steps of the TREC-6 r = 8 search run of ``variant`` at ``lr`` (everything else
    as the full run: data order, LR schedule and budget schedule of all 150 steps), then the validation loss."""
    import torch

    from adalora.integrations.loop import fit
    from adalora.run.batches import TensorBatches
    from adalora.run.evaluate import evaluate_perplexity
    from adalora.run.hardware import DeviceLoss, autocast
    from adalora.run.tasks import kind_of
    from adalora.run.train import prepare

    torch.set_num_threads(runner.threads)
    spec = RunSpec(Cell("trec", variant, 8), "search", lr, grid.search_seed)
    settings = decoder_settings(grid, spec, runner.files["trec"], runner.threads, "cpu")
    before, begin = cpu_seconds(), time.perf_counter()
    data, model, method = prepare(settings, log=lambda line: None)
    losses: list[float] = []
    batches = TensorBatches(data.train, settings.batch_size, settings.seed, 0)
    fit(
        model.module,
        [batches[i] for i in range(steps)],
        method.optimizer,
        method.allocator,
        scheduler=method.scheduler,
        max_grad_norm=settings.max_grad_norm,
        loss_fn=DeviceLoss(model.device, settings.precision, kind_of(settings.task).loss),
        on_step=lambda result: losses.append(result.loss),
    )
    with autocast(model.device, settings.precision):
        held_out = evaluate_perplexity(model.module, data.eval, settings.eval_batch_size)
    allocator = method.allocator
    return {
        "variant": variant,
        "lr": lr,
        "steps": steps,
        "train_loss_per_10_steps": [round(statistics.fmean(losses[i : i + 10]), 4) for i in range(0, steps, 10)],
        "val_loss": held_out["loss"],
        "val_perplexity": held_out["perplexity"],
        "total_rank": sum(allocator.rank_pattern().values()) if allocator is not None else None,
        "cpu_seconds": round(cpu_seconds() - before, 1),
        "wall_seconds": round(time.perf_counter() - begin, 1),
    }


def precheck(grid: DecoderGrid, runner: DecoderRunner, path: Path, steps: int, log: Any) -> dict[str, Any]:
    """Every :data:`PRECHECK` entry not yet in ``path`` (written after each; resumable)."""
    payload = json.loads(path.read_text()) if path.is_file() else {"steps": steps, "runs": {}}
    if payload["steps"] != steps:
        raise SystemExit(f"{path} holds pre-checks of {payload['steps']} steps; move it away or pass that number")
    for variant, lr in PRECHECK:
        key = f"trec/{variant}/r8/lr{lr:g}"
        if key in payload["runs"]:
            continue
        log(f"[{time.strftime('%H:%M:%S')}] pre-check {key}, {steps} steps")
        payload["runs"][key] = record = precheck_run(grid, runner, variant, lr, steps)
        log(f"  {key}: train loss per 10 steps {record['train_loss_per_10_steps']}, val loss {record['val_loss']:.4f}"
            f" ({record['cpu_seconds']:.0f} CPU s)")  # fmt: skip
        save_results(path, payload)
    return payload


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny grid on TREC (minutes), separate files")
    parser.add_argument("--plan", action="store_true", help="print progress and the projected time; train nothing")
    parser.add_argument("--precheck", action="store_true", help="the short pre-check runs instead of the screen")
    parser.add_argument("--precheck-steps", type=int, default=50, help="optimizer steps per pre-check run")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--budget", type=int, choices=(2, 8), default=8, help="target_r (the decoder table's r)")
    parser.add_argument("--tasks", nargs="+", choices=("trec", "sms-spam"), default=None, help="default: both")
    parser.add_argument("--start", choices=tuple(STARTS), default="lora", help="the start to screen (default lora)")
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="the screen's lr ladder (default 1e-3 3e-3)")
    args = parser.parse_args(argv)

    grid = ScreenGrid.smoke() if args.smoke else ScreenGrid(budgets=(args.budget,))
    grid = dataclasses.replace(grid, main=(STARTS[args.start],))
    if args.tasks:
        grid = dataclasses.replace(grid, tasks=tuple(args.tasks))
    if args.lrs:
        grid = dataclasses.replace(grid, adapter_lrs=tuple(args.lrs))
    # r = 8 is the screen's own budget; other budgets, starts and task subsets get files of their own (grids never
    # mix).
    name = (
        "decoder_confirm_smoke"
        if args.smoke
        else "decoder_confirm"
        + ("" if args.budget == 8 else f"_r{args.budget}")
        + ("" if args.start == "lora" else "_" + args.start.replace("-", "_"))
    )
    results_path = args.results or RESULTS / f"{name}.json"
    if args.plan:
        print(progress(grid, results_path, args.workers))
        return
    log = line_log()
    # The decoder table's prompt files (same grid sizes, so the same data), run directories of our own.
    runner = DecoderRunner(grid, DECODER_RUNS.with_name("decoder_screen_smoke" if args.smoke else "decoder_screen"),
                           args.threads)  # fmt: skip
    if args.precheck:
        path = args.results or RESULTS / "decoder_screen_precheck.json"
        precheck(DecoderGrid(), runner, path, args.precheck_steps, log)
        return
    run_table(grid, results_path, runner, log, max_runs=args.max_runs, workers=args.workers)
    log(progress(grid, results_path, args.workers))


if __name__ == "__main__":
    main()
