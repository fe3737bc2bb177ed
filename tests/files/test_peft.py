"""PEFT interoperability, checked with the real ``peft`` package: LoRA export and AdaLoRA import."""

import copy
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import fake_training, logits
from conftest import tiny_bert, tiny_gpt2, token_batch
from safetensors.torch import load_file

from adalora import AdaLoRAConfig, export_peft, find_adapters, import_peft, inject, save_adapter
from adalora.files.peft import PEFT_ADALORA_EPS, adalora_config_from_peft
from adalora.run.convert import export_output_dir

peft = pytest.importorskip("peft")

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
    ),
    "gpt2": (tiny_gpt2, AdaLoRAConfig(target_modules=["c_attn", "c_proj", "c_fc"], init_r=6, target_r=2, alpha=12.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_lora_loads_in_peft_with_the_same_outputs(tmp_path, case):
    build, config = CASES[case]
    # float64, so that a difference in how PEFT orders the same sums (its releases have changed it) does
    # not pass for a wrong export, nor a wrong export for rounding
    base = build().double()
    model = inject(copy.deepcopy(base), config)
    kept = fake_training(model, [0, 1, 2, 3, 6])
    x = token_batch()
    expected = logits(model, x)

    export_peft(model, tmp_path / "lora", config)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()

    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-10, rtol=1e-10)
    peft_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    nonzero = {n: k for n, k in kept.items() if k > 0}
    assert peft_config["rank_pattern"] == nonzero
    # compact layout (the default): one lora_alpha = r = the most common kept rank, no alpha_pattern
    assert peft_config["alpha_pattern"] == {}
    counts = Counter(nonzero.values())
    common = max(counts, key=lambda k: (counts[k], k))  # the most common kept rank; ties -> the largest
    assert peft_config["r"] == peft_config["lora_alpha"] == common
    assert peft_config["fan_in_fan_out"] == (case == "gpt2")
    lora_layers = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert sorted(lora_layers) == sorted(nonzero)  # modules whose rank went to 0 are left out
    for name, layer in lora_layers.items():
        assert layer.r["default"] == kept[name]
        assert layer.scaling["default"] == pytest.approx(common / kept[name])  # PEFT's lora_alpha / k per module


def test_export_folds_lambda_into_lora_a(tmp_path):
    _, config = CASES["bert"]
    model = inject(tiny_bert(), config)
    fake_training(model, [2])
    export_peft(model, tmp_path / "lora", config)
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    name, adapter = find_adapters(model)[0]
    m = adapter.rank_mask
    a = tensors[f"base_model.model.{name}.lora_A.weight"]
    b = tensors[f"base_model.model.{name}.lora_B.weight"]
    k = int(m.sum())
    lora_alpha = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_alpha"]
    # the compact layout folds scale * k / lora_alpha into lambda, so that lora_alpha / k * B A = scale * P diag(E) Q
    torch.testing.assert_close(a, config.scale * k / lora_alpha * torch.diag(adapter.E[m]) @ adapter.Q[m])
    torch.testing.assert_close(b, adapter.P[:, m])
    torch.testing.assert_close(tensors["base_model.model.classifier.weight"], model.classifier.weight)


def test_cli_export_from_a_saved_adapter_equals_export_peft(tmp_path):
    _, config = CASES["gpt2"]
    model = inject(tiny_gpt2(), config)
    fake_training(model, [0, 3, 5])
    export_peft(model, tmp_path / "direct", config, base_model_name_or_path="base-path")
    save_adapter(model, tmp_path / "run" / "adapter", config, metadata={"model": "base-path"})
    export_output_dir(tmp_path / "run", tmp_path / "via-cli", format="peft")
    direct = load_file(tmp_path / "direct" / "adapter_model.safetensors")
    via_cli = load_file(tmp_path / "via-cli" / "adapter_model.safetensors")
    assert direct.keys() == via_cli.keys()
    assert all(torch.equal(direct[k], via_cli[k]) for k in direct)
    assert json.loads((tmp_path / "direct" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "via-cli" / "adapter_config.json").read_text()
    )
    with pytest.raises(ValueError, match="unknown export format"):
        export_output_dir(tmp_path / "run", tmp_path / "x", format="onnx")
    default = tmp_path / "run" / "export-peft-compact"  # inside the run directory, one per format and layout
    assert export_output_dir(tmp_path / "run") == default
    assert export_output_dir(tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter-peft-compact"
    assert (default / "adapter_model.safetensors").is_file()


def test_export_with_every_rank_zero_is_an_error(tmp_path):
    _, config = CASES["bert"]
    model = inject(tiny_bert(), config)
    fake_training(model, [0])
    with pytest.raises(ValueError, match="every adapter has rank 0"):
        export_peft(model, tmp_path / "lora", config)
    assert not (tmp_path / "lora").exists()


# ---------------------------------------------------------------------- import of PEFT AdaLoRA checkpoints
def _train_peft_adalora(build, targets, task_type, steps=12):
    """A PEFT AdaLoRA model trained with update_and_allocate until its rank pattern is final and sliced."""
    base = build()
    fresh = copy.deepcopy(base)
    peft_config = peft.AdaLoraConfig(
        init_r=6,
        target_r=2,
        lora_alpha=8,
        target_modules=targets,
        tinit=2,
        tfinal=3,
        deltaT=2,
        total_step=steps,
        task_type=task_type,
    )
    model = peft.get_peft_model(base, peft_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x = token_batch()
    model.train()
    for step in range(steps):
        out = model(input_ids=x)
        if task_type == "SEQ_CLS":
            loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 1, 0]))
        else:
            loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), x[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    return model.eval(), fresh


@pytest.mark.parametrize(
    ("build", "targets", "task_type"),
    [(tiny_bert, ["query", "value"], "SEQ_CLS"), (tiny_gpt2, ["c_attn", "c_fc"], "CAUSAL_LM")],
    ids=["bert", "gpt2"],
)
def test_import_peft_adalora_checkpoint_gives_the_same_outputs(tmp_path, build, targets, task_type):
    peft_model, fresh = _train_peft_adalora(build, targets, task_type)
    x = token_batch()
    expected = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()}
    assert min(ranks.values()) < 6  # some triplets were masked, and the saved tensors are sliced

    model = import_peft(fresh, tmp_path / "peft")

    assert {n: a.r for n, a in find_adapters(model)} == ranks
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-4)
    assert all(a.scale == 8 / 6 for _, a in find_adapters(model))


def test_import_folds_peft_epsilon_into_lambda(tmp_path):
    peft_model, fresh = _train_peft_adalora(tiny_bert, ["query", "value"], "SEQ_CLS")
    peft_model.save_pretrained(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    model = import_peft(fresh, tmp_path / "peft")
    name, adapter = max(find_adapters(model), key=lambda item: item[1].r)
    assert adapter.r > 0
    e_peft = tensors[f"base_model.model.{name}.lora_E"].reshape(-1)
    # ours: alpha / init_r * E_ours == PEFT: alpha / (init_r + 1e-5) * E_peft
    torch.testing.assert_close(adapter.E * adapter.scale, e_peft * 8 / (6 + PEFT_ADALORA_EPS), atol=0, rtol=1e-6)
    assert not torch.equal(adapter.E, e_peft)


def test_imported_config_carries_the_peft_schedule():
    peft_config = {"init_r": 12, "target_r": 4, "lora_alpha": 32, "tinit": 100, "tfinal": 200, "deltaT": 5}
    peft_config |= {"total_step": 1000, "beta1": 0.8, "beta2": 0.9, "orth_reg_weight": 0.3, "lora_dropout": 0.1}
    config = adalora_config_from_peft(peft_config | {"target_modules": ["q", "v"]})
    assert (config.init_r, config.target_r, config.alpha, config.dropout) == (12, 4, 32.0, 0.1)
    assert (config.warmup_steps, config.final_steps, config.mask_interval, config.total_steps) == (100, 200, 5, 1000)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.target_modules) == (0.8, 0.9, 0.3, ("q", "v"))


def test_import_errors_are_clear_and_load_nothing(tmp_path):
    _, config = CASES["bert"]
    model = inject(tiny_bert(), config)
    fake_training(model, [2])
    export_peft(model, tmp_path / "lora", config)
    fresh = tiny_bert()
    with pytest.raises(ValueError, match="holds a PEFT LORA adapter, not an AdaLoRA one"):
        import_peft(fresh, tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        import_peft(fresh, tmp_path / "nothing")

    peft_model, _ = _train_peft_adalora(tiny_bert, ["query", "value"], "SEQ_CLS", steps=8)
    peft_model.save_pretrained(tmp_path / "peft")
    other = tiny_bert(hidden=64)
    with pytest.raises(ValueError, match=r"lora_B \[32, \d\].*maps 64 -> 64 features"):
        import_peft(other, tmp_path / "peft")
    assert not find_adapters(other)
