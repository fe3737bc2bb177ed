import pytest
import torch
from conftest import RecordAllocatedShapes
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora import disable_adapters
from adalora.layers import SVDConv1D, SVDLinear


def _trained(adapter):
    with torch.no_grad():
        adapter.E.normal_()
    return adapter


def test_linear_adapter_is_the_identity_at_init():
    base = nn.Linear(7, 5)
    x = torch.randn(3, 4, 7)
    expected = base(x)
    adapter = SVDLinear.from_base(base, r=3, scale=2.0)
    assert torch.equal(adapter(x), expected)
    assert adapter.weight is base.weight and adapter.bias is base.bias


def test_linear_adapter_matches_the_explicit_svd_update():
    base = nn.Linear(7, 5)
    adapter = _trained(SVDLinear.from_base(base, r=3, scale=2.0))
    x = torch.randn(2, 7)
    w = base.weight + 2.0 * adapter.P @ torch.diag(adapter.E) @ adapter.Q  # eq. 3 written out
    torch.testing.assert_close(adapter(x), x @ w.T + base.bias)
    torch.testing.assert_close(adapter.delta_weight(), w - base.weight)


def test_conv1d_adapter_uses_the_transposed_layout():
    base = Conv1D(5, 7)  # GPT-2: nf = d_out = 5, nx = d_in = 7, weight (7, 5)
    nn.init.normal_(base.weight)
    adapter = _trained(SVDConv1D.from_base(base, r=3, scale=0.5))
    assert (adapter.d_in, adapter.d_out) == (7, 5)
    x = torch.randn(2, 4, 7)
    w = base.weight + 0.5 * (adapter.P @ torch.diag(adapter.E) @ adapter.Q).T
    torch.testing.assert_close(adapter(x), x @ w + base.bias)
    with torch.no_grad():
        adapter.E.zero_()
    torch.testing.assert_close(adapter(x), base(x))


def test_forward_never_forms_the_full_update():
    d_out, d_in = 40, 30
    adapter = _trained(SVDLinear.from_base(nn.Linear(d_in, d_out).requires_grad_(False), r=4, scale=1.0))
    x = torch.randn(6, d_in)  # 6 rows so that no activation is accidentally (d_out, d_in)-shaped
    with RecordAllocatedShapes() as recorder:
        adapter(x).sum().backward()
    assert (d_out, d_in) not in recorder.shapes and (d_in, d_out) not in recorder.shapes


def test_masked_triplet_does_not_contribute():
    adapter = _trained(SVDLinear.from_base(nn.Linear(6, 4), r=3, scale=1.0))
    x = torch.randn(2, 6)
    with torch.no_grad():
        adapter.E[1] = 0.0
    manual = adapter.weight + adapter.P[:, [0, 2]] @ torch.diag(adapter.E[[0, 2]]) @ adapter.Q[[0, 2]]
    torch.testing.assert_close(adapter(x), x @ manual.T + adapter.bias)


def test_half_precision_base_gets_float32_adapters():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    adapter = _trained(SVDLinear.from_base(base, r=2, scale=1.0))
    assert adapter.P.dtype == torch.float32 and adapter.weight.dtype == torch.bfloat16
    out = adapter(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_disable_adapters_gives_the_base_output():
    base = nn.Linear(6, 4)
    model = nn.Sequential(SVDLinear.from_base(base, r=2, scale=1.0))
    _trained(model[0])
    x = torch.randn(2, 6)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base(x))
    assert not torch.allclose(model(x), base(x))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dropout_only_on_the_adapter_path(dropout):
    adapter = SVDLinear.from_base(nn.Linear(6, 4), r=2, scale=1.0, dropout=dropout).train()
    assert isinstance(adapter.dropout, nn.Dropout if dropout else nn.Identity)
    x = torch.randn(5, 6)
    torch.testing.assert_close(adapter(x), adapter.base_forward(x))  # lambda = 0: dropout cannot show
