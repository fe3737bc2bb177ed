"""Rank-pattern export: a short AdaLoRA probe's allocation as a recipe for a plain PEFT LoRA (docs/adapter-files.md)."""

import copy
import json

import pytest
import torch
from adapter_helpers import fake_training
from conftest import tiny_llama, token_batch

from adalora import AdaLoRAConfig, RankAllocator, inject, save_adapter
from adalora.cli import main
from adalora.run.convert import export_output_dir

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_layers(peft_model) -> dict:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A") and m.r}


def test_probe_then_peft_lora_with_the_exported_pattern(tmp_path, capsys):
    # 1. The AdaLoRA probe: a few steps on a tiny Llama, until the final allocation.
    config = AdaLoRAConfig(
        target_modules=TARGETS,
        init_r=4,
        target_r=2,
        alpha=8.0,
        warmup_steps=1,
        final_steps=2,
        mask_interval=1,
        total_steps=6,
        orth_reg_weight=0.1,
    )
    base = tiny_llama()
    probe = inject(copy.deepcopy(base), config).train()
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=5e-2)
    allocator = RankAllocator(probe, config, optimizer)
    for step in range(config.total_steps):
        ids = token_batch(seed=step)
        loss = probe(input_ids=ids, labels=ids).loss + allocator.regularization()
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    ranks = allocator.rank_pattern()
    assert len(set(ranks.values())) > 1  # the probe did allocate different ranks
    save_adapter(probe, tmp_path / "run" / "adapter", config, metadata={"model": "org/tiny-llama"})

    # 2. The recipe.
    assert main(["export", str(tmp_path / "run"), "--format", "rank-pattern"]) == 0
    assert "rank-pattern recipe written to" in capsys.readouterr().out
    recipe = json.loads((tmp_path / "run" / "export-rank-pattern.json").read_text())
    assert recipe["ranks"] == ranks
    assert recipe["base_model_name_or_path"] == "org/tiny-llama"
    kwargs = recipe["peft_lora_config"]
    assert kwargs["task_type"] == "CAUSAL_LM"

    # 3. A plain PEFT LoRA built from it has exactly those ranks, and AdaLoRA's scale in every module.
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    layers = _lora_layers(lora)
    assert {n: m.r["default"] for n, m in layers.items()} == {n: k for n, k in ranks.items() if k > 0}
    assert all(m.scaling["default"] == pytest.approx(config.scale) for m in layers.values())
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    lora(input_ids=ids, labels=ids).loss.backward()  # it trains like any LoRA
    optimizer.step()


def test_recipe_leaves_out_rank_zero_modules_and_mirrors_the_yaml_keys(tmp_path):
    config = AdaLoRAConfig(target_modules=TARGETS, init_r=6, target_r=2, alpha=12.0)
    base = tiny_llama()
    model = inject(copy.deepcopy(base), config)
    kept = fake_training(model, [0, 1, 2, 3, 6, 4, 2])
    save_adapter(model, tmp_path / "adapter", config)
    written = export_output_dir(tmp_path / "adapter", format="rank-pattern")
    assert written == tmp_path / "adapter-rank-pattern.json"  # beside an adapter directory
    recipe = json.loads(written.read_text())

    assert recipe["ranks"] == kept and recipe["total_rank"] == sum(kept.values())
    nonzero = {n: k for n, k in kept.items() if k > 0}
    kwargs, yaml_keys = recipe["peft_lora_config"], recipe["yaml_config"]
    assert kwargs["target_modules"] == sorted(nonzero) and kwargs["rank_pattern"] == nonzero
    assert kwargs["alpha_pattern"] == pytest.approx({n: config.scale * k for n, k in nonzero.items()})
    assert kwargs["lora_alpha"] == pytest.approx(config.scale * kwargs["r"])
    assert yaml_keys == {
        "lora_r": kwargs["r"],
        "lora_alpha": kwargs["lora_alpha"],
        "lora_target_modules": kwargs["target_modules"],
        "lora_rank_pattern": kwargs["rank_pattern"],
        "lora_alpha_pattern": kwargs["alpha_pattern"],
        "lora_dropout": kwargs["lora_dropout"],
    }
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    assert {n: m.r["default"] for n, m in _lora_layers(lora).items()} == nonzero  # rank-0 modules get no LoRA


def test_cli_trains_lora_at_the_ranks_of_a_probe(tmp_path, capsys):
    """Probe (AdaLoRA) -> export rank-pattern -> ``adalora train --method lora --rank-pattern``: each module
    trains at the probe's rank, at uniform LoRA's scale alpha / --lora-r."""
    from lm_helpers import qa_train_args, write_tiny_lm

    from adalora import find_adapters, load_adapter

    model = write_tiny_lm(tmp_path / "model")
    probe = tmp_path / "run"
    assert main(qa_train_args(model, tmp_path, "--mask-interval", "1", "--no-progress")) == 0
    assert main(["export", str(probe), "--format", "rank-pattern"]) == 0
    recipe = probe / "export-rank-pattern.json"
    ranks = json.loads(recipe.read_text())["ranks"]
    assert len(set(ranks.values())) > 1 and max(ranks.values()) > 2  # a pattern unlike uniform rank 2

    lora = tmp_path / "lora"
    args = qa_train_args(model, tmp_path, "--method", "lora", "--lora-r", "2", "--alpha", "8", "--no-progress")
    assert main([*args, "--output-dir", str(lora), "--rank-pattern", str(recipe)]) == 0
    assert json.loads((lora / "rank_pattern.json").read_text()) == ranks
    from transformers import AutoModelForCausalLM

    trained = load_adapter(AutoModelForCausalLM.from_pretrained(model), lora / "adapter")
    adapters = dict(find_adapters(trained))
    assert {n: a.kept_rank() for n, a in adapters.items()} == ranks
    assert {a.scale for a in adapters.values()} == {8 / 2}  # alpha / lora_r in every module, whatever its rank
    assert any(a.P.abs().sum() > 0 for a in adapters.values() if a.r)  # B moved from 0: it trained
    assert all(not a.E.requires_grad for a in adapters.values())  # lambda stays LoRA's frozen ones


def test_rank_pattern_is_refused_in_one_line_where_it_does_not_fit(tmp_path, capsys):
    from lm_helpers import qa_train_args, write_tiny_lm

    model = write_tiny_lm(tmp_path / "model")
    recipe = tmp_path / "pattern.json"
    recipe.write_text(json.dumps({"format": "adalora-rank-pattern", "version": 1, "ranks": {"lm_head": 3}}))
    args = qa_train_args(model, tmp_path, "--no-progress", "--rank-pattern", str(recipe))
    capsys.readouterr()
    assert main(args) == 2  # AdaLoRA allocates ranks itself
    assert "--rank-pattern: gives LoRA per-module ranks, but the --method is adalora" in capsys.readouterr().err
    assert main([*args, "--method", "lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit this model's adapters" in err and len(err.splitlines()) == 1
    recipe.write_text("{}")
    assert main([*args, "--method", "lora"]) == 2
    assert "not a rank-pattern recipe" in capsys.readouterr().err
    assert not (tmp_path / "run" / "adapter").exists()
