"""Does the rank pattern pay? A short AdaLoRA probe's allocation, trained as a plain LoRA, against uniform LoRA.

The workflow docs/adapter-files.md describes, measured on the decoder table's cells (decoder_table.py: the packaged
SmolLM2-135M, TREC-6 and SMS spam prompts, every q/k/v/o/gate/up/down projection, bf16 autocast, r = 2 and 8):

1. **the probe**: the table's AdaLoRA (init_r = 1.5 r, target_r = r, the paper's start) at the lr its search chose
   for the cell, on the first 30 % of the run's optimizer steps: one epoch over the first 720 of the 1,200 training
   examples = 45 of the table's 150 steps, with the budget schedule fitted to those 45 steps (t_i = 9, t_f = 14),
   so the allocation is final when the probe ends; scored on the validation slice only;
2. ``adalora export PROBE --format rank-pattern``, then ``adalora train --method lora --lora-r r --rank-pattern
   PROBE/export-rank-pattern.json``: every module at the probe's rank (the total is the probe's final budget, r x
   210 = uniform LoRA's), at uniform LoRA's scale alpha / r and at the lr LoRA's search chose for the cell (no
   search of its own), on the full training set and schedule;
3. compared, seed by seed, with the table's uniform LoRA final runs (seeds 1-3, test split).

Each seed gets its own probe (same seed), so the spread includes the pattern's. The probe's CPU time is recorded
beside the LoRA run's: the cost of the workflow is probe + LoRA.

Results: benchmarks/results/probe_then_lora_<task><part>.json (one file per task, so two tasks can run at once;
``--part`` names another file for a process that runs other seeds of the same task);
``--render`` writes the section of docs/paper-table.md between the PROBE-THEN-LORA markers and prints it.

Usage (from the repository root, PYTHONPATH=src; one thread per process on the shared 2-core machine):
    setsid nohup python benchmarks/probe_then_lora.py --tasks trec > trec.log 2>&1 &
    python benchmarks/probe_then_lora.py --render
    python benchmarks/probe_then_lora.py --smoke      # the whole pipeline on a tiny grid (separate files)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from decoder_table import DECODER_RUNS, PROMPT_TASKS, DecoderGrid, DecoderRunner, decoder_settings
from paper_table import RESULTS, VARIANTS, Cell, RunSpec, Variant, execute, line_log, save_results

PATTERN = "lora-probe-pattern"
VARIANTS[PATTERN] = Variant(PATTERN, "lora", "LoRA at a 30 % AdaLoRA probe's rank pattern")
PROBE_FRACTION = 0.3
DOC = Path(__file__).parent.parent / "docs" / "paper-table.md"
MARKERS = ("<!-- PROBE-THEN-LORA -->", "<!-- /PROBE-THEN-LORA -->")


def chosen_lrs(table: dict[str, Any]) -> dict[tuple[str, str, int], float]:
    """{(task, variant, r): lr} of the table's final runs (the lr its search chose)."""
    return {(r["task"], r["variant"], r["budget"]): r["lr"] for r in table["runs"].values() if r["phase"] == "final"}


def uniform_lora(table: dict[str, Any]) -> dict[tuple[str, int, int], float]:
    """{(task, r, seed): test accuracy} of the table's uniform LoRA final runs."""
    return {
        (r["task"], r["budget"], r["seed"]): r["accuracy"]
        for r in table["runs"].values()
        if r["phase"] == "final" and r["variant"] == "lora"
    }


def probe(grid: DecoderGrid, runner: DecoderRunner, task: str, budget: int, seed: int, lr: float) -> dict[str, Any]:
    """Train the probe of (task, r, seed) and export its rank pattern; returns what the record keeps of it."""
    from adalora.run.convert import export_output_dir

    steps = round(PROBE_FRACTION * grid.train_size * grid.epochs / grid.batch_size)
    examples = steps * grid.batch_size  # one epoch over them
    spec = RunSpec(Cell(task, "adalora", budget), "search", lr, seed)  # search: scored on the validation slice
    settings = decoder_settings(grid, spec, runner.files[task], runner.threads, "cpu").replace(
        max_train=examples, epochs=1
    )
    run_dir = runner.runs_dir / "probe" / task / f"r{budget}" / f"s{seed}"
    metrics, cpu = execute(settings, run_dir, lambda line: print(f"  [probe {task} r{budget} s{seed}] {line}"))
    recipe = export_output_dir(run_dir, format="rank-pattern")
    ranks = json.loads(recipe.read_text())["ranks"]
    return {
        "path": recipe,
        "steps": metrics["total_steps"],
        "examples": examples,
        "lr": lr,
        "cpu_seconds": round(cpu, 1),
        "total_rank": sum(ranks.values()),
        "pruned_modules": sum(1 for k in ranks.values() if k == 0),
        "largest_rank": max(ranks.values()),
        "ranks": ranks,
    }


def run_cell(grid: DecoderGrid, runner: DecoderRunner, key: tuple[str, int, int], lrs: dict) -> dict[str, Any]:
    """Probe, then LoRA at its pattern; the record of the LoRA run with the probe's beside it."""
    task, budget, seed = key
    found = probe(grid, runner, task, budget, seed, lrs[(task, "adalora", budget)])
    spec = RunSpec(Cell(task, PATTERN, budget), "final", lrs[(task, "lora", budget)], seed)
    record = runner(spec, rank_pattern=str(found.pop("path")))
    return record | {"probe": found}


def plan(grid: DecoderGrid, seeds: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(task, r, seed), both budgets of a seed before the next seed: partial results cover every cell."""
    return [(t, r, s) for t in grid.tasks for s in seeds for r in sorted(grid.budgets, reverse=True)]


def run_all(grid: DecoderGrid, runner: DecoderRunner, path: Path, seeds: tuple[int, ...], table: dict) -> None:
    log = line_log()
    payload = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    lrs = chosen_lrs(table)
    for key in plan(grid, seeds):
        name = "{}/r{}/s{}".format(*key)
        if name in payload["runs"]:
            continue
        log(f"[{time.strftime('%H:%M:%S')}] probe then LoRA: {name}")
        payload["runs"][name] = record = run_cell(grid, runner, key, lrs)
        log(f"  {name}: accuracy {record['accuracy']:.4f}, probe {record['probe']['cpu_seconds']:.0f} + LoRA "
            f"{record['cpu_seconds']:.0f} CPU s, {record['probe']['pruned_modules']} modules pruned")  # fmt: skip
        save_results(path, payload)


# ---------------------------------------------------------------------------------------------- the table
def mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{mean:+.2f} ± {se:.2f}" if len(values) > 1 else f"{mean:+.2f}"


def render(table: dict[str, Any], paths: list[Path]) -> str:
    """The markdown section: per cell, LoRA at the probe's pattern, uniform LoRA and the paired difference."""
    runs = {k: r for p in paths if p.is_file() for k, r in json.loads(p.read_text())["runs"].items()}
    uniform = uniform_lora(table)
    lines = [
        "| Task | r | seeds | Uniform LoRA | LoRA at the probe's pattern | Difference (points) | Modules pruned "
        "| Largest rank | Probe / LoRA CPU time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted({(r["task"], r["budget"]) for r in runs.values()}, key=lambda c: (c[0] != "trec", -c[1]))
    diffs: list[float] = []
    for task, budget in cells:
        mine = sorted(
            (r for r in runs.values() if r["task"] == task and r["budget"] == budget), key=lambda r: r["seed"]
        )
        pattern = [100 * r["accuracy"] for r in mine]
        base = [100 * uniform[(task, budget, r["seed"])] for r in mine]
        paired = [a - b for a, b in zip(pattern, base, strict=True)]
        diffs.append(statistics.fmean(paired))
        cost = statistics.fmean(r["probe"]["cpu_seconds"] / r["cpu_seconds"] for r in mine)
        lines.append(
            f"| {PROMPT_TASKS[task].label} | {budget} | {len(mine)} | {statistics.fmean(base):.2f} "
            f"| {statistics.fmean(pattern):.2f} | {mean_se(paired)} "
            f"| {statistics.fmean(r['probe']['pruned_modules'] for r in mine):.0f} of 210 "
            f"| {max(r['probe']['largest_rank'] for r in mine)} | {cost:.2f} |"
        )
    if diffs:
        lines.append(f"\nAverage over the {len(diffs)} cells: {statistics.fmean(diffs):+.2f} points against uniform "
                     "LoRA (test accuracy, seeds paired).")  # fmt: skip
    return "\n".join(lines)


def write_section(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(MARKERS[0]) + len(MARKERS[0]), doc.index(MARKERS[1])
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=tuple(PROMPT_TASKS), default=None, help="default: both")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the table's (1 2 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--part", default="", help="suffix of the results file, for another process on other seeds")
    parser.add_argument("--render", action="store_true", help="write the docs section from the results; train nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny grid on TREC (minutes), separate files")
    args = parser.parse_args(argv)

    table_path = RESULTS / ("decoder_table_smoke.json" if args.smoke else "decoder_table.json")
    table = json.loads(table_path.read_text())
    grid = DecoderGrid.smoke() if args.smoke else DecoderGrid()
    stem = "probe_then_lora_smoke" if args.smoke else "probe_then_lora"
    if args.render:
        text = render(table, sorted(RESULTS.glob(f"{stem}_*.json")))
        print(text)
        if not args.smoke:
            write_section(text)
        return
    tasks = tuple(args.tasks or grid.tasks)
    for task in tasks:
        one = DecoderGrid.smoke() if args.smoke else DecoderGrid(tasks=(task,))
        runner = DecoderRunner(one, DECODER_RUNS.with_name(stem), args.threads)
        run_all(one, runner, RESULTS / f"{stem}_{task}{args.part}.json", tuple(args.seeds or one.seeds), table)
    print(render(table, [RESULTS / f"{stem}_{t}{args.part}.json" for t in tasks]))


if __name__ == "__main__":
    main()
