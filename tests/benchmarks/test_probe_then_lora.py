"""The probe-then-LoRA measurement (benchmarks/probe_then_lora.py): the probe is the table's AdaLoRA on the first
30 % of the steps at AdaLoRA's chosen lr, the LoRA run is LoRA at LoRA's chosen lr with the probe's pattern, and the
table pairs each seed with the decoder table's uniform LoRA run. No model is loaded."""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.fixture(scope="module")
def ptl():
    return importlib.import_module("probe_then_lora")


def final(task, variant, budget, seed, lr, accuracy):
    return {"task": task, "variant": variant, "budget": budget, "phase": "final", "seed": seed, "lr": lr,
            "accuracy": accuracy}  # fmt: skip


TABLE = {
    "runs": {
        f"{t}/{v}/r{r}/s{s}": final(t, v, r, s, lr, acc)
        for (t, v, r, lr, acc) in (("trec", "lora", 8, 3e-3, 0.90), ("trec", "adalora", 8, 3e-2, 0.80))
        for s in (1, 2, 3)
    }
}


def test_each_seed_runs_both_budgets_before_the_next(ptl):
    grid = importlib.import_module("decoder_table").DecoderGrid(tasks=("trec",))
    assert ptl.plan(grid, (1, 2)) == [("trec", 8, 1), ("trec", 2, 1), ("trec", 8, 2), ("trec", 2, 2)]
    assert ptl.chosen_lrs(TABLE) == {("trec", "lora", 8): 3e-3, ("trec", "adalora", 8): 3e-2}


def test_the_probe_and_the_lora_run_are_set_as_documented(ptl, tmp_path):
    pt, dt = importlib.import_module("paper_table"), importlib.import_module("decoder_table")
    grid = dt.DecoderGrid()
    files = {s: tmp_path / f"{s}.jsonl" for s in ("train", "val", "test")}
    spec = pt.RunSpec(pt.Cell("trec", ptl.PATTERN, 8), "final", 3e-3, 2)
    lora = dt.decoder_settings(grid, spec, files, 1, "cpu").replace(rank_pattern="p.json")
    uniform = dt.decoder_settings(grid, pt.RunSpec(pt.Cell("trec", "lora", 8), "final", 3e-3, 2), files, 1, "cpu")
    assert lora.replace(rank_pattern=None) == uniform  # the pattern is the only difference from uniform LoRA
    assert (lora.method, lora.lora_r, lora.eval_file) == ("lora", 8, str(files["test"]))
    steps = round(ptl.PROBE_FRACTION * grid.train_size * grid.epochs / grid.batch_size)
    assert (steps, steps * grid.batch_size) == (45, 720)  # 30 % of the table's 150 steps, one epoch over 720


def test_the_table_pairs_seeds_with_uniform_lora(ptl, tmp_path):
    probe = {"cpu_seconds": 100.0, "pruned_modules": 4, "largest_rank": 12}
    runs = {f"trec/r8/s{s}": final("trec", ptl.PATTERN, 8, s, 3e-3, acc) | {"cpu_seconds": 400.0, "probe": probe}
            for s, acc in ((1, 0.91), (2, 0.92), (3, 0.87))}  # fmt: skip
    path = tmp_path / "probe_then_lora_trec.json"
    path.write_text(json.dumps({"runs": runs}))
    text = ptl.render(TABLE, [path])
    # by hand: differences +1, +2, -3 points: mean 0.00, sample std sqrt(7), s.e. sqrt(7 / 3) = 1.53
    assert "| TREC-6 | 8 | 3 | 90.00 | 90.00 | +0.00 ± 1.53 | 4 of 210 | 12 | 0.25 |" in text
    assert "Average over the 1 cells: +0.00 points" in text
