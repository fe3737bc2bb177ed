"""The decoder table's grid, settings and prompts (benchmarks/decoder_table.py): the scale rows wait for LoRA's lr
and use it; PEFT's alpha / init_r is reproduced at our budget; prompts are cut to fit. No model is loaded."""

from __future__ import annotations

import importlib
import json

import pytest
from lm_helpers import word_tokenizer


@pytest.fixture(scope="module")
def dt():
    return importlib.import_module("decoder_table")


def record(pt, spec, accuracy):
    return {"task": spec.cell.task, "variant": spec.cell.variant, "budget": spec.cell.budget, "phase": spec.phase,
            "lr": spec.lr, "seed": spec.seed, "accuracy": accuracy, "eval_loss": 1 - accuracy}  # fmt: skip


def test_scale_rows_wait_for_loras_search_and_take_its_lr(dt):
    pt = importlib.import_module("paper_table")
    grid = dt.DecoderGrid(tasks=("trec",))
    assert pt.planned_total(grid) == (6 * 3, 8 * 3)  # 6 searched cells x 3 lrs; 8 cells x 3 seeds
    runs: dict = {}
    pending = pt.pending_runs(grid, runs)
    assert not any(s.cell.variant.startswith("adalora-") for s in pending)
    for spec in pending:  # every search: LoRA's validation accuracy peaks at 1e-3, inside the grid
        if spec.phase == "search":
            runs[spec.key] = record(pt, spec, 0.9 if spec.lr == 1e-3 else 0.8)
    scale = [s for s in pt.pending_runs(grid, runs) if s.cell.variant in ("adalora-peft-scale", "adalora-lora-lr")]
    assert {(s.cell.variant, s.cell.budget, s.phase, s.lr) for s in scale} == {
        ("adalora-peft-scale", 8, "final", 1e-3), ("adalora-lora-lr", 8, "final", 1e-3)}  # fmt: skip
    assert len(scale) == 6  # 3 seeds each


def test_settings_reproduce_pefts_scale_and_our_defaults(dt, tmp_path):
    pt = importlib.import_module("paper_table")
    grid, files = dt.DecoderGrid(), {s: tmp_path / f"{s}.jsonl" for s in ("train", "val", "test")}

    def settings(variant, budget, phase="final"):
        spec = pt.RunSpec(pt.Cell("trec", variant, budget), phase, 1e-3, 1)
        return dt.decoder_settings(grid, spec, files, threads=1, device="cpu")

    peft = settings("adalora-peft-scale", 8)
    peft_config = peft.adalora
    assert (peft_config.init_r, peft_config.target_r, peft_config.alpha, peft_config.scale) == (16, 8, 2.0, 8 / 64)
    ours = settings("adalora-lora-lr", 8)
    assert (ours.adalora.init_r, ours.adalora.target_r, ours.adalora.alpha, ours.method) == (12, 8, 16.0, "adalora")
    lora = settings("lora", 8)
    assert (lora.lora_r, lora.adalora.alpha / lora.lora_r) == (8, 2.0)  # PEFT's LoRA r32 / alpha 64: scale 2 as well
    assert settings("adalora", 2, "search").eval_file.endswith("val.jsonl")
    assert settings("adalora", 2).task == "causal-lm" and settings("adalora", 2).eval_file.endswith("test.jsonl")


def test_long_texts_are_cut_until_prompt_label_and_eos_fit(dt):
    tokenizer = word_tokenizer()
    task = dt.PromptTask("t", "T", text_tokens=20, template="Q: {text} A:", words=("yes", "no no"))
    text = " ".join(["the cat sat on the mat"] * 5)  # 30 words
    cut = dt.fit_text(tokenizer, task, text, 10)
    prompt = tokenizer(task.prompt(cut))["input_ids"]
    assert len(prompt) + 2 + 1 <= 10 and text.startswith(cut) and cut
    assert dt.fit_text(tokenizer, task, "the cat", 10) == "the cat"  # short texts are kept whole


def fake_record(spec, accuracy):
    """A finished run's record as DecoderRunner writes it (the fields the renderer reads)."""
    layers = range(30)
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    pattern = {f"model.layers.{i}.{k}": (3 if "mlp" in k else 1) for i in layers for k in kinds}
    return {"task": spec.cell.task, "variant": spec.cell.variant, "budget": spec.cell.budget, "phase": spec.phase,
            "eval_split": "val" if spec.phase == "search" else "test", "lr": spec.lr, "seed": spec.seed,
            "accuracy": accuracy, "eval_loss": 1 - accuracy, "perplexity": 1.5, "perplexity_before": 300.0,
            "trainable_parameters": 1000, "kept_parameters": 800, "train_seconds": 10.0, "wall_seconds": 12.0,
            "cpu_seconds": 600.0, "score_seconds": 2.0, "device": "cpu", "finished": "2026-12-02T04:00:00",
            "rank_pattern": pattern}  # fmt: skip


def test_render_partial_and_finished_tables(dt, tmp_path):
    pt = importlib.import_module("paper_table")
    import render_decoder_table as rd

    grid = dt.DecoderGrid(tasks=("trec",))
    results, doc, readme = tmp_path / "r.json", tmp_path / "doc.md", tmp_path / "README.md"
    doc.write_text("# Encoder\n\ntext\n")
    readme.write_text("intro\n<!-- PAPER-TABLE -->\nx\n<!-- /PAPER-TABLE -->\nrest\n")
    rd.render(results, doc, None)  # no results file yet: the plan of the default grid
    assert "Status: 0 of 48 final runs and 0 of 36 planned lr-search runs done" in doc.read_text()
    payload = {"grid": grid.describe(), "runs": {}, "failures": {}}
    for spec in pt.pending_runs(grid, {})[:4]:  # a partial search: nothing final
        payload["runs"][spec.key] = fake_record(spec, 0.8)
    results.write_text(json.dumps(payload))
    rd.render(results, doc, readme)
    text = doc.read_text()
    assert text.startswith("# Encoder") and rd.HEADING in text
    assert "Status: 0 of 24 final runs and 4 of 18 planned lr-search runs done" in text
    assert "lr-search runs (no final run yet)" in text  # the rank allocation is shown from the search runs
    # Per layer: attention 4 matrices x rank 1, MLP 3 x rank 3: MLP share 9 / 13 = 69 %; uniform 3 of 7 = 43 %.
    assert "| 1.00 | 1.00 | 1.00 | 1.00 | 3.00 | 3.00 | 3.00 | 69 % (uniform 43 %) |" in text
    assert "| 1.86 (layers 1-10) | 1.86 (layers 11-20) | 1.86 (layers 21-30) |" in text  # 13 / 7 per matrix
    assert rd.BEGIN not in readme.read_text()  # no README line without final runs

    payload["runs"] = {}
    run = lambda spec: fake_record(spec, 0.9 if spec.cell.variant == "adalora" else 0.8)  # noqa: E731
    pt.run_table(grid, results, run, log=lambda line: None)
    written = rd.render(results, doc, readme, tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").is_file() and tmp_path / "ranks.png" in written
    assert "Status: 24 of 24 final runs" in doc.read_text() and "| AdaLoRA (r 3 → 2, scale 5.33)" in doc.read_text()
    n = len(json.loads(results.read_text())["runs"])  # 600 CPU s each (fake_record)
    assert f"Every planned run is done: median 10.0 CPU minutes per run, {n / 6:.1f} CPU hours in all ({n} runs)." in (
        doc.read_text()
    )
    line = readme.read_text()
    assert rd.BEGIN in line and "TREC-6 r = 2: +10.00 ± 0.00" in line
    rd.render(results, doc, readme)  # rendering again replaces the blocks, it does not add more
    assert doc.read_text().count(rd.BEGIN) == 1 and readme.read_text().count(rd.BEGIN) == 1
