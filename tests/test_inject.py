import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import nn

from adalora import AdaLoRAConfig, find_adapters, inject
from adalora.layers import SVDConv1D, SVDLinear


def _config(targets, **kw):
    return AdaLoRAConfig(
        target_modules=targets, init_r=4, target_r=2, total_steps=100, warmup_steps=10, final_steps=10, **kw
    )


@pytest.mark.parametrize(
    ("build", "targets", "adapter_type", "per_layer"),
    [
        (tiny_bert, ["query", "key", "value", "dense"], SVDLinear, 6),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], SVDConv1D, 4),  # attn.c_proj and mlp.c_proj
        (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], SVDLinear, 7),
    ],
)
def test_transformers_models_are_identical_at_init(build, targets, adapter_type, per_layer):
    model = build()
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
    state_keys = set(model.state_dict())
    inject(model, _config(targets))
    adapters = find_adapters(model)
    extra = 1 if build is tiny_bert else 0  # BERT's pooler is also named "dense"
    assert len(adapters) == 2 * per_layer + extra
    assert all(isinstance(a, adapter_type) for _, a in adapters)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    # Base keys are unchanged; adapters only add P, E, Q and rank_mask.
    new_keys = set(model.state_dict()) - state_keys
    assert state_keys <= set(model.state_dict())
    assert {k.rsplit(".", 1)[1] for k in new_keys} == {"P", "E", "Q", "rank_mask"}


def test_only_adapters_and_modules_to_save_train():
    model = inject(tiny_bert(), _config(["query", "value"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert name.startswith("classifier.") or name.rsplit(".", 1)[1] in {"P", "E", "Q"}
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert not any(n.endswith("query.weight") for n in trainable)


def test_suffix_matching_is_on_whole_name_components():
    model = inject(tiny_bert(), _config(["output.dense"]))
    names = [n for n, _ in find_adapters(model)]
    # attention.output.dense and the FFN's output.dense, but not intermediate.dense or the pooler.
    assert names == [
        f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")
    ]


def test_regex_target():
    model = inject(tiny_bert(), _config(r".*layer\.1\.attention\.self\.(query|value)"))
    assert [n.split("layer.1.")[1] for n, _ in find_adapters(model)] == ["attention.self.query", "attention.self.value"]


def test_no_match_lists_existing_module_names():
    with pytest.raises(ValueError, match="no module name matches") as info:
        inject(tiny_bert(), _config(["q_proj"]))
    assert "bert.encoder.layer.0.attention.self.query" in str(info.value)


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match=r"unsupported type: .*attention \(BertAttention\)"):
        inject(tiny_bert(), _config(["attention"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        inject(tiny_bert(), _config(["LayerNorm"]))


def test_modules_to_save_must_match():
    with pytest.raises(ValueError, match="modules_to_save"):
        inject(tiny_bert(), _config(["query"], modules_to_save=["head"]))


def test_double_injection_is_refused():
    model = inject(tiny_bert(), _config(["query"]))
    with pytest.raises(ValueError, match="already contains"):
        inject(model, _config(["query"]))


def test_plain_module_and_training_mode_is_kept():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    inject(model, _config(["0", "2"]))
    assert isinstance(model[0], SVDLinear) and isinstance(model[2], SVDLinear)
    assert model[0].training
