"""The decoder table's grid, settings and prompts (benchmarks/decoder_table.py): the scale rows wait for LoRA's lr
and use it; PEFT's alpha / init_r is reproduced at our budget; prompts are cut to fit. No model is loaded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from test_causal_lm import word_tokenizer

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def dt():
    sys.path.insert(0, str(_BENCH))  # decoder_table imports paper_table and common
    for name in ("paper_table", "decoder_table"):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up by name
            spec.loader.exec_module(module)
    return sys.modules["decoder_table"]


def record(pt, spec, accuracy):
    return {"task": spec.cell.task, "variant": spec.cell.variant, "budget": spec.cell.budget, "phase": spec.phase,
            "lr": spec.lr, "seed": spec.seed, "accuracy": accuracy, "eval_loss": 1 - accuracy}  # fmt: skip


def test_scale_rows_wait_for_loras_search_and_take_its_lr(dt):
    pt = sys.modules["paper_table"]
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
    pt = sys.modules["paper_table"]
    grid, files = dt.DecoderGrid(), {s: tmp_path / f"{s}.jsonl" for s in ("train", "val", "test")}

    def settings(variant, budget, phase="final"):
        spec = pt.RunSpec(pt.Cell("trec", variant, budget), phase, 1e-3, 1)
        return dt.decoder_settings(grid, spec, files, threads=1, device="cpu")

    peft = settings("adalora-peft-scale", 8)
    assert (peft.init_r, peft.target_r, peft.alpha, peft.alpha / peft.init_r) == (16, 8, 2.0, 8 / 64)
    ours = settings("adalora-lora-lr", 8)
    assert (ours.init_r, ours.target_r, ours.alpha, ours.method) == (12, 8, 16.0, "adalora")
    lora = settings("lora", 8)
    assert (lora.lora_r, lora.alpha / lora.lora_r) == (8, 2.0)  # PEFT's LoRA r32 / alpha 64: scale 2 as well
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
