"""Render ``benchmarks/results/decoder_table.json`` (written by ``decoder_table.py``) into the decoder section of
``docs/paper-table.md`` (between ``<!-- DECODER-TABLE -->`` and ``<!-- /DECODER-TABLE -->``; appended with its
heading if missing) and, once final runs exist, a summary line in README.md (between the same markers, placed
after the encoder table's block the first time). Reuses the encoder renderer's statistics and tables.

Can be run at any time, also while the table runs. Usage:
    python benchmarks/render_decoder_table.py [--results PATH] [--doc PATH] [--readme PATH] [--figure PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from decoder_table import PROMPT_TASKS, DecoderGrid
from paper_table import (
    ROOT,
    VARIANTS,
    base_lrs,
    cells,
    choose_lr,
    extension_runs,
    planned_left,
    planned_total,
    search_scores,
)
from render_paper_table import END as PAPER_END
from render_paper_table import difference, final_runs, main_table, markdown, replace_between_markers, rows_of

BEGIN, END = "<!-- DECODER-TABLE -->", "<!-- /DECODER-TABLE -->"
HEADING = "## Decoder: SmolLM2-135M, prompt -> label word"
ATTENTION, MLP = ("Wq", "Wk", "Wv", "Wo"), ("Wg", "Wf1", "Wf2")  # plots.split_name's symbols for q..o, gate/up/down
TYPE_NAMES = {"Wq": "q", "Wk": "k", "Wv": "v", "Wo": "o", "Wg": "gate", "Wf1": "up", "Wf2": "down"}


def grid_of(payload: dict[str, Any]) -> DecoderGrid:
    return DecoderGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["grid"].items()})


def row_label(grid: DecoderGrid, variant: str, budget: int | None) -> str:
    """``LoRA (r = 8)``, ``AdaLoRA (r 12 → 8)``; the scale rows with their start rank and scale alpha / init_r."""
    from decoder_table import PEFT_INIT_FACTOR, PEFT_SCALE

    assert budget is not None
    label, method = VARIANTS[variant].label, VARIANTS[variant].method
    if method == "lora":
        return f"{label} (r = {budget}, scale {16 / budget:g})"
    start = round((PEFT_INIT_FACTOR if variant == "adalora-peft-scale" else grid.init_factor) * budget)
    scale = PEFT_SCALE if variant == "adalora-peft-scale" else 16 / start
    return f"{label} (r {start} → {budget}, scale {scale:.3g})"


def status_line(payload: dict[str, Any], grid: DecoderGrid) -> str:
    runs = payload["runs"]
    search, final = planned_total(grid)
    left_search, left_final = planned_left(grid, runs)
    done_final, done_search = final - left_final, search - left_search
    cpu = [r["cpu_seconds"] for r in runs.values() if "cpu_seconds" in r]
    devices = sorted({r.get("device", "cpu") for r in runs.values()}) or ["none yet"]
    updated = max((r.get("finished", "") for r in runs.values()), default="never")
    text = (
        f"Status: {done_final} of {final} final runs and {done_search} of {search} planned lr-search runs done, "
        f"plus {extension_runs(grid, runs)} lr-grid extension runs (runs on: {', '.join(devices)}; "
        f"results file updated {updated})."
    )
    if not cpu:
        return text
    per_run, left = statistics.median(cpu), left_search + left_final
    if left:
        return text + (
            f" Median {per_run / 60:.1f} CPU minutes per run so far ({len(cpu)} runs); the {left} runs left need "
            f"about {left * per_run / 3600:.0f} CPU hours (one core per run), before any lr-grid extension."
        )
    return text + (
        f" Every planned run is done: median {per_run / 60:.1f} CPU minutes per run, {sum(cpu) / 3600:.1f} CPU hours "
        f"in all ({len(cpu)} runs)."
    )


def setup_line(grid: DecoderGrid) -> str:
    steps = grid.epochs * (grid.train_size // grid.batch_size)
    return (
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32; forward passes under {grid.precision} autocast), "
        "all 210 q/k/v/o/gate/up/down projections "
        f"adapted, loss on the completion only; {grid.train_size} training examples, {grid.epochs} epochs of batch "
        f"{grid.batch_size} ({steps} steps), prompt + label + EOS at most "
        + ", ".join(f"{PROMPT_TASKS[t].label} {length}" for t, length in grid.max_lengths if t in grid.tasks)
        + f" tokens; lr searched on {grid.val_size} validation examples carved from the training split (grid "
        f"{'/'.join(f'{lr:g}' for lr in grid.adapter_lrs)}, extended along 1-3-10 when best on an edge); "
        f"{grid.test_limit} test examples per task; {len(grid.seeds)} seeds per cell. Accuracy: the label whose "
        "word (+ EOS) has the highest log-likelihood given the prompt"
    )


def perplexity_table(payload: dict[str, Any], grid: DecoderGrid) -> str:
    """Held-out perplexity of the completions (label word + EOS), mean ± std over the final seeds."""
    runs = payload["runs"]
    rows = []
    for v, b in rows_of(grid):
        row = [row_label(grid, v, b)]
        for task in grid.tasks:
            values = [r["perplexity"] for r in final_runs(runs, task, v, b)]
            if not values:
                row.append("pending")
                continue
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            pending = "" if len(values) == len(grid.seeds) else f" ({len(values)}/{len(grid.seeds)} seeds)"
            row.append(f"{statistics.fmean(values):.3f} ± {std:.3f}{pending}")
        rows.append(row)
    before = ["Before fine-tuning"]
    for task in grid.tasks:
        found = [r["perplexity_before"] for r in runs.values() if r["task"] == task and r["eval_split"] == "test"]
        before.append(f"{found[0]:.2f}" if found and found[0] else "pending")
    return markdown(["Method", *(PROMPT_TASKS[t].label for t in grid.tasks)], [before, *rows])


def delta_table(payload: dict[str, Any], grid: DecoderGrid) -> str:
    """AdaLoRA minus LoRA and pruned LoRA per budget, and each scale row minus LoRA at its budget."""
    runs = payload["runs"]
    pairs = [("adalora", other, b) for b in sorted(grid.budgets) for other in grid.main if other != "adalora"]
    pairs += [(v, "lora", grid.ablation_budget) for v in grid.ablations]
    pairs += [("adalora", v, grid.ablation_budget) for v in grid.ablations]
    rows = []
    for mine, other, budget in pairs:
        row = [f"{VARIANTS[mine].label} - {VARIANTS[other].label} (r = {budget})"]
        for task in grid.tasks:
            a, b = final_runs(runs, task, mine, budget), final_runs(runs, task, other, budget)
            row.append(difference(a, b) if a and b else "pending")
        rows.append(row)
    return markdown(["Difference (accuracy points)", *(PROMPT_TASKS[t].label for t in grid.tasks)], rows)


def lr_table(payload: dict[str, Any], grid: DecoderGrid) -> str:
    runs = payload["runs"]
    rows = []
    for v, b in rows_of(grid):
        if VARIANTS[v].lr_from is not None:
            continue
        row = [row_label(grid, v, b)]
        for task in grid.tasks:
            cell = next(c for c in cells(grid) if (c.task, c.variant, c.budget) == (task, v, b))
            scores = search_scores(runs, cell)
            chosen, _ = choose_lr(scores, base_lrs(grid, v), grid.max_extensions)
            tried = ", ".join(f"{lr:g}: {100 * acc:.1f}" for lr, (acc, _) in sorted(scores.items()))
            row.append(f"{chosen:g} [{tried}]" if chosen is not None else f"searching [{tried or 'none yet'}]")
        rows.append(row)
    return markdown(["Method", *(PROMPT_TASKS[t].label for t in grid.tasks)], rows) + (
        "\n\nChosen lr [lr: validation accuracy % of each search run]. The scale rows use LoRA's chosen lr at r = "
        f"{grid.ablation_budget}."
    )


def rank_summary(payload: dict[str, Any], grid: DecoderGrid) -> str:
    """Mean final rank per matrix type, attention vs MLP share of the budget, and per third of the layers, over
    the AdaLoRA runs of each budget and task (final runs; the lr-search runs while no final run exists)."""
    from adalora.run.plots import split_name

    runs = payload["runs"]
    finals = [r for r in runs.values() if r["phase"] == "final" and r["variant"] == "adalora" and r.get("rank_pattern")]
    chosen = finals or [r for r in runs.values() if r["variant"] == "adalora" and r.get("rank_pattern")]
    if not chosen:
        return "No finished AdaLoRA run yet."
    source = "final runs" if finals else "lr-search runs (no final run yet)"
    per: dict[tuple[int, str], list[dict[str, int]]] = {}
    for r in chosen:
        per.setdefault((r["budget"], r["task"]), []).append(r["rank_pattern"])
    type_rows, layer_rows = [], []
    for (budget, task), patterns in sorted(per.items()):
        by_type: dict[str, list[int]] = {}
        by_layer: dict[int, list[int]] = {}
        for pattern in patterns:
            for name, rank in pattern.items():
                layer, kind = split_name(name)
                by_type.setdefault(kind, []).append(rank)
                by_layer.setdefault(layer if layer is not None else -1, []).append(rank)
        total = sum(sum(v) for v in by_type.values())
        mlp = sum(sum(by_type.get(k, [])) for k in MLP)
        n_mlp = sum(len(by_type.get(k, [])) for k in MLP)
        uniform = n_mlp / sum(len(v) for v in by_type.values())
        label = f"r = {budget}, {PROMPT_TASKS[task].label} ({len(patterns)} runs)"
        type_rows.append([
            label, *(f"{statistics.fmean(by_type[k]):.2f}" if k in by_type else "-" for k in ATTENTION + MLP),
            f"{100 * mlp / total:.0f} % (uniform {100 * uniform:.0f} %)",
        ])  # fmt: skip
        layers = sorted(by_layer)
        thirds = [layers[i * len(layers) // 3 : (i + 1) * len(layers) // 3] for i in range(3)]
        layer_rows.append([label, *(f"{statistics.fmean(x for i in t for x in by_layer[i]):.2f} (layers "
                                    f"{t[0] + 1}-{t[-1] + 1})" for t in thirds if t)])  # fmt: skip
    headers = ["Runs", *(TYPE_NAMES[k] for k in ATTENTION + MLP), "MLP share of the final budget"]
    return (
        f"From the AdaLoRA {source}. Mean final rank per matrix type (uniform = r everywhere; the three MLP types "
        "are 3 of the 7 matrices per layer):\n\n"
        f"{markdown(headers, type_rows)}\n\nMean final rank per third of the 30 layers (bottom, middle, top):\n\n"
        f"{markdown(['Runs', 'bottom', 'middle', 'top'], layer_rows)}"
    )


def timing(payload: dict[str, Any], grid: DecoderGrid) -> str:
    runs = list(payload["runs"].values())
    if not runs:
        return ""
    rows = []
    for task in grid.tasks:
        mine = [r for r in runs if r["task"] == task]
        if mine:
            wall = statistics.median(r["wall_seconds"] for r in mine if "wall_seconds" in r)
            cpu = statistics.median(r["cpu_seconds"] for r in mine if "cpu_seconds" in r)
            score = statistics.median(r["score_seconds"] for r in mine if "score_seconds" in r)
            rows.append([PROMPT_TASKS[task].label, str(len(mine)), f"{wall:.0f}", f"{cpu:.0f}", f"{score:.0f}"])
    return markdown(["Task", "Runs", "Wall s (median)", "CPU s (median)", "of which label scoring, wall s"], rows) + (
        "\n\nOne torch thread per run (``--threads 1``), two runs at a time on the 2-core machine (``--workers 2``),"
        " which other jobs shared at times: the CPU time is about what a run takes alone on one core."
    )


def draw_figure(payload: dict[str, Any], grid: DecoderGrid, path: Path) -> Path | None:
    """Heatmap (matrix type x layer) of one AdaLoRA run's final ranks: the largest budget, first task, a final
    run if any (else a search run); None without one."""
    from adalora.run.plots import plot_rank_heatmap

    runs = [r for r in payload["runs"].values() if r["variant"] == "adalora" and r.get("rank_pattern")]
    if not runs:
        return None
    r = max(runs, key=lambda r: (r["budget"], r["phase"] == "final", -grid.tasks.index(r["task"]), -r["seed"]))
    start = round(grid.init_factor * r["budget"])
    title = f"AdaLoRA on SmolLM2-135M, {PROMPT_TASKS[r['task']].label}, r {start} → {r['budget']}, {r['phase']} run"
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_rank_heatmap(r["rank_pattern"], path, init_r=start, title=f"{title}, lr {r['lr']:g}, seed {r['seed']}")


def block(payload: dict[str, Any], grid: DecoderGrid, figure: Path | None = None, doc: Path | None = None) -> str:
    parts = [
        status_line(payload, grid),
        f"Setup: {setup_line(grid)}.",
        "Test accuracy (%) of the label chosen by log-likelihood, mean ± std over seeds:",
        main_table(payload, grid, row_label),
        "Held-out perplexity of the completions (label word + EOS; lower is better):",
        perplexity_table(payload, grid),
        "### Differences (test accuracy points ± standard error)",
        delta_table(payload, grid),
        "### Learning rates chosen on the validation split",
        lr_table(payload, grid),
        "### Where the rank went in the decoder",
        rank_summary(payload, grid),
    ]
    if figure is not None and doc is not None:
        relative = Path(os.path.relpath(figure.resolve(), doc.resolve().parent))
        parts.append(f"![final ranks of one AdaLoRA run on SmolLM2-135M]({relative.as_posix()})")
    if timing(payload, grid):
        parts += ["### Run times", timing(payload, grid)]
    return "\n\n".join(parts)


def readme_line(payload: dict[str, Any], grid: DecoderGrid) -> str | None:
    """One summary line for the README, or None while no final run has finished."""
    runs = payload["runs"]
    finals = sum(r["phase"] == "final" for r in runs.values())
    if not finals:
        return None
    _, planned = planned_total(grid)
    parts = []
    for b in sorted(grid.budgets):
        for task in grid.tasks:
            a, lora = final_runs(runs, task, "adalora", b), final_runs(runs, task, "lora", b)
            if a and lora:
                parts.append(f"{PROMPT_TASKS[task].label} r = {b}: {difference(a, lora)}")
    diffs = "; ".join(parts) if parts else "no AdaLoRA / LoRA pair finished yet"
    # The scale question: PEFT's MetaMathQA AdaLoRA settings at LoRA's lr, against LoRA and tuned AdaLoRA.
    b = grid.ablation_budget
    scale = []
    for task in grid.tasks:
        peft, lora = final_runs(runs, task, "adalora-peft-scale", b), final_runs(runs, task, "lora", b)
        tuned = final_runs(runs, task, "adalora", b)
        if peft and lora and tuned:
            scale.append(
                f"{PROMPT_TASKS[task].label}: {difference(peft, lora)} (tuned AdaLoRA: {difference(tuned, lora)})"
            )
    scale_text = ""
    if scale:
        scale_text = f" PEFT's MetaMathQA AdaLoRA settings (alpha / init_r = 0.125) at LoRA's lr - LoRA, r = {b}: "
        scale_text += "; ".join(scale) + "."
    return (
        f"Decoder (SmolLM2-135M, prompt -> label word; {finals} of {planned} final runs): AdaLoRA - LoRA test "
        f"accuracy points: {diffs}.{scale_text} Details in "
        "[paper-table.md](docs/paper-table.md#decoder-smollm2-135m-prompt---label-word)."
    )


def render(results: Path, doc: Path, readme: Path | None, figure: Path | None = None) -> list[Path]:
    """Write the figure (if ``figure`` and an AdaLoRA run exist), the doc section and the README line."""
    if results.is_file():
        payload = json.loads(results.read_text())
    else:  # no run has finished yet: the plan alone
        payload = {"grid": DecoderGrid().describe(), "runs": {}, "failures": {}}
    grid = grid_of(payload)
    drawn = draw_figure(payload, grid, figure) if figure is not None else None
    text = doc.read_text()
    if BEGIN not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{BEGIN}\n{END}\n"
    new = replace_between_markers(text, block(payload, grid, drawn, doc), BEGIN, END)
    if new is None:
        raise SystemExit(f"{doc}: the markers {BEGIN} ... {END} are out of order")
    doc.write_text(new)
    written = [doc] + ([drawn] if drawn else [])
    line = readme_line(payload, grid)
    if readme is not None and readme.is_file() and line is not None:
        current = readme.read_text()
        if BEGIN not in current and PAPER_END in current:
            current = current.replace(PAPER_END, f"{PAPER_END}\n\n{BEGIN}\n{END}", 1)
        updated = replace_between_markers(current, line, BEGIN, END)
        if updated is not None:
            readme.write_text(updated)
            written.append(readme)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/decoder_table.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/paper-table.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks/results/decoder_table_ranks.png")
    args = parser.parse_args(argv)
    for path in render(args.results, args.doc, args.readme, args.figure):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
