"""Adapters for nn.Conv1d/2d/3d and nn.Embedding: triplet semantics, merge, save/load, compact, PEFT, allocation.

Every layer type must behave like the linear adapter: the identity at init, the adapted forward equal to the
merged layer, the same files and the same global allocation (rank moves between layer types).
"""

import copy
import json

import pytest
import torch
from adapter_helpers import fake_training
from conftest import RecordAllocatedShapes, tiny_gpt2, token_batch
from torch import nn

from adalora import (
    AdaLoRAConfig,
    RankAllocator,
    compact,
    export_peft,
    find_adapters,
    inject,
    load_adapter,
    merge,
    save_adapter,
)
from adalora.files.adapter import read_adapter_config
from adalora.layers import SVDConv, SVDEmbedding, adapter_class_for

# One base layer per case, with the settings that change how the update must be computed.
CONV_CASES = {
    "conv2d": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv2d-strided-dilated-nobias": lambda: nn.Conv2d(
        6, 8, (3, 2), stride=2, padding=(2, 0), dilation=(2, 1), bias=False
    ),
    "conv2d-groups": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
    "conv2d-depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    "conv2d-same-reflect": lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"),
    "conv2d-circular": lambda: nn.Conv2d(6, 8, 3, padding=2, padding_mode="circular"),
    "conv1d": lambda: nn.Conv1d(6, 8, 5, padding=2),
    "conv3d": lambda: nn.Conv3d(4, 6, 3, padding=1),
}


def _input_for(layer: nn.Module, batch: int = 2, size: int = 7) -> torch.Tensor:
    if isinstance(layer, nn.Embedding):
        ids = torch.randint(0, layer.num_embeddings, (batch, size))
        if layer.padding_idx is not None:
            ids[0, :2] = layer.padding_idx
        return ids
    return torch.randn(batch, layer.in_channels, *[size] * (layer.weight.dim() - 2))


class TinyMixed(nn.Module):
    """Tokens -> embedding -> Conv1d over the sequence -> Conv2d over (sequence x 1) -> mean -> linear head."""

    def __init__(self, vocab: int = 30, dim: int = 8, out: int = 4, gate: float = 1.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv1d = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv2d = nn.Conv2d(dim, dim, (3, 1), padding=(1, 0))
        self.head = nn.Linear(dim, out)
        self.gate = gate  # scales what the embedding and the Conv1d see (the allocation test makes it small)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1d(self.embed(ids).transpose(1, 2) * self.gate)  # (N, dim, L)
        h = self.conv2d(torch.relu(h).unsqueeze(-1)).squeeze(-1)  # (N, dim, L)
        return self.head(torch.relu(h).mean(dim=2))


MIXED_CONFIG = AdaLoRAConfig(target_modules=["embed", "conv1d", "conv2d", "head"], init_r=4, target_r=2, alpha=8.0)


def _trained_mixed(ranks=(1, 3, 0, 4)):
    base = TinyMixed().eval()
    model = inject(copy.deepcopy(base), MIXED_CONFIG)
    kept = fake_training(model, list(ranks))
    return base, model, kept


# ---------------------------------------------------------------------------------------------- single layers
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_adapter_is_the_identity_at_init_and_merges_exactly(case):
    base = CONV_CASES[case]()
    x = _input_for(base)
    expected = base(x)
    adapter = SVDConv.from_base(base, r=3, scale=2.0)
    assert adapter.weight is base.weight and adapter.bias is base.bias  # state-dict keys unchanged
    assert adapter.P.shape == (base.out_channels, 3) and adapter.Q.shape == (3, base.weight[0].numel())
    assert torch.equal(adapter(x), expected)
    with torch.no_grad():
        adapter.E.normal_()
    delta = adapter.delta_weight()
    assert delta.shape == base.weight.shape
    # eq. 3 written out in the kernel layout: W = W0 + scale * (P diag(lambda) Q) viewed as the kernel
    torch.testing.assert_close(delta, (2.0 * adapter.P @ torch.diag(adapter.E) @ adapter.Q).view(base.weight.shape))
    merged = adapter.to_base(base.weight + delta)
    assert type(merged) is type(base)
    torch.testing.assert_close(adapter(x), merged(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter(x[0]), merged(x[0]), atol=1e-5, rtol=1e-4)  # unbatched input


def test_conv_forward_never_forms_the_full_kernel():
    base = nn.Conv2d(10, 12, 3, padding=1).requires_grad_(False)
    adapter = SVDConv.from_base(base, r=2, scale=1.0)
    with torch.no_grad():
        adapter.E.normal_()
    with RecordAllocatedShapes() as recorder:
        adapter(torch.randn(1, 10, 5, 5)).sum().backward()
    assert (12, 10, 3, 3) not in recorder.shapes and (12, 90) not in recorder.shapes
    assert adapter.Q.grad.shape == (2, 90)  # Q trains as the 2-D (r, in * kh * kw) matrix


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_adapter_gathers_columns_of_q_and_keeps_the_padding_row(padding_idx):
    base = nn.Embedding(20, 8, padding_idx=padding_idx)
    ids = torch.tensor([[3, 1, 5, 3], [0, 19, 3, 2]])
    expected = base(ids)
    adapter = SVDEmbedding.from_base(base, r=4, scale=0.5, dropout=0.3)
    assert (adapter.P.shape, adapter.Q.shape) == ((8, 4), (4, 20))  # P (embedding_dim, r), Q (r, num_embeddings)
    assert isinstance(adapter.dropout, nn.Identity)  # the input is token ids: no dropout
    assert torch.equal(adapter(ids), expected)
    with torch.no_grad():
        adapter.E.normal_()
    update = (0.5 * adapter.P @ torch.diag(adapter.E) @ adapter.Q).T  # (num_embeddings, embedding_dim)
    if padding_idx is not None:
        update[padding_idx] = 0.0
    torch.testing.assert_close(adapter(ids), base.weight[ids] + update[ids])
    torch.testing.assert_close(adapter.delta_weight(), update)
    torch.testing.assert_close(adapter.to_base(base.weight + update)(ids), adapter(ids))
    adapter(ids).sum().backward()
    if padding_idx is not None:
        assert torch.equal(adapter.Q.grad[:, padding_idx], torch.zeros(4))  # the padding row cannot learn
        assert torch.equal(adapter(ids)[0, 0], base.weight[padding_idx])


def test_half_precision_conv_and_embedding_get_float32_adapters():
    conv = SVDConv.from_base(nn.Conv2d(4, 6, 3).to(torch.bfloat16), r=2, scale=1.0)
    embed = SVDEmbedding.from_base(nn.Embedding(10, 6).to(torch.bfloat16), r=2, scale=1.0)
    assert conv.Q.dtype == embed.Q.dtype == torch.float32
    assert conv(torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert embed(torch.tensor([[1, 2]])).dtype == torch.bfloat16


def test_registration_by_type_and_clear_refusals():
    assert adapter_class_for(nn.Conv2d(2, 2, 1)) is SVDConv
    assert adapter_class_for(nn.Conv3d(2, 2, 1)) is SVDConv
    assert adapter_class_for(nn.Embedding(4, 2)) is SVDEmbedding
    assert adapter_class_for(nn.ConvTranspose2d(2, 2, 3)) is None  # not a Conv2d: unsupported

    class ScaledEmbedding(nn.Embedding):  # like Gemma's: forward multiplies by sqrt(dim)
        def forward(self, ids):
            return super().forward(ids) * 2.0

    for module, target, message in [
        (nn.Embedding(10, 4, max_norm=1.0), "1", "max_norm"),
        (ScaledEmbedding(10, 4), "1", "redefines forward"),
        (nn.ConvTranspose2d(4, 4, 3), "1", "unsupported type"),
        (nn.MultiheadAttention(4, 2), "out_proj", "uses its out_proj's weight without calling it"),
    ]:
        model = nn.Sequential(nn.Linear(4, 4), module)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=message):
            inject(model, AdaLoRAConfig(target_modules=["0", target], init_r=2, target_r=1))
        assert not find_adapters(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- whole models
def test_mixed_model_identity_merge_compact_and_round_trip(tmp_path):
    base = TinyMixed().eval()
    ids = torch.randint(0, 30, (3, 9))
    expected_base = base(ids)
    model = inject(copy.deepcopy(base), MIXED_CONFIG)
    assert [type(a).__name__ for _, a in find_adapters(model)] == ["SVDEmbedding", "SVDConv", "SVDConv", "SVDLinear"]
    assert set(base.state_dict()) <= set(model.state_dict())  # base keys unchanged, adapter keys added
    assert torch.equal(model(ids), expected_base)

    kept = fake_training(model, [1, 3, 0, 4])
    expected = model(ids)
    assert not torch.allclose(expected, expected_base)

    save_adapter(model, tmp_path / "adapter", MIXED_CONFIG)
    info = read_adapter_config(tmp_path / "adapter")
    assert {n: m["type"] for n, m in info["modules"].items()} == {
        "embed": "embedding",
        "conv1d": "nn_conv1d",
        "conv2d": "nn_conv2d",
        "head": "linear",
    }
    assert info["modules"]["conv2d"]["weight_shape"] == [8, 8, 3, 1]
    assert info["modules"]["embed"]["layer"] == {"padding_idx": 0}
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids), expected)
    assert {n: a.r for n, a in find_adapters(loaded)} == kept

    assert compact(model) == kept
    torch.testing.assert_close(model(ids), expected)  # rank 0 (conv2d here) included
    merged = merge(model)
    assert not find_adapters(merged)
    assert [type(m) for m in (merged.embed, merged.conv1d, merged.conv2d, merged.head)] == [
        nn.Embedding,
        nn.Conv1d,
        nn.Conv2d,
        nn.Linear,
    ]
    torch.testing.assert_close(merged(ids), expected, atol=1e-6, rtol=1e-5)


def test_load_refuses_a_base_layer_of_another_type(tmp_path):
    _, model, _ = _trained_mixed()
    save_adapter(model, tmp_path / "adapter", MIXED_CONFIG)
    other = TinyMixed().eval()
    other.conv2d = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), padding_mode="zeros", groups=2)  # another kernel shape
    with pytest.raises(ValueError, match="conv2d"):
        load_adapter(other, tmp_path / "adapter")
    assert not find_adapters(other)


def test_tied_embedding_merges_into_an_untied_model_that_saves_and_reloads(tmp_path):
    from transformers import GPT2LMHeadModel

    base = tiny_gpt2()
    config = AdaLoRAConfig(target_modules=["wte", "c_attn"], init_r=4, target_r=2)
    model = inject(copy.deepcopy(base), config)
    assert model.lm_head.weight is model.transformer.wte.weight  # inject keeps the tie
    fake_training(model, [3, 2, 4])
    x = token_batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    merge(model)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.save_pretrained(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- PEFT export
def test_conv_and_embedding_export_to_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyMixed()
            self.conv3d = nn.Conv3d(2, 3, 3, stride=2, padding=1)

        def forward(self, ids, volume):
            return self.inner(ids), self.conv3d(volume)

    config = MIXED_CONFIG.replace(target_modules=["embed", "conv1d", "conv2d", "head", "conv3d"])
    base = Net().eval()
    model = inject(copy.deepcopy(base), config)
    kept = fake_training(model, [2, 3, 1, 4, 2])
    ids, volume = torch.randint(0, 30, (3, 9)), torch.randn(2, 2, 5, 5, 5)
    ids[0, :3] = 0  # padding_idx: PEFT must leave that row alone too
    expected = model(ids, volume)

    export_peft(model, tmp_path / "lora", config)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    for got, want in zip(peft_model(ids, volume), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    peft_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert peft_config["rank_pattern"] == {n: k for n, k in kept.items() if k > 0}
    assert set(kept) == {"inner.embed", "inner.conv1d", "inner.conv2d", "inner.head", "conv3d"}


def test_tied_embedding_exports_to_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_gpt2()
    config = AdaLoRAConfig(target_modules=["wte", "c_attn"], init_r=4, target_r=2)
    model = inject(copy.deepcopy(base), config)
    fake_training(model, [3, 2, 4])
    x = token_batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    export_peft(model, tmp_path / "lora", config)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():  # PEFT, like us, adapts the lookup only: the tied lm_head keeps the base weight
        torch.testing.assert_close(peft_model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (lambda: nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (lambda: nn.Conv2d(4, 4, 3, dilation=2), "dilation"),
        (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    ],
)
def test_export_refuses_convolutions_peft_cannot_express(tmp_path, layer, message):
    config = AdaLoRAConfig(target_modules=["0"], init_r=2, target_r=1)
    model = inject(nn.Sequential(layer()), config)
    fake_training(model, [2])
    with pytest.raises(ValueError, match=message):
        export_peft(model, tmp_path / "lora", config)
    assert not (tmp_path / "lora").exists()


# ---------------------------------------------------------------------------------------------- allocation
def test_allocation_moves_rank_across_layer_types():
    """A tiny gate on what the embedding and the Conv1d see makes their triplets unimportant: the global top-b
    hands their rank to the Conv2d and the linear head, which end above the average target rank.

    The regulariser is off so that importance reflects the task loss alone (on a model this small the gradients
    of R(P, Q) would dominate |w * dL/dw| while lambda is still near 0).
    """
    config = MIXED_CONFIG.replace(warmup_steps=4, final_steps=4, total_steps=24, mask_interval=2, orth_reg_weight=0.0)
    model = inject(TinyMixed(gate=1e-3), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(model, config, optimizer)
    ids, target = torch.randint(1, 30, (16, 9)), torch.randn(16, 4)
    for _ in range(config.total_steps):
        loss = torch.nn.functional.mse_loss(model(ids), target) + allocator.regularization()
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    ranks = allocator.rank_pattern()
    assert sum(ranks.values()) == allocator.target_budget == 2 * 4
    assert ranks["embed"] + ranks["conv1d"] < ranks["conv2d"] + ranks["head"]
    assert min(ranks["conv2d"], ranks["head"]) > config.target_r  # rank moved to them from the other types
