"""Does AdaLoRA's lora start (``triplet_init="lora"``) lose on encoders what it gains on decoders?

The encoder table's protocol (paper_table.py: all-MiniLM-L6-v2, same data, schedule and budget) for the lora start
alone at r = 2 on TREC-6 and Rotten Tomatoes: an lr search on the validation slice (seed 0, the table's ladder, no
extension), then seeds 1-3 on the test split at the chosen lr. The AdaLoRA and LoRA rows it is compared with are
the encoder table's own final runs (benchmarks/results/paper_table.json).

Usage (repository root, PYTHONPATH=src; resumable, one run at a time):
    python benchmarks/encoder_start_check.py --threads 1 [--tasks trec]
    python benchmarks/encoder_start_check.py --table      # the comparison from the results so far; trains nothing
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from decoder_screen import LORA_START  # registers the lora start's row in paper_table.VARIANTS
from paper_table import RESULTS, RUNS, TASKS, Grid, Runner, line_log, load_results, plan_report, run_table
from render_paper_table import difference, final_runs, markdown, summary

RESULTS_FILE = RESULTS / "encoder_start_check.json"


@dataclass(frozen=True)
class StartGrid(Grid):
    """The encoder table's grid, r = 2, the lora start only (its AdaLoRA and LoRA rows are the table's)."""

    tasks: tuple[str, ...] = ("trec", "rotten-tomatoes")
    budgets: tuple[int, ...] = (2,)
    main: tuple[str, ...] = (LORA_START,)
    ablations: tuple[str, ...] = ()
    full: bool = False
    max_extensions: int = 0


def comparison(runs: dict[str, Any], table: dict[str, Any], budget: int = 2) -> str:
    """Test accuracy (mean ± std over seeds) of AdaLoRA, LoRA and the lora start per task, and the differences to
    LoRA (± standard error), for the tasks where the lora start has final runs."""
    finals = {**table, **runs}
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs.values() if r["phase"] == "final"):
        lora = final_runs(finals, task, "lora", budget)
        for variant in ("lora", "adalora", LORA_START):
            mine = final_runs(finals, task, variant, budget)
            if not mine:
                continue
            mean, std = summary(mine)  # type: ignore[misc]
            lrs = ", ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in mine}))
            vs_lora = "" if variant == "lora" else difference(mine, lora)
            rows.append([TASKS[task].label, variant, lrs, f"{mean:.2f} ± {std:.2f}", str(len(mine)), vs_lora])
    header = ["Task", "Row", "lr", "test acc. % (mean ± std)", "seeds", "vs LoRA (± s.e.)"]
    return markdown(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=StartGrid.tasks, default=None, help="default: both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--table", action="store_true", help="print the comparison only")
    args = parser.parse_args(argv)
    grid = StartGrid(tasks=tuple(args.tasks)) if args.tasks else StartGrid()
    path = (
        RESULTS_FILE
        if grid.tasks == StartGrid.tasks
        else RESULTS_FILE.with_stem(f"{RESULTS_FILE.stem}_{'_'.join(grid.tasks)}")
    )
    table = json.loads((RESULTS / "paper_table.json").read_text())["runs"]
    if not args.table:
        runner = Runner(grid, RUNS.with_name("encoder_start_check"), args.threads)
        run_table(grid, path, runner, line_log())
    payload = load_results(path, grid)
    print(plan_report(grid, payload, 1))
    print(comparison(payload["runs"], table))


if __name__ == "__main__":
    main()
