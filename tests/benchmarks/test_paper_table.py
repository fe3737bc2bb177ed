"""The paper-table planner: lr search on validation, edge extension, final seeds, ablations reusing AdaLoRA's
lr, resume after an interruption, failures. A fake run function stands in for training (milliseconds)."""

from __future__ import annotations

import importlib
import json
import math

import pytest


@pytest.fixture(scope="module")
def pt():
    return importlib.import_module("paper_table")


def small_grid(pt):
    return pt.Grid(
        tasks=("rotten-tomatoes", "trec"),
        budgets=(2, 8),
        main=("adalora", "lora"),
        ablations=("adalora-no-orth",),
        full=True,
        seeds=(1, 2),
        adapter_lrs=(1e-3, 3e-3),
        full_lrs=(1e-4, 3e-4),
        max_extensions=1,
    )


def fake_run(calls: list):
    """Validation accuracy peaks at lr 1e-2 for AdaLoRA and 1e-3 for the others; test accuracy by seed."""

    def run(spec):
        calls.append(spec.key)
        best = 1e-2 if spec.cell.variant.startswith("adalora") else 1e-3
        accuracy = 0.9 - 0.1 * abs(math.log10(spec.lr / best)) if spec.phase == "search" else 0.8 + spec.seed / 100
        return {
            "task": spec.cell.task,
            "variant": spec.cell.variant,
            "budget": spec.cell.budget,
            "phase": spec.phase,
            "eval_split": "val" if spec.phase == "search" else "test",
            "lr": spec.lr,
            "seed": spec.seed,
            "accuracy": accuracy,
            "eval_loss": 1 - accuracy,
            "trainable_parameters": 1000,
            "kept_parameters": 700 if spec.cell.variant.startswith("adalora") else 1000,
            "train_seconds": 1.0,
            "finished": "2026-01-01T00:00:00",
            "rank_pattern": {f"bert.encoder.layer.{i}.intermediate.dense": 2 + i for i in range(2)},
        }

    return run


def test_choose_lr_extends_at_edges_then_stops(pt):
    base = (1e-3, 3e-3, 1e-2)
    assert pt.choose_lr({1e-3: (0.8, 0.5)}, base, 2) == (None, None)  # base grid unfinished
    middle = {1e-3: (0.8, 0.5), 3e-3: (0.9, 0.4), 1e-2: (0.7, 0.6)}
    assert pt.choose_lr(middle, base, 2) == (3e-3, None)
    low = {1e-3: (0.9, 0.5), 3e-3: (0.8, 0.4), 1e-2: (0.7, 0.6)}
    assert pt.choose_lr(low, base, 2) == (None, 3e-4)
    assert pt.choose_lr(low | {3e-4: (0.95, 0.3)}, base, 2) == (None, 1e-4)
    assert pt.choose_lr(low | {3e-4: (0.95, 0.3)}, base, 1) == (3e-4, None)  # extensions used up
    assert pt.choose_lr(low | {3e-4: (0.85, 0.3)}, base, 2) == (1e-3, None)  # interior optimum now
    # Ties on accuracy go to the lower validation loss; a NaN loss never wins.
    tie = {1e-3: (0.9, float("nan")), 3e-3: (0.9, 0.4), 1e-2: (0.7, 0.6)}
    assert pt.choose_lr(tie, base, 2) == (3e-3, None)


def test_cells_put_the_headline_comparison_first(pt):
    grid = pt.Grid()
    first = [(c.task, c.variant, c.budget) for c in pt.cells(grid)[:6]]
    assert first == [(t, v, 2) for t in grid.tasks for v in ("adalora", "lora")]
    # Ablations (no search of their own) before the remaining baselines.
    order = [c.variant for c in pt.cells(grid)]
    assert max(order.index(a) for a in grid.ablations) < order.index("pruned-lora")
    assert pt.planned_total(grid) == (63, 90)  # 7 searched cells x 3 lrs x 3 tasks; 10 cells x 3 seeds x 3 tasks


def test_table_searches_extends_runs_finals_and_resumes(pt, tmp_path):
    grid, results = small_grid(pt), tmp_path / "table.json"
    calls: list[str] = []

    def interrupted(spec):
        if len(calls) == 7:
            raise KeyboardInterrupt  # as if the process were stopped mid-table
        return fake_run(calls)(spec)

    with pytest.raises(KeyboardInterrupt):
        pt.run_table(grid, results, interrupted, log=lambda line: None)
    saved = json.loads(results.read_text())["runs"]
    assert len(saved) == 7 and set(saved) == set(calls)

    payload = pt.run_table(grid, results, fake_run(calls), log=lambda line: None)
    runs = payload["runs"]
    assert len(calls) == len(set(calls)), "a finished run was run again"
    # AdaLoRA's best lr lies above the grid: one extension (3e-3 -> 1e-2), then finals there.
    for task in grid.tasks:
        for budget in grid.budgets:
            adalora = {r["lr"] for r in runs.values() if r["variant"] == "adalora" and r["budget"] == budget
                       and r["task"] == task and r["phase"] == "search"}  # fmt: skip
            assert adalora == {1e-3, 3e-3, 1e-2}
            finals = [r for r in runs.values() if r["variant"] == "adalora" and r["budget"] == budget
                      and r["task"] == task and r["phase"] == "final"]  # fmt: skip
            assert {(r["lr"], r["seed"]) for r in finals} == {(1e-2, 1), (1e-2, 2)}
        # LoRA's optimum 1e-3 is the grid's lower edge: tried 3e-4 as well, kept 1e-3.
        lora = {r["lr"] for r in runs.values() if r["variant"] == "lora" and r["phase"] == "search"
                and r["task"] == task and r["budget"] == 2}  # fmt: skip
        assert lora == {3e-4, 1e-3, 3e-3}
        # The ablation is never searched: it runs at AdaLoRA's lr of its budget.
        ablation = [r for r in runs.values() if r["variant"] == "adalora-no-orth" and r["task"] == task]
        assert {(r["phase"], r["lr"], r["budget"]) for r in ablation} == {("final", 1e-2, 2)}
        assert len(ablation) == 2
        full = {r["lr"] for r in runs.values() if r["variant"] == "full" and r["phase"] == "search"}
        assert full == {1e-4, 3e-4, 1e-3}  # the optimum 1e-3 lies above the grid (1e-4, 3e-4)
    # Every search evaluates on the validation split, every final run on the test split.
    assert all((r["phase"] == "search") == (r["eval_split"] == "val") for r in runs.values())
    assert pt.pending_runs(grid, runs) == []
    before = len(calls)
    pt.run_table(grid, results, fake_run(calls), log=lambda line: None)
    assert len(calls) == before  # all done: nothing runs


def test_failed_run_is_recorded_and_retried_next_time(pt, tmp_path):
    grid, results = small_grid(pt), tmp_path / "table.json"
    calls: list[str] = []
    broken = "rotten-tomatoes/adalora/r2/search/lr0.001/s0"

    def flaky(spec):
        if spec.key == broken:
            raise RuntimeError("disk full")
        return fake_run(calls)(spec)

    payload = pt.run_table(grid, results, flaky, log=lambda line: None, max_runs=5)
    assert payload["failures"] == {broken: "RuntimeError: disk full"}
    assert broken not in payload["runs"] and len(payload["runs"]) == 4
    payload = pt.run_table(grid, results, fake_run(calls), log=lambda line: None, max_runs=1)
    assert broken in payload["runs"] and payload["failures"] == {}


def test_results_of_another_grid_are_refused(pt, tmp_path):
    results = tmp_path / "table.json"
    pt.save_results(results, pt.load_results(results, small_grid(pt)))
    with pytest.raises(SystemExit, match="another grid"):
        pt.load_results(results, pt.Grid())


def test_render_marks_pending_cells_and_keeps_text_outside_the_markers(pt, tmp_path):
    import render_paper_table as render

    grid, results = small_grid(pt), tmp_path / "table.json"
    pt.run_table(grid, results, fake_run([]), log=lambda line: None, max_runs=12)  # a partial table
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n{render.BEGIN}\nold\n{render.END}\n\nThe lead's text.\n")
    doc, figure = tmp_path / "docs" / "paper-table.md", tmp_path / "ranks.png"
    written = render.render(results, doc, readme, figure)
    assert set(written) == {doc, readme, figure}
    text = readme.read_text()
    assert text.startswith("# Project") and text.endswith("The lead's text.\n") and "old" not in text
    assert "pending" in text and "**81.50 ± 0.71**" in text  # seeds 1 and 2: 81 and 82
    assert "| LoRA (r = 2) | 1.0K |" in text and "| AdaLoRA (r 3 → 2) | 1.0K → 0.7K |" in text
    full = doc.read_text()
    assert "Learning rates chosen" in full and "Where the rank went" in full and "ranks.png" in full
    render.render(results, doc, readme, figure)  # idempotent: markers kept, hand-written text kept
    assert readme.read_text() == text


def test_parallel_workers_run_the_same_table_once_each(pt, tmp_path):
    """With several runs in flight, every run still happens once and the table equals the sequential one."""
    from concurrent.futures import ThreadPoolExecutor

    grid = small_grid(pt)
    sequential_calls: list[str] = []
    sequential = pt.run_table(grid, tmp_path / "seq.json", fake_run(sequential_calls), log=lambda line: None)
    parallel_calls: list[str] = []
    parallel = pt.run_table(
        grid, tmp_path / "par.json", fake_run(parallel_calls), log=lambda line: None,
        workers=3, pool=ThreadPoolExecutor(3),
    )  # fmt: skip
    assert len(parallel_calls) == len(set(parallel_calls)), "a run was started twice"
    assert set(parallel["runs"]) == set(sequential["runs"])
    assert {k: r["accuracy"] for k, r in parallel["runs"].items()} == {
        k: r["accuracy"] for k, r in sequential["runs"].items()
    }
    assert json.loads((tmp_path / "par.json").read_text())["runs"].keys() == parallel["runs"].keys()


def test_difference_is_the_mean_gap_with_its_standard_error(pt):
    import render_paper_table as render

    def runs(*accuracies):
        return [{"accuracy": a} for a in accuracies]

    # means 81 and 80; sample variances 2 and 4: SE = sqrt(2/2 + 4/3) = 1.5275
    assert render.difference(runs(0.80, 0.82), runs(0.78, 0.80, 0.82)) == "+1.00 ± 1.53"
    # equal means that differ by float rounding print +0.00, never -0.00
    assert render.difference(runs(0.981, 0.986, 0.984), runs(0.984, 0.981, 0.986)).startswith("+0.00 ± ")
    assert render.difference(runs(0.5), runs(0.7, 0.7)) == "-20.00"  # one seed: no standard error


def test_plan_counts_runs_left_per_phase(pt, tmp_path):
    """Searches beyond the planned grid (edge extensions) must not count as final runs done."""
    grid, results = small_grid(pt), tmp_path / "table.json"
    payload = pt.run_table(grid, results, fake_run([]), log=lambda line: None)
    # Every search done (extensions included), no final run yet.
    payload["runs"] = {k: r for k, r in payload["runs"].items() if r["phase"] == "search"}
    report = pt.plan_report(grid, payload)
    for task in grid.tasks:
        searched = sum(r["task"] == task for r in payload["runs"].values())
        planned_search, planned_final = pt.planned_total(grid, task)
        assert searched > planned_search  # extensions happened
        (line,) = [line for line in report.splitlines() if line.startswith(f"{task}:")]
        assert f"; {planned_final} runs left," in line


def test_extension_runs_do_not_hide_planned_runs_not_started(pt, tmp_path):
    """One cell's search not started while other cells ran extensions: its planned runs are still left."""
    grid, results = small_grid(pt), tmp_path / "table.json"
    payload = pt.run_table(grid, results, fake_run([]), log=lambda line: None)
    searches = {k: r for k, r in payload["runs"].items() if r["phase"] == "search"}
    first = next(c for c in pt.cells(grid) if pt.VARIANTS[c.variant].lr_from is None)
    kept = {k: r for k, r in searches.items() if not k.startswith(f"{first.key}/")}
    extensions = len(searches) - pt.planned_total(grid)[0]
    assert extensions >= len(pt.base_lrs(grid, first.variant))  # enough to hide the cell from a plain count
    search_left, final_left = pt.planned_left(grid, kept)
    assert search_left == len(pt.base_lrs(grid, first.variant))
    assert final_left == pt.planned_total(grid)[1]
