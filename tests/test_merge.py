"""merge() folds W0 + scale * P diag(lambda) Q into plain layers; unload() restores the base layers."""

import copy

import pytest
import torch
from adapter_helpers import fake_training, logits
from conftest import tiny_bert, tiny_gpt2, token_batch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora import AdaLoRAConfig, SVDAdapter, find_adapters, inject, merge, save_adapter, unload
from adalora.run.convert import merge_output_dir


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_merge_matches_a_hand_computed_weight():
    model = _Tiny()
    with torch.no_grad():
        model.proj.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]]))
        model.proj.bias.copy_(torch.tensor([0.5, -0.5]))
    inject(model, AdaLoRAConfig(target_modules=["proj"], init_r=2, target_r=1, alpha=4.0))  # scale = 4 / 2 = 2
    adapter = model.proj
    with torch.no_grad():
        adapter.P.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        adapter.E.copy_(torch.tensor([3.0, -1.0]))
        adapter.Q.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]))
    # scale * P diag(E) Q = 2 * [[3, 3, 0], [0, -2, -1]] = [[6, 6, 0], [0, -4, -2]]
    expected = torch.tensor([[7.0, 6.0, -1.0], [2.0, -3.0, -2.0]])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    adapted = model(x)

    merge(model)

    assert type(model.proj) is nn.Linear
    torch.testing.assert_close(model.proj.weight, expected)
    torch.testing.assert_close(model.proj.bias, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(model(x), adapted)
    torch.testing.assert_close(model(x), x @ expected.T + torch.tensor([0.5, -0.5]))


@pytest.mark.parametrize(
    ("build", "targets", "base_type"),
    [(tiny_bert, ["query", "value", "dense"], nn.Linear), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], Conv1D)],
    ids=["bert", "gpt2"],
)
def test_merge_gives_the_base_architecture_with_the_same_outputs(build, targets, base_type):
    model = inject(build(), AdaLoRAConfig(target_modules=targets, init_r=6, target_r=2, alpha=8.0))
    names = [n for n, _ in find_adapters(model)]
    fake_training(model, [0, 2, 3, 6])
    x = token_batch()
    adapted = logits(model, x)

    merged = merge(model)

    assert merged is model
    assert not any(isinstance(m, SVDAdapter) for m in merged.modules())
    assert all(type(merged.get_submodule(n)) is base_type for n in names)
    assert not any(k.endswith((".P", ".E", ".Q", ".rank_mask")) for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, x), adapted, atol=1e-5, rtol=1e-4)


def test_merge_into_a_bfloat16_base_rounds_once():
    model = _Tiny().to(torch.bfloat16)
    inject(model, AdaLoRAConfig(target_modules=["proj"], init_r=2, target_r=1))
    fake_training(model, [2])
    adapter = model.proj
    expected = (adapter.weight.float() + adapter.delta_weight()).to(torch.bfloat16)
    merge(model)
    assert model.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.proj.weight, expected)


def test_safe_merge_refuses_a_non_finite_adapter_and_changes_nothing():
    model = inject(tiny_bert(), AdaLoRAConfig(target_modules=["query", "value"], init_r=4, target_r=2))
    fake_training(model, [4])
    name, bad = find_adapters(model)[-1]
    with torch.no_grad():
        bad.E[0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"adapter holds NaN or inf \(1 of \d+ tensors, e.g. '{name}.E'\)"):
        merge(model)
    assert len(find_adapters(model)) == 4
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    merge(model, safe=False)  # the caller's choice: merges anyway
    assert not find_adapters(model)


def test_safe_merge_refuses_a_merged_weight_that_overflows_the_base_dtype():
    model = _Tiny().to(torch.float16)
    inject(model, AdaLoRAConfig(target_modules=["proj"], init_r=2, target_r=1, alpha=2.0))  # scale 1
    with torch.no_grad():  # a finite adapter whose update (about 1e6) is beyond float16's largest value (65504)
        model.proj.P.fill_(1.0), model.proj.E.fill_(1e6), model.proj.Q.fill_(1.0)
    with pytest.raises(ValueError, match="merged weight of 'proj' contains NaN or inf.*left unchanged"):
        merge(model)
    assert isinstance(model.proj, SVDAdapter)


def test_unload_restores_the_base_model_and_its_parameters():
    base = tiny_gpt2()
    reference = copy.deepcopy(base)
    weights = {n: base.get_submodule(n).weight for n in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc")}
    inject(base, AdaLoRAConfig(target_modules=["c_attn", "c_fc"], init_r=4, target_r=2))
    fake_training(base, [3])
    x = token_batch()
    assert not torch.allclose(logits(base, x), logits(reference, x))

    unloaded = unload(base)

    assert not find_adapters(unloaded)
    assert all(unloaded.get_submodule(n).weight is w for n, w in weights.items())  # the very same Parameters
    assert isinstance(unloaded.get_submodule("transformer.h.0.attn.c_attn"), Conv1D)
    torch.testing.assert_close(logits(unloaded, x), logits(reference, x), atol=0, rtol=0)


def test_merge_and_unload_need_adapters():
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        merge(tiny_bert())
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        unload(tiny_bert())


def test_merge_output_dir_writes_a_loadable_merged_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = tiny_bert(num_labels=3)
    base.save_pretrained(tmp_path / "base")
    config = AdaLoRAConfig(target_modules=["query", "value"], init_r=4, target_r=2, modules_to_save=("classifier",))
    model = inject(copy.deepcopy(base), config)
    fake_training(model, [1, 4])
    save_adapter(model, tmp_path / "run" / "adapter", config, metadata={"model": str(tmp_path / "base")})
    x = token_batch()

    out = merge_output_dir(tmp_path / "run", tmp_path / "merged")

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any(isinstance(m, SVDAdapter) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), logits(model, x), atol=1e-5, rtol=1e-4)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_merge_output_dir_explains_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_output_dir(tmp_path / "nowhere", tmp_path / "merged")
    (tmp_path / "full" / "model").mkdir(parents=True)
    (tmp_path / "full" / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="fully fine-tuned model"):
        merge_output_dir(tmp_path / "full", tmp_path / "merged")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no AdaLoRA adapter in"):
        merge_output_dir(tmp_path / "empty", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_merge_and_export(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from adalora.cli import main

    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    config = AdaLoRAConfig(target_modules=["query", "value"], init_r=4, target_r=2, modules_to_save=("classifier",))
    model = inject(copy.deepcopy(base), config)
    fake_training(model, [1, 3])
    save_adapter(model, tmp_path / "run" / "adapter", config, metadata={"model": str(tmp_path / "base")})
    x = token_batch()

    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, x), logits(model, x), atol=1e-5, rtol=1e-4)

    assert main(["export", str(tmp_path / "run"), "--format", "peft"]) == 0
    assert (tmp_path / "run" / "export-peft-compact" / "adapter_config.json").is_file()
    assert "peft adapter written to" in capsys.readouterr().out

    assert main(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")]) == 2
    assert "adalora: error: " in capsys.readouterr().err
