"""The screen and confirmation of AdaLoRA's lora start (benchmarks/decoder_screen.py): one lr-search cell per task at
r = 8, then seeds 1-3 at the chosen lr; the start reaches RunSettings; the renderer compares it with the decoder
table's own AdaLoRA and LoRA runs and shows the prototype's options as measured but not offered. No model is
loaded."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def ds():
    return importlib.import_module("decoder_screen")


def record(spec, accuracy, perplexity=1.2):
    return {"task": spec.cell.task, "variant": spec.cell.variant, "budget": spec.cell.budget, "phase": spec.phase,
            "lr": spec.lr, "seed": spec.seed, "accuracy": accuracy, "eval_loss": perplexity - 1,
            "perplexity": perplexity, "cpu_seconds": 480.0}  # fmt: skip


def test_the_screen_searches_each_task_then_confirms_at_the_chosen_lr(ds):
    pt = importlib.import_module("paper_table")
    grid = ds.ScreenGrid()
    pending = pt.pending_runs(grid, {})
    assert {(s.cell.task, s.cell.variant, s.cell.budget, s.phase, s.lr, s.seed) for s in pending} == {
        (task, ds.LORA_START, 8, "search", lr, 0) for task in grid.tasks for lr in grid.adapter_lrs}  # fmt: skip
    runs = {s.key: record(s, 0.94 if s.lr == 3e-3 else 0.9) for s in pending}
    finals = pt.pending_runs(grid, runs)  # no extension (max_extensions 0): the finals at 3e-3, seeds 1-3
    assert sorted(s.key for s in finals) == sorted(
        f"{task}/adalora-init-lora/r8/final/lr0.003/s{seed}" for task in grid.tasks for seed in (1, 2, 3))  # fmt: skip
    runs |= {s.key: record(s, 0.9) for s in finals}
    assert pt.pending_runs(grid, runs) == []


def test_the_start_reaches_the_run_settings_and_nothing_else_changes(ds, tmp_path):
    pt = importlib.import_module("paper_table")
    files = {s: tmp_path / f"{s}.jsonl" for s in ("train", "val", "test")}

    def settings(variant, phase="search"):
        spec = pt.RunSpec(pt.Cell("trec", variant, 8), phase, 3e-3, 0)
        return ds.decoder_settings(ds.ScreenGrid(), spec, files, threads=1, device="cpu")

    lora, plain = settings(ds.LORA_START), settings("adalora")
    assert (lora.adalora.triplet_init, plain.adalora.triplet_init) == ("lora", "paper")
    assert lora.replace(triplet_init="paper") == plain  # the same run otherwise: init_r 12, r 8, lr, data
    assert (plain.adalora.init_r, plain.adalora.target_r, plain.eval_file) == (12, 8, str(files["val"]))
    assert settings(ds.LORA_START, "final").eval_file == str(files["test"])
    for name, lr in ds.PRECHECK:
        assert name in pt.VARIANTS and lr > 0


@pytest.mark.parametrize("budget", [2, 8])
def test_the_variations_of_the_lora_start_change_one_setting_each(ds, tmp_path, budget):
    pt = importlib.import_module("paper_table")
    files = {s: tmp_path / f"{s}.jsonl" for s in ("train", "val", "test")}

    def settings(variant):
        spec = pt.RunSpec(pt.Cell("trec", variant, budget), "search", 3e-3, 0)
        return ds.decoder_settings(ds.ScreenGrid(), spec, files, threads=1, device="cpu")

    lora_start, lora = settings(ds.LORA_START), settings("lora")
    assert settings(ds.LORA_START_NO_ORTH) == lora_start.replace(orth_reg_weight=0.0)
    scaled = settings(ds.LORA_START_LORA_SCALE)
    assert scaled == lora_start.replace(alpha=24.0)
    # alpha / init_r is LoRA's alpha / r at both budgets (24 / 12 = 16 / 8, 24 / 3 = 16 / 2)
    assert scaled.adalora.alpha / scaled.adalora.init_r == lora.adalora.alpha / lora.lora_r
    assert lora_start.adalora.alpha / lora_start.adalora.init_r == pytest.approx(
        2 / 3 * lora.adalora.alpha / lora.lora_r
    )
    assert set(ds.STARTS.values()) == {v.name for v in ds.SCREEN_VARIANTS}


def spec(pt, task, variant, phase, lr, seed=0, budget=8):
    return pt.RunSpec(pt.Cell(task, variant, budget), phase, lr, seed)


def test_render_compares_the_start_with_the_decoder_tables_rows(ds):
    pt, render = importlib.import_module("paper_table"), importlib.import_module("render_decoder_screen")
    baselines = {}
    for task in ("trec", "sms-spam"):
        for variant, lr, accuracy in (("lora", 1e-3, 0.92), ("lora", 3e-3, 0.93), ("adalora", 3e-3, 0.88),
                                      ("adalora", 3e-2, 0.93)):  # fmt: skip
            s = spec(pt, task, variant, "search", lr)
            baselines[s.key] = record(s, accuracy)
        for variant in ("lora", "adalora"):
            for seed in (1, 2, 3):
                s = spec(pt, task, variant, "final", 3e-3, seed)
                baselines[s.key] = record(s, 0.90)
    screen = {"runs": {}}
    for lr, accuracy in ((1e-3, 0.9), (3e-3, 0.94), (1e-2, 0.91)):
        s = spec(pt, "trec", ds.LORA_START, "search", lr)
        screen["runs"][s.key] = record(s, accuracy, 1.1)
    s = spec(pt, "trec", "adalora-init-orthonormal", "search", 3e-3)
    screen["runs"][s.key] = record(s, 0.95)
    confirm = {"grid": ds.ScreenGrid().describe(), "runs": {}}
    for seed, accuracy in ((1, 0.90), (2, 0.92), (3, 0.94)):
        s = spec(pt, "trec", ds.LORA_START, "final", 3e-3, seed)
        confirm["runs"][s.key] = record(s, accuracy)
    text = render.block(json.loads(json.dumps(screen)), confirm, baselines, None)
    lora = "AdaLoRA, triplet_init lora (P = 0, lambda = 1, Q as LoRA's A)"
    assert "| LoRA | 92.00 / 1.200 | 93.00 / 1.200 |  |  | 0.003 | 93.00 / 1.200 |" in text
    # the lora start: best 94 % at 3e-3, +1 point over LoRA's best at the same lr (1x LoRA's); AdaLoRA: 0 at 10x.
    assert f"| {lora} | 94.00 (+1.00) / 1.100 | 1x |  |  |  |" in text
    assert "| AdaLoRA, triplet_init paper (the default) | 93.00 (+0.00) / 1.200 | 10x |" in text
    assert "| prototype, not offered: random orthonormal P, Q, lambda = 1, scale P Q subtracted from W0 |  |" in text
    # Confirmation: 92.00 ± 2.00 over three seeds; against LoRA's 90.00 ± 0: +2.00 ± sqrt(4 / 3) = 1.15.
    assert f"| r = 8 | TREC-6 | {lora} | 0.003 | 92.00 ± 2.00 | 3 | 1.200 | +2.00 ± 1.15 |" in text
    assert "| r = 8 | TREC-6 | LoRA | 0.003 | 90.00 ± 0.00 | 3 | 1.200 |  |" in text
    assert "| SMS spam |" not in text  # a cell without final runs of the start is not listed
    assert "Baseline check: not run." in text


def test_render_lists_a_second_budget_in_tables_of_its_own(ds):
    pt, render = importlib.import_module("paper_table"), importlib.import_module("render_decoder_screen")
    runs = {}
    for variant, lr, seed, phase, accuracy in (("lora", 3e-3, 0, "search", 0.94), ("lora", 3e-3, 1, "final", 0.91),
                                               (ds.LORA_START, 1e-3, 0, "search", 0.93),
                                               (ds.LORA_START, 1e-3, 1, "final", 0.92)):  # fmt: skip
        s = spec(pt, "trec", variant, phase, lr, seed, budget=2)
        runs[s.key] = record(s, accuracy)
    baselines = {k: r for k, r in runs.items() if r["variant"] == "lora"}
    for task in ("trec", "sms-spam"):  # the r = 8 summary reads LoRA's search there
        s = spec(pt, task, "lora", "search", 3e-3)
        baselines[s.key] = record(s, 0.93)
    confirm = {"runs": {k: r for k, r in runs.items() if r["variant"] == ds.LORA_START}}
    text = render.block({"runs": {}}, confirm, baselines, None)
    lora = "AdaLoRA, triplet_init lora (P = 0, lambda = 1, Q as LoRA's A)"
    assert "TREC-6, r = 2 (validation accuracy % / completion perplexity)" in text
    assert f"| {lora} | 93.00 / 1.200 |  | 0.001 | 93.00 / 1.200 |" in text
    assert f"| r = 2 | TREC-6 | {lora} | 0.001 | 92.00 ± 0.00 | 1 |" in text
    assert "| r = 8 |" not in text


def test_the_recorded_first_screen_renders_with_the_prototypes_options_labelled(ds):
    render = importlib.import_module("render_decoder_screen")
    read = lambda name: json.loads((_BENCH / "results" / name).read_text())  # noqa: E731
    screen, precheck = read("decoder_screen.json"), read("decoder_screen_precheck.json")
    assert {r["variant"] for r in screen["runs"].values()} - {ds.LORA_START} <= set(render.NOT_OFFERED)
    text = render.block(screen, None, read("decoder_table.json")["runs"], precheck)
    lora = "AdaLoRA, triplet_init lora (P = 0, lambda = 1, Q as LoRA's A)"
    assert f"| {lora} |  | 92.67 / 1.134 | 94.00 / 1.134 | 86.33 / 1.244 |  | 0.003 | 94.00 / 1.134 |" in text
    assert text.count("| prototype, not offered: ") == 6 + 1 + 1  # pre-check rows, screen row, summary row
    assert "Confirmation: no final run yet." in text


def test_the_encoder_check_plans_the_lora_start_alone_and_compares_with_the_tables_rows(ds):
    pt = importlib.import_module("paper_table")
    check = importlib.import_module("encoder_start_check")
    grid = check.StartGrid(tasks=("trec",))
    pending = pt.pending_runs(grid, {})  # the lora start's search at r = 2; no full fine-tuning, no baseline rows
    assert {(s.cell.variant, s.cell.budget, s.phase, s.lr) for s in pending} == {
        (ds.LORA_START, 2, "search", lr) for lr in grid.adapter_lrs}  # fmt: skip
    table, runs = {}, {}
    for variant, accuracies in (("lora", (0.90, 0.92, 0.94)), ("adalora", (0.88, 0.88, 0.88))):
        for seed, accuracy in zip((1, 2, 3), accuracies, strict=True):
            s = spec(pt, "trec", variant, "final", 3e-3, seed, budget=2)
            table[s.key] = record(s, accuracy)
    for seed in (1, 2, 3):
        s = spec(pt, "trec", ds.LORA_START, "final", 1e-3, seed, budget=2)
        runs[s.key] = record(s, 0.93)
    text = check.comparison(runs, table)
    # 93 - 92 = +1.00, s.e. sqrt(2^2 / 3 + 0) = 1.15; AdaLoRA 88 - 92 = -4.00 ± 1.15
    assert "| TREC-6 | adalora-init-lora | 0.001 | 93.00 ± 0.00 | 3 | +1.00 ± 1.15 |" in text
    assert "| TREC-6 | adalora | 0.003 | 88.00 ± 0.00 | 3 | -4.00 ± 1.15 |" in text
