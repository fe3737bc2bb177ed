"""SVD-form adapter layers: W = W0 + scale * P diag(lambda) Q (paper eq. 3).

Each adapter owns the frozen base ``weight`` and ``bias`` itself (the very same ``Parameter`` objects
the replaced module held), so the base model's state-dict keys are unchanged and adapter keys
(``P``, ``E``, ``Q``, ``rank_mask``) are simply added.

Triplet i of an adapter is G_i = {P[:, i], E[i], Q[i, :]}. Masking a triplet zeroes E[i] only (the
reference behaviour); P and Q keep training, so a masked triplet can win back its place at a later
allocation. ``rank_mask`` records the latest allocation so that ``model.state_dict()`` carries it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class SVDAdapter(nn.Module):
    """Base class of every AdaLoRA adapter; subclasses define how the frozen base layer computes.

    Attributes:
        weight: the frozen base weight, in the layout of the module it replaced.
        bias: the frozen base bias or ``None``.
        P: left singular vectors, shape ``(d_out, r)``.
        E: singular values lambda, shape ``(r,)``; starts at zero so the adapted model equals the base.
        Q: right singular vectors, shape ``(r, d_in)``.
        rank_mask: bool buffer ``(r,)``, True for triplets kept by the latest allocation.
        scale: ``alpha / init_r``, fixed for the life of the adapter.
    """

    rank_mask: torch.Tensor

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        d_out: int,
        d_in: int,
        r: int,
        scale: float,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.d_out, self.d_in = d_out, d_in
        self.scale = float(scale)
        # Half-precision bases get float32 adapters: the adapter is what trains, and its updates and
        # importance scores are too small for fp16/bf16 resolution.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.P = nn.Parameter(torch.empty(d_out, r, **factory))
        self.E = nn.Parameter(torch.zeros(r, **factory))
        self.Q = nn.Parameter(torch.empty(r, d_in, **factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=weight.device))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        nn.init.normal_(self.P, std=init_std)
        nn.init.normal_(self.Q, std=init_std)

    # ------------------------------------------------------------------ shapes
    @property
    def r(self) -> int:
        """Current number of triplets (the initial rank until the adapter is compacted)."""
        return self.E.shape[0]

    def kept_rank(self) -> int:
        """Triplets kept by the latest allocation (reads the mask: a host sync on GPU)."""
        return int(self.rank_mask.sum())

    def adapter_parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """The trainable factors (P, E, Q)."""
        return self.P, self.E, self.Q

    # ------------------------------------------------------------------ compute
    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """scale * ((dropout(x) Q^T) * lambda) P^T without forming the (d_out, d_in) product.

        Args:
            x: input of shape ``(..., d_in)``.

        Returns:
            Tensor of shape ``(..., d_out)`` in ``x``'s dtype.
        """
        h = F.linear(self.dropout(x).to(self.Q.dtype), self.Q)  # (..., r)
        h = h * (self.E * self.scale)  # scale folded into the r-vector: cheaper than scaling (..., d_out)
        return F.linear(h, self.P).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * P diag(lambda) Q, shape ``(d_out, d_in)`` (for merging; never used in forward)."""
        return (self.P * (self.E * self.scale)) @ self.Q

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if not self.adapter_enabled:
            return out
        return out + self.adapter_output(x)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scale={self.scale:g}"


class SVDLinear(SVDAdapter):
    """Adapter for ``torch.nn.Linear``: ``weight`` is ``(d_out, d_in)``."""

    @classmethod
    def from_base(
        cls, module: nn.Linear, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> SVDLinear:
        d_out, d_in = module.weight.shape
        return cls(module.weight, module.bias, d_out, d_in, r, scale, dropout, init_std)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_base(self, weight: torch.Tensor) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight`` (base layout) and this adapter's bias."""
        module = nn.Linear(self.d_in, self.d_out, bias=self.bias is not None, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            module.bias = self.bias
        return module


def _conv1d_type() -> type[nn.Module] | None:
    """transformers' GPT-2 ``Conv1D`` (imported lazily so that plain PyTorch users never pay for it)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but stay usable without it
        return None
    return Conv1D


class SVDConv1D(SVDAdapter):
    """Adapter for transformers' GPT-2 ``Conv1D``, a linear layer with a transposed ``(d_in, d_out)`` weight."""

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> SVDConv1D:
        d_in, d_out = module.weight.shape
        return cls(module.weight, module.bias, d_out, d_in, r, scale, dropout, init_std)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, self.d_in), self.weight)
        return out.view(*x.shape[:-1], self.d_out)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layout ``(d_in, d_out)``."""
        return super().delta_weight().T

    def to_base(self, weight: torch.Tensor) -> nn.Module:
        conv1d = _conv1d_type()
        assert conv1d is not None
        module = conv1d(self.d_out, self.d_in)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.bias = self.bias
        return module


def adapter_class_for(module: nn.Module) -> type[SVDAdapter] | None:
    """The adapter type that can replace ``module``, or None if its type is not supported."""
    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and not isinstance(module, SVDAdapter)):
        return SVDLinear
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return SVDConv1D
    return None


def find_adapters(model: nn.Module) -> list[tuple[str, SVDAdapter]]:
    """All adapters in ``model``, found by type, as (qualified module name, adapter) in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVDAdapter)]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the base model: every adapter's contribution is switched off inside the block."""
    adapters = [m for _, m in find_adapters(model)]
    previous = [m.adapter_enabled for m in adapters]
    for m in adapters:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(adapters, previous, strict=True):
            m.adapter_enabled = state
