"""Adapters on fused MoE expert weights (layers/experts.py): every supported block computes as its own forward,
the update per routed expert against a naive per-expert loop (values and gradients), merge, targeting and refusals."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from conftest import RecordAllocatedShapes, tiny_mixtral, tiny_qwen3_moe, token_batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adalora import AdaLoRAConfig, find_adapters, inject, merge, unload
from adalora.layers import SUPPORTED_EXPERTS, FusedWeight, SVDExperts, expert_weight_names, set_expert_matmul
from adalora.layers.experts import experts_forward

pytestmark = pytest.mark.usefixtures("one_thread")

# How to build each supported block alone: (model type, config class, config fields).
BLOCKS = {
    "Qwen3MoeExperts": ("qwen3_moe", "Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 8}),
    "Qwen2MoeExperts": ("qwen2_moe", "Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 8}),
    "MixtralExperts": ("mixtral", "MixtralConfig", {"num_local_experts": 4, "intermediate_size": 8}),
    "OlmoeExperts": ("olmoe", "OlmoeConfig", {"num_experts": 4, "intermediate_size": 8}),
    "GptOssExperts": ("gpt_oss", "GptOssConfig", {"num_local_experts": 4, "intermediate_size": 8}),
    "DeepseekV2Experts": ("deepseek_v2", "DeepseekV2Config", {"n_routed_experts": 4, "moe_intermediate_size": 8}),
    "DeepseekV3Experts": ("deepseek_v3", "DeepseekV3Config", {"n_routed_experts": 4, "moe_intermediate_size": 8}),
    "Glm4MoeExperts": ("glm4_moe", "Glm4MoeConfig", {"n_routed_experts": 4, "moe_intermediate_size": 8}),
}
TOKENS, HIDDEN, TOP_K = 12, 16, 2


def build_block(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The experts block ``name`` with hidden size 16, 4 experts of width 8, weights ~ N(0, 0.3^2), eager forward."""
    model_type, config_class, fields = BLOCKS[name]
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    configuration = importlib.import_module(f"transformers.models.{model_type}.configuration_{model_type}")
    config = getattr(configuration, config_class)(hidden_size=HIDDEN, num_attention_heads=2, **fields)
    config._experts_implementation = "eager"
    block = getattr(modeling, name)(config).to(dtype)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(std=0.3)
    return block


class Routed(nn.Module):
    """An experts block called with a routing the test chooses (what the MoE layer's router would pass it)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.experts = block

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.experts(x, index, weights)


def routing(tokens: int = TOKENS, experts: int = 4, top_k: int = TOP_K, dtype=torch.float64, allowed=None):
    """Random distinct top-k experts per token (among ``allowed``) and their weights."""
    allowed = torch.arange(experts) if allowed is None else torch.tensor(allowed)
    index = torch.stack([allowed[torch.randperm(len(allowed))[:top_k]] for _ in range(tokens)])
    return index, torch.rand(tokens, top_k, dtype=dtype)


def adapted(block: nn.Module, r: int = 3, **config) -> Routed:
    """``block`` inside :class:`Routed`, both expert weights adapted, lambda and P, Q random (a trained state)."""
    model = inject(Routed(block), AdaLoRAConfig(target_modules=("experts",), init_r=r, target_r=1, **config))
    with torch.no_grad():
        for _, adapter in find_adapters(model):
            adapter.E.normal_()
            adapter.P.normal_(std=0.3)
            adapter.Q.normal_(std=0.3)
    return model


class RecordOps(TorchDispatchMode):
    """The names of the operations dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def naive_update(block: nn.Module, adapters: dict[str, SVDExperts], x, index, weights) -> torch.Tensor:
    """The adapted block, one token and one expert at a time with autograd's own operations: the reference.

    W_e x + scale * P_e diag(lambda_e) Q_e x (paper eq. 3 per expert), the block's bias, gate and routing weight.
    """

    def product(name: str, h: torch.Tensor, e: int) -> torch.Tensor:
        weight = adapters[name].weight if name in adapters else getattr(block, name)
        w = weight[e].T if block.is_transposed else weight[e]  # (d_out, d_in)
        out = w @ h
        if name in adapters:
            a = adapters[name]
            out = out + a.scale * (a.P[e] @ (a.E[e] * (a.Q[e] @ h)))
        if block.has_bias:
            out = out + getattr(block, f"{name}_bias")[e]
        return out

    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros_like(x[t])
        for k in range(index.shape[1]):
            e = int(index[t, k])
            h = block._apply_gate(product("gate_up_proj", x[t], e).unsqueeze(0)).squeeze(0)
            total = total + weights[t, k] * product("down_proj", h, e)
        rows.append(total)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", sorted(SUPPORTED_EXPERTS))
def test_every_supported_block_computes_as_its_own_forward(name):
    block = build_block(name)
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    index, weights = routing()
    expected = block(x, index, weights)  # the class's own (eager) forward
    weights_in_order = [n for n, _ in block.named_parameters() if n in expert_weight_names(block)]
    assert weights_in_order == list(expert_weight_names(block))  # the order PEFT nests its wrappers in
    torch.testing.assert_close(experts_forward(block, x, index, weights), expected, rtol=0, atol=1e-12)
    model = inject(Routed(block), AdaLoRAConfig(target_modules=("experts",), init_r=3, target_r=1))
    assert len(find_adapters(model)) == 2
    torch.testing.assert_close(model(x, index, weights), expected, rtol=0, atol=1e-12)  # lambda = 0 at init


@pytest.mark.parametrize("name", ["Qwen3MoeExperts", "MixtralExperts", "GptOssExperts"])
def test_adapted_block_equals_a_naive_per_expert_loop_with_its_gradients(name):
    model = adapted(build_block(name))
    block = model.experts
    adapters = {n.rpartition(".")[2]: a for n, a in find_adapters(model)}
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64, requires_grad=True)
    index, weights = routing(allowed=[0, 1, 3])  # expert 2 gets no tokens
    grad = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    factors = [x, *(getattr(a, f) for a in adapters.values() for f in ("P", "E", "Q"))]
    ours = model(x, index, weights)
    ours_grads = torch.autograd.grad(ours, factors, grad)
    reference = naive_update(block, adapters, x, index, weights)
    reference_grads = torch.autograd.grad(reference, factors, grad)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(g[2].abs().max() == 0 for g in ours_grads[1:])  # no gradient for the expert without tokens


def test_grouped_products_equal_the_loop_values_and_gradients():
    model = adapted(build_block("Qwen3MoeExperts", torch.float32), r=4)  # grouped_mm: float32, 16-byte rows
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    index, weights = routing(dtype=torch.float32, allowed=[0, 2, 3])
    factors = [x, *(p for _, a in find_adapters(model) for p in a.adapter_parameters())]
    results, grouped_calls = [], []
    for matmul in ("loop", "grouped"):
        set_expert_matmul(model, matmul)
        with RecordOps() as ops:
            out = model(x, index, weights)
            results.append((out, torch.autograd.grad(out.square().sum(), factors)))
        grouped_calls.append(ops.names.count("aten._grouped_mm.default"))
    # Per weight: 3 products forward (base, x Q^T, h (P diag lambda)^T), 5 backward (dx, dh, dQ, dxd, dPL).
    assert grouped_calls[0] == 0 and grouped_calls[1] == 2 * (3 + 5)
    (loop, loop_grads), (grouped, grouped_grads) = results
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)
    for a, b in zip(grouped_grads, loop_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown matmul 'bmm'; choose one of loop, grouped"):
        set_expert_matmul(model, "bmm")


def test_the_update_never_forms_a_dense_expert_matrix():
    block = build_block("Qwen3MoeExperts", torch.float32)
    model = adapted(block)
    x = torch.randn(TOKENS, HIDDEN)
    index, weights = routing(dtype=torch.float32)
    with RecordAllocatedShapes() as shapes:
        model(x, index, weights)
    dense = {tuple(a.weight.shape[1:]) for _, a in find_adapters(model)}
    assert not dense & {s[-2:] for s in shapes.shapes if len(s) >= 2}


@pytest.mark.parametrize("build", [tiny_qwen3_moe, tiny_mixtral], ids=["qwen3-moe", "mixtral"])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_adapted_model_at_init_equals_the_base_whichever_experts_implementation(build, implementation):
    base = build()
    base.config._experts_implementation = implementation
    ids = token_batch(2, 9)
    expected = base(ids).logits
    model = inject(copy.deepcopy(base), AdaLoRAConfig(target_modules=("q_proj", "experts"), init_r=4, target_r=2))
    assert sum(isinstance(a, SVDExperts) for _, a in find_adapters(model)) == 4
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("build", [tiny_qwen3_moe, tiny_mixtral], ids=["qwen3-moe", "mixtral"])
def test_merge_folds_every_expert_update_into_the_fused_weights(build):
    model = inject(build(), AdaLoRAConfig(target_modules=("q_proj", "experts"), init_r=4, target_r=2))
    with torch.no_grad():
        for _, adapter in find_adapters(model):
            adapter.E.normal_()
            adapter.rank_mask[..., 0] = False  # masked triplets have lambda = 0
            adapter.E.mul_(adapter.rank_mask)
    ids = token_batch(2, 9)
    expected = model(ids).logits
    merge(model)
    assert not find_adapters(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, nn.Parameter) and "forward" not in experts.__dict__  # its own forward
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_merged_gpt_oss_block_keeps_its_transposed_layout_and_biases():
    model = adapted(build_block("GptOssExperts"))
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    index, weights = routing()
    expected = model(x, index, weights)
    merge(model)
    assert model.experts.gate_up_proj.shape == (4, HIDDEN, 16)  # (E, in, out)
    torch.testing.assert_close(model(x, index, weights), expected, rtol=1e-10, atol=1e-12)


def test_unload_gives_back_the_original_parameters():
    model = tiny_qwen3_moe()
    original = model.model.layers[1].mlp.experts.down_proj
    inject(model, AdaLoRAConfig(target_modules=("experts",), init_r=4, target_r=2))
    unload(model)
    assert model.model.layers[1].mlp.experts.down_proj is original


# ---------------------------------------------------------------------------------------------- targets
def test_target_parameters_adapt_single_fused_weights():
    model = tiny_qwen3_moe()
    config = AdaLoRAConfig(target_modules=(), target_parameters=["mlp.experts.down_proj"], init_r=4, target_r=2)
    assert config.target_parameters == ("mlp.experts.down_proj",)
    inject(model, config)
    names = [n for n, _ in find_adapters(model)]
    assert names == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    adapter = model.model.layers[0].mlp.experts.down_proj
    assert (adapter.P.shape, adapter.E.shape, adapter.Q.shape, adapter.rank_mask.shape) == (
        (4, 16, 4),
        (4, 4),
        (4, 4, 8),
        (4, 4),
    )
    assert adapter.num_matrices == 4


def test_unknown_blocks_and_parameters_that_are_not_expert_weights_are_refused_by_name():
    class OddExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 8))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = OddExperts()

    with pytest.raises(ValueError, match=r"OddExperts is not a fused-experts block adalora knows.*Qwen3MoeExperts"):
        inject(Layer(), AdaLoRAConfig(target_modules=(), target_parameters=("gate_up_proj",)))
    with pytest.raises(ValueError, match=r"unsupported type: experts \(OddExperts\).*fused expert weights of the MoE"):
        inject(Layer(), AdaLoRAConfig(target_modules=("experts",)))
    with pytest.raises(ValueError, match=r"mlp.gate.weight \(a parameter of Qwen3MoeTopKRouter\)"):
        inject(tiny_qwen3_moe(), AdaLoRAConfig(target_modules=(), target_parameters=("mlp.gate.weight",)))
    with pytest.raises(ValueError, match=r"not an expert weight matrix of .*GptOssExperts.*gate_up_proj, down_proj"):
        inject(
            Routed(build_block("GptOssExperts")),
            AdaLoRAConfig(target_modules=(), target_parameters=("down_proj_bias",)),
        )


def test_targets_that_leave_the_experts_alone_say_so_once():
    with pytest.warns(UserWarning, match=r"2 mixture-of-experts block\(s\) \(Qwen3MoeExperts.*Add 'experts'"):
        inject(tiny_qwen3_moe(), AdaLoRAConfig(target_modules=("q_proj",), init_r=4, target_r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(tiny_qwen3_moe(), AdaLoRAConfig(target_modules=("q_proj", "experts"), init_r=4, target_r=2))


def test_config_needs_some_target_and_parameter_names():
    with pytest.raises(ValueError, match="target_modules: must be a non-empty list"):
        AdaLoRAConfig(target_modules=())
    with pytest.raises(ValueError, match="target_parameters: must be a list of parameter names"):
        AdaLoRAConfig(target_parameters=("",))
    config = AdaLoRAConfig(target_modules=(), target_parameters=("down_proj",))
    assert AdaLoRAConfig.from_json(config.to_json()) == config


def test_fused_weight_reads_its_block():
    block = build_block("GptOssExperts")
    fused = FusedWeight(block, "down_proj")
    assert fused.transposed and fused.order == 1 and SVDExperts.dims(fused) == (HIDDEN, 8)


def test_an_adapted_model_copies_and_pickles():
    import io

    model = adapted_model()
    ids = token_batch(2, 9)
    expected = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        block = copied.model.layers[0].mlp.experts
        assert block.forward.args[0] is block  # computes with its own adapters, not the original's
        torch.testing.assert_close(copied(ids).logits, expected)


def adapted_model():
    model = inject(tiny_qwen3_moe(), AdaLoRAConfig(target_modules=("experts",), init_r=4, target_r=2))
    with torch.no_grad():
        for _, adapter in find_adapters(model):
            adapter.E.normal_()
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_loop_products_agree_on_cuda(dtype):
    """On a GPU the grouped path runs torch's CUDA grouped_mm kernels (float32 adapters on a float32 or bf16 base)."""
    model = tiny_qwen3_moe(hidden=64).to("cuda", dtype)
    inject(model, AdaLoRAConfig(target_modules=("q_proj", "experts"), init_r=4, target_r=2))
    with torch.no_grad():
        for _, adapter in find_adapters(model):
            adapter.E.normal_()
    ids = token_batch(4, 16).cuda()
    factors = [p for _, a in find_adapters(model) for p in a.adapter_parameters()]
    results = []
    for matmul in ("loop", "grouped"):
        set_expert_matmul(model, matmul)
        loss = model(ids, labels=ids).loss
        results.append((loss.detach(), torch.autograd.grad(loss, factors)))
    (loop, loop_grads), (grouped, grouped_grads) = results
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(grouped, loop, **tolerance)
    for a, b in zip(grouped_grads, loop_grads, strict=True):
        torch.testing.assert_close(a, b, **tolerance)
