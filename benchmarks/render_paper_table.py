"""Render ``benchmarks/results/paper_table.json`` (written by ``paper_table.py``) as markdown and a figure.

- ``docs/paper-table.md``: between ``<!-- PAPER-TABLE -->`` and ``<!-- /PAPER-TABLE -->`` the full report
  (main table, AdaLoRA - LoRA differences, chosen learning rates, where the rank went, run times); the text
  outside the markers is hand-written and kept. The file is created with the markers if it does not exist.
- ``README.md``: the main table between the same markers, only if the README has them (the rest of the
  README is not touched).
- ``benchmarks/results/paper_table_ranks.png``: final rank of every adapted matrix (layer x matrix type) of
  one AdaLoRA run.

Cells are the mean ± standard deviation over the final seeds of the final-epoch test accuracy (in %); a cell
with fewer seeds than planned shows what it has and is marked pending. Bold: the best complete cell of each
column. Can be run at any time, also while the table is still running.

Usage: python benchmarks/render_paper_table.py [--results PATH] [--doc PATH] [--readme PATH] [--figure PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from paper_table import ROOT, TASKS, VARIANTS, Grid, base_lrs, cells, choose_lr, search_scores

BEGIN, END = "<!-- PAPER-TABLE -->", "<!-- /PAPER-TABLE -->"
MATRIX_ORDER = ("Wq", "Wk", "Wv", "Wo", "Wf1", "Wf2")

DOC_SKELETON = f"""# AdaLoRA against LoRA at laptop scale

The paper's comparisons (docs/algorithm.md, section 7) rerun on what installs offline: the packaged
all-MiniLM-L6-v2 and real packaged text. Produced by `benchmarks/paper_table.py` (see its docstring for the
protocol) and rendered by `benchmarks/render_paper_table.py`.

{BEGIN}
{END}
"""


# ---------------------------------------------------------------------------------------------- statistics
def final_runs(runs: dict[str, Any], task: str, variant: str, budget: int | None) -> list[dict[str, Any]]:
    return [
        r
        for r in runs.values()
        if r["phase"] == "final" and r["task"] == task and r["variant"] == variant and r["budget"] == budget
    ]


def summary(records: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(mean, sample std) of the accuracies in %, std 0 for one seed; None without runs."""
    if not records:
        return None
    values = [100 * r["accuracy"] for r in records]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def difference(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    """Difference of the mean accuracies in points, ± its standard error sqrt(s1^2/n1 + s2^2/n2) when both
    sides have two seeds or more."""
    (m1, s1), (m2, s2) = summary(mine), summary(theirs)  # type: ignore[misc]
    diff = round(m1 - m2, 2) + 0.0  # + 0.0: a difference that rounds to zero prints +0.00, not -0.00
    if min(len(mine), len(theirs)) < 2:
        return f"{diff:+.2f}"
    return f"{diff:+.2f} ± {(s1**2 / len(mine) + s2**2 / len(theirs)) ** 0.5:.2f}"


def count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def rows_of(grid: Grid) -> list[tuple[str, int | None]]:
    """Table rows (variant, budget) in display order: full fine-tuning, then each budget's block."""
    rows: list[tuple[str, int | None]] = [("full", None)] if grid.full else []
    for budget in sorted(grid.budgets):
        rows += [(v, budget) for v in grid.main]
        if budget == grid.ablation_budget:
            rows += [(v, budget) for v in grid.ablations]
    return rows


def row_label(grid: Grid, variant: str, budget: int | None) -> str:
    method = VARIANTS[variant].method
    if budget is None:
        return VARIANTS[variant].label
    start = round(grid.init_factor * budget)
    ranks = f"r = {budget}" if method == "lora" else f"r {start} → {budget}"
    return f"{VARIANTS[variant].label} ({ranks})"


def parameters(runs: dict[str, Any], grid: Grid, variant: str, budget: int | None) -> str:
    """Trainable parameters while training, and kept at the end (mean over runs) if fewer, for the first task
    with runs (the head differs a little between tasks: 2 or 6 classes)."""
    for task in grid.tasks:
        records = final_runs(runs, task, variant, budget)
        if records:
            trainable = records[0]["trainable_parameters"]
            kept = statistics.fmean(r["kept_parameters"] for r in records)
            return count(trainable) if round(kept) == trainable else f"{count(trainable)} → {count(kept)}"
    return "-"


# ---------------------------------------------------------------------------------------------- tables
def markdown(headers: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(payload: dict[str, Any], grid: Grid, label: Callable[[Grid, str, int | None], str] | None = None) -> str:
    """Test accuracy per row and task, mean ± std over seeds; ``label`` names a row (default :func:`row_label`)."""
    label = label or row_label
    runs, seeds = payload["runs"], len(grid.seeds)
    table_rows = rows_of(grid)
    stats = {(v, b, t): summary(final_runs(runs, t, v, b)) for v, b in table_rows for t in grid.tasks}
    complete = {
        (v, b, t): len(final_runs(runs, t, v, b)) == seeds for v, b in table_rows for t in grid.tasks
    }  # fmt: skip
    averages: dict[tuple[str, int | None], float | None] = {}
    for v, b in table_rows:
        full = all(complete[(v, b, t)] for t in grid.tasks)
        averages[(v, b)] = statistics.fmean(stats[(v, b, t)][0] for t in grid.tasks) if full else None  # type: ignore[index]
    best = {
        t: max((stats[(v, b, t)][0] for v, b in table_rows if complete[(v, b, t)]), default=None) for t in grid.tasks
    }
    best_average = max((a for a in averages.values() if a is not None), default=None)

    def cell(v: str, b: int | None, t: str) -> str:
        found, n = stats[(v, b, t)], len(final_runs(runs, t, v, b))
        if found is None:
            return "pending"
        mean, std = found
        if n < seeds:
            return f"_{mean:.2f} ({n}/{seeds} seeds, pending)_"
        text = f"{mean:.2f} ± {std:.2f}"
        return f"**{text}**" if best[t] is not None and round(mean, 2) == round(best[t], 2) else text

    rows = []
    for v, b in table_rows:
        average = averages[(v, b)]
        shown = "pending" if average is None else f"{average:.2f}"
        if average is not None and best_average is not None and round(average, 2) == round(best_average, 2):
            shown = f"**{shown}**"
        rows.append([label(grid, v, b), parameters(runs, grid, v, b), *(cell(v, b, t) for t in grid.tasks), shown])
    headers = ["Method", "Trainable params", *(TASKS[t].label for t in grid.tasks), "Average"]
    return markdown(headers, rows)


def delta_table(payload: dict[str, Any], grid: Grid) -> str:
    """AdaLoRA minus each baseline at the same budget, per task, in accuracy points (mean over seeds)."""
    runs = payload["runs"]
    rows = []
    for budget in sorted(grid.budgets):
        for other in [v for v in grid.main if v != "adalora"] + (
            list(grid.ablations) if budget == grid.ablation_budget else []
        ):
            row = [f"AdaLoRA - {VARIANTS[other].label} (r = {budget})"]
            for task in grid.tasks:
                mine, theirs = final_runs(runs, task, "adalora", budget), final_runs(runs, task, other, budget)
                if not mine or not theirs:
                    row.append("pending")
                    continue
                row.append(difference(mine, theirs) + (
                    f" ({len(mine)} vs {len(theirs)} seeds)" if len(grid.seeds) > min(len(mine), len(theirs)) else ""
                ))  # fmt: skip
            rows.append(row)
    return markdown(["Difference (points)", *(TASKS[t].label for t in grid.tasks)], rows)


def lr_table(payload: dict[str, Any], grid: Grid) -> str:
    """The lr each search chose, its validation accuracy and the lrs tried (edge: still best at the edge after
    the allowed extensions)."""
    runs = payload["runs"]
    rows = []
    searched = [(v, b) for v, b in rows_of(grid) if VARIANTS[v].lr_from is None]
    for v, b in searched:
        row = [row_label(grid, v, b)]
        for task in grid.tasks:
            cell = next(c for c in cells(grid) if (c.task, c.variant, c.budget) == (task, v, b))
            scores = search_scores(runs, cell)
            chosen, _ = choose_lr(scores, base_lrs(grid, v), grid.max_extensions)
            tried = "/".join(f"{lr:g}" for lr in sorted(scores))
            if chosen is None:
                row.append(f"searching ({tried or 'none yet'})")
                continue
            edge = " (edge)" if chosen in (min(scores), max(scores)) else ""
            row.append(f"{chosen:g}{edge}, val {100 * scores[chosen][0]:.1f} [{tried}]")
        rows.append(row)
    ablations = ", ".join(VARIANTS[v].label for v in grid.ablations)
    note = f"\n\nThe ablations ({ablations}) use AdaLoRA's lr at their budget." if grid.ablations else ""
    return markdown(["Method", *(TASKS[t].label for t in grid.tasks)], rows) + note


def rank_summary(payload: dict[str, Any], grid: Grid) -> str:
    """Mean final rank per matrix type and per layer over the final AdaLoRA runs, per budget and task."""
    from adalora.run.plots import split_name

    runs = payload["runs"]
    type_rows, layer_rows, layers_seen = [], [], set()
    per: dict[tuple[int, str], list[dict[str, int]]] = {}
    for r in runs.values():
        if r["phase"] == "final" and r["variant"] == "adalora" and r.get("rank_pattern"):
            per.setdefault((r["budget"], r["task"]), []).append(r["rank_pattern"])
    if not per:
        return "No finished AdaLoRA run yet."
    for (budget, task), patterns in sorted(per.items()):
        by_type: dict[str, list[int]] = {}
        by_layer: dict[int, list[int]] = {}
        for pattern in patterns:
            for name, rank in pattern.items():
                layer, kind = split_name(name)
                by_type.setdefault(kind, []).append(rank)
                if layer is not None:
                    by_layer.setdefault(layer, []).append(rank)
                    layers_seen.add(layer)
        ffn = statistics.fmean(by_type.get("Wf1", []) + by_type.get("Wf2", []))
        label = f"r = {budget}, {TASKS[task].label} ({len(patterns)} runs)"
        type_rows.append(
            [
                label,
                *(f"{statistics.fmean(by_type[k]):.2f}" if k in by_type else "-" for k in MATRIX_ORDER),
                f"{100 * ffn * 12 / (budget * 36):.0f} %",
            ]
        )
        layer_rows.append([label, *(f"{statistics.fmean(by_layer[i]):.2f}" for i in sorted(by_layer))])
    by_type_md = markdown(["Runs", *MATRIX_ORDER, "FFN share of the budget"], type_rows)
    by_layer_md = markdown(["Runs", *(f"layer {i + 1}" for i in sorted(layers_seen))], layer_rows)
    return (
        "Mean final rank per matrix type (a uniform allocation gives every matrix r; the two FFN types hold a "
        "third of the matrices, so a uniform allocation gives them 33 % of the budget):\n\n"
        f"{by_type_md}\n\nMean final rank per layer:\n\n{by_layer_md}"
    )


def timing(payload: dict[str, Any], grid: Grid) -> str:
    """Median seconds per run by task and method: wall clock (what it took on the shared machine) and CPU
    (about what it takes alone on one core; older records lack it)."""
    runs = list(payload["runs"].values())
    if not runs:
        return ""

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.0f}" if values else "-"

    rows = []
    for task in grid.tasks:
        mine = [r for r in runs if r["task"] == task]
        if not mine:
            continue
        cols = []
        for variant in ("adalora", "lora", "pruned-lora", "full"):
            same = [r for r in mine if r["variant"] == variant]
            wall = median([r["train_seconds"] for r in same])
            cpu = median([r["cpu_seconds"] for r in same if "cpu_seconds" in r])
            cols.append(f"{wall} / {cpu}")
        rows.append([TASKS[task].label, str(len(mine)), *cols])
    return (
        markdown(["Task", "Runs", "AdaLoRA", "LoRA", "Pruned LoRA", "Full FT"], rows)
        + "\n\nMedian seconds per run, wall clock / CPU (model loading, training and both evaluations), one torch"
        " thread per run (a few had two), one or two runs at a time on a 2-core machine shared with other jobs"
        " (some runs were paused by neighbours, hence the median). The CPU time is about what a run takes alone"
        " on one core."
    )


def setup_line(grid: Grid) -> str:
    steps = grid.epochs * (grid.train_size // grid.batch_size)
    lengths = ", ".join(f"{TASKS[t].label} {TASKS[t].max_length}" for t in grid.tasks)
    tests = ", ".join(f"{TASKS[t].label} {grid.test_limit or TASKS[t].test_size}" for t in grid.tasks)
    return (
        f"all-MiniLM-L6-v2 (22.7M parameters), all 36 attention and FFN matrices adapted; {grid.train_size} "
        f"training examples, {grid.epochs} epochs of batch {grid.batch_size} ({steps} steps), max length "
        f"{lengths} tokens; lr searched per method and budget on {grid.val_size} validation examples carved from "
        f"the training split; test examples {tests}; {len(grid.seeds)} seeds per cell"
    )


def block(payload: dict[str, Any], grid: Grid, figure: Path | None, doc: Path, compact: bool) -> str:
    runs = payload["runs"]
    finals = sum(r["phase"] == "final" for r in runs.values())
    searches = sum(r["phase"] == "search" for r in runs.values())
    planned = len(cells(grid)) * len(grid.seeds)
    status = (
        f"Status: {finals} of {planned} final runs and {searches} lr-search runs done "
        f"(results file updated {max((r.get('finished', '') for r in runs.values()), default='never')})."
    )
    parts = [
        status,
        f"Setup: {setup_line(grid)}.",
        "Test accuracy (%), mean ± std over seeds:",
        main_table(payload, grid),
    ]
    if compact:
        parts.append(f"Details (learning rates, rank allocation, timings): [{doc.name}](docs/{doc.name}).")
        return "\n\n".join(parts)
    parts += [
        "### AdaLoRA minus the baselines and ablations (test accuracy points)",
        "Difference of the mean test accuracies ± its standard error (from the seeds' standard deviations); a"
        " difference within about twice its standard error is not one that three seeds can tell apart.",
        delta_table(payload, grid),
        "### Learning rates chosen on the validation split",
        lr_table(payload, grid),
        "### Where the rank went (final AdaLoRA runs)",
        rank_summary(payload, grid),
    ]
    if figure is not None and figure.is_file():
        relative = Path(os.path.relpath(figure.resolve(), doc.resolve().parent))
        parts.append(f"![final ranks of one AdaLoRA run]({relative.as_posix()})")
    if timing(payload, grid):
        parts += ["### Run times", timing(payload, grid)]
    probes = Path(__file__).parent / "results" / "paper_table_probe.json"
    if probes.is_file():
        from paper_table_probe import summary_markdown

        parts += [
            "### Diagnostics on the validation slice (`paper_table_probe.py`; not used for the table)",
            summary_markdown(json.loads(probes.read_text())),
        ]
    return "\n\n".join(parts)


def replace_between_markers(text: str, content: str, begin: str = BEGIN, end: str = END) -> str | None:
    """``text`` with everything between the markers ``begin`` and ``end`` replaced; None if it lacks them."""
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        return None
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{content}\n{end}{tail}"


def draw_figure(payload: dict[str, Any], grid: Grid, path: Path) -> Path | None:
    """Heatmap of one AdaLoRA run's final ranks: the largest budget (finer grain), first task and seed."""
    from adalora.run.plots import plot_rank_heatmap

    for budget in sorted(grid.budgets, reverse=True):
        for task in grid.tasks:
            records = sorted(final_runs(payload["runs"], task, "adalora", budget), key=lambda r: r["seed"])
            if records and records[0].get("rank_pattern"):
                r = records[0]
                start = round(grid.init_factor * budget)
                title = f"AdaLoRA final ranks, {TASKS[task].label}, r {start} → {budget}, seed {r['seed']}"
                path.parent.mkdir(parents=True, exist_ok=True)
                return plot_rank_heatmap(r["rank_pattern"], path, init_r=start, title=title)
    return None


def render(results: Path, doc: Path, readme: Path | None, figure: Path) -> list[Path]:
    """Write the figure, the doc block and (if it has the markers) the README block; returns what was written."""
    payload = json.loads(results.read_text())
    grid = Grid(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["grid"].items()})
    written = []
    drawn = draw_figure(payload, grid, figure)
    if drawn is not None:
        written.append(drawn)
    text = doc.read_text() if doc.is_file() else DOC_SKELETON
    doc.parent.mkdir(parents=True, exist_ok=True)
    new = replace_between_markers(text, block(payload, grid, drawn, doc, compact=False))
    if new is None:
        raise SystemExit(f"{doc} lacks the markers {BEGIN} ... {END}")
    doc.write_text(new)
    written.append(doc)
    if readme is not None and readme.is_file():
        updated = replace_between_markers(readme.read_text(), block(payload, grid, drawn, doc, compact=True))
        if updated is not None:
            readme.write_text(updated)
            written.append(readme)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/paper_table.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/paper-table.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks/results/paper_table_ranks.png")
    args = parser.parse_args(argv)
    for path in render(args.results, args.doc, args.readme, args.figure):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
