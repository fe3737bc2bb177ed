"""The adapter path's hand-written gradients (layers.mixing) against autograd, on every layer type.

The reference for each layer is the merged layer, ``W0 + scale * P diag(lambda) Q`` in the base layout, run with
plain autograd: its gradients with respect to the input, P, lambda and Q are what the adapter's must be.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import LAYERS, trained
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adalora.layers import SVDLinear
from adalora.layers.mixing import column_dots, svd_mix


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    return list(torch.autograd.grad(output, inputs, upstream))


@pytest.mark.parametrize("lora", [False, True], ids=["adalora", "lora"])
@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_type_matches_autograd_through_the_merged_weight(layer, lora):
    adapter, x, merged_forward = LAYERS[layer](torch.float32)
    if lora:  # our LoRA: lambda frozen
        adapter.E.requires_grad_(False)
    if x.is_floating_point():
        x.requires_grad_(True)
    params = [p for p in (adapter.P, adapter.E, adapter.Q) if p.requires_grad]
    inputs = params + ([x] if x.requires_grad else [])

    out = adapter(x)
    expected = merged_forward(x, adapter.weight + adapter.delta_weight())
    torch.testing.assert_close(out, expected)
    grads, expected_grads = _grads(out, inputs), _grads(expected, inputs)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    if layer == "embedding":  # the padding row's column of Q gets no gradient
        assert torch.equal(grads[-1][:, 3], torch.zeros(3))


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("frozen_lambda", [False, True])
def test_svd_mix_passes_gradcheck_in_float64(with_out, frozen_lambda):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    h, p, e = rand(2, 3, 4), rand(5, 4), rand(4, grad=not frozen_lambda)
    out = rand(2, 3, 5) if with_out else None
    torch.autograd.gradcheck(lambda h, p, e, o: svd_mix(h, p, e, 0.7, out=o), (h, p, e, out))


def test_svd_mix_is_the_composition_it_replaces_in_float32():
    h, p, e, out = torch.randn(6, 4), torch.randn(5, 4), torch.randn(4), torch.randn(6, 5)
    for t in (h, p, e, out):
        t.requires_grad_(True)
    fused = svd_mix(h, p, e, 0.7, out=out)
    composed = out + F.linear(h * (e * 0.7), p)  # what autograd differentiated before
    torch.testing.assert_close(fused, composed)
    for got, want in zip(_grads(fused, [h, p, e, out]), _grads(composed, [h, p, e, out]), strict=True):
        torch.testing.assert_close(got, want)


def test_column_dots_is_the_column_wise_dot_product():
    a, b = torch.randn(9, 4), torch.randn(9, 4)
    torch.testing.assert_close(column_dots(a, b), (a * b).sum(0))
    assert column_dots(a, b).shape == (4,) and column_dots(a, b).is_contiguous()


@pytest.mark.parametrize(
    ("dropout", "frozen"),
    [(0.0, "weight"), (0.0, "nothing"), (0.4, "weight"), (0.0, "weight and x")],
    ids=["fused", "trained-weight", "dropout", "fused-no-input-grad"],
)
def test_linear_paths_match_the_composition(dropout, frozen):
    # A frozen weight without dropout takes the fused base + adapter function (layers.mixing.linear_svd); a trained
    # weight or dropout the generic path. The bias trains in every case.
    base = nn.Linear(7, 5)
    base.weight.requires_grad_(frozen == "nothing")
    adapter = trained(SVDLinear.from_base(base, r=3, scale=2.0, dropout=dropout)).train()
    x = torch.randn(3, 7, requires_grad=frozen != "weight and x")
    params = [adapter.P, adapter.E, adapter.Q, adapter.bias]
    params += [x] if x.requires_grad else []
    params += [adapter.weight] if adapter.weight.requires_grad else []
    torch.manual_seed(5)
    out = adapter(x)
    torch.manual_seed(5)  # the same dropout mask
    h = F.linear(F.dropout(x, dropout, training=True), adapter.Q)
    expected = F.linear(x, adapter.weight, adapter.bias) + F.linear(h * (adapter.E * 2.0), adapter.P)
    torch.testing.assert_close(out, expected)
    for got, want in zip(_grads(out, params), _grads(expected, params), strict=True):
        torch.testing.assert_close(got, want)


def test_half_precision_base_adds_the_float32_update_cast_to_its_dtype():
    adapter = trained(SVDLinear.from_base(nn.Linear(8, 4).to(torch.bfloat16), r=2, scale=1.0))
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = adapter(x)
    update = F.linear(F.linear(x.float(), adapter.Q) * adapter.E, adapter.P)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, adapter.base_forward(x) + update.to(torch.bfloat16))
    out.float().sum().backward()
    assert adapter.E.grad is not None and adapter.E.grad.dtype == torch.float32


def test_autocast_runs_the_backward_in_the_forward_precision():
    adapter = trained(SVDLinear.from_base(nn.Linear(8, 4), r=2, scale=1.0))
    x = torch.randn(3, 8, requires_grad=True)
    params = [x, adapter.P, adapter.E, adapter.Q]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
        expected = adapter.base_forward(x) + F.linear(F.linear(x, adapter.Q) * adapter.E, adapter.P)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for got, want in zip(_grads(out, params), _grads(expected, params), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view and func is not torch.ops.aten.detach.default
        return func(*args, **(kwargs or {}))


class _RedefinedBase(SVDLinear):
    """A linear adapter on the generic path (base and update computed apart), as a quantized one computes."""

    def fusable(self, x: torch.Tensor) -> bool:
        return False


def _adapter_ops(cls: type[SVDLinear], frozen_lambda: bool) -> int:
    adapter = trained(cls.from_base(nn.Linear(7, 5).requires_grad_(False), r=3, scale=2.0))
    adapter.E.requires_grad_(not frozen_lambda)
    x = torch.randn(4, 7, requires_grad=True)
    upstream = torch.randn(4, 5)
    with _CountOps() as counter:
        adapter(x).backward(upstream)
    return counter.ops


@pytest.mark.parametrize(("cls", "lora_ops"), [(SVDLinear, 10), (_RedefinedBase, 11)], ids=["fused", "generic"])
def test_lambda_gradient_costs_one_operation(cls, lora_ops):
    # Generic path, forward (4): base addmm, x Q^T, P * lambda, the mixing addmm; backward (7): the products for h
    # and for P diag(lambda), P's scaling, x's and Q's products, the base's x gradient and the sum of x's two
    # gradients (autograd composing the same layer took 13). The fused linear function folds the last two into one
    # addmm. AdaLoRA adds one batched dot product for lambda (it took 3).
    assert _adapter_ops(cls, frozen_lambda=True) == lora_ops
    assert _adapter_ops(cls, frozen_lambda=False) == lora_ops + 1
