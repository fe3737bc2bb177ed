"""SVD-form adapter layers: W = W0 + scale * P diag(lambda) Q (paper eq. 3).

Supported base layers: ``nn.Linear``, transformers' GPT-2 ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``
and ``nn.Embedding``. Whatever the layer, P is a 2-D ``(d_out, r)`` matrix and Q a 2-D ``(r, d_in)`` matrix, so
that importance scores, the regulariser, allocation, saving, merging and compaction treat every layer type alike;
only the forward and the layout of the merged update differ (see each class).

Each adapter owns the frozen base ``weight`` and ``bias`` itself (the very same ``Parameter`` objects
the replaced module held), so the base model's state-dict keys are unchanged and adapter keys
(``P``, ``E``, ``Q``, ``rank_mask``) are simply added.

Triplet i of an adapter is G_i = {P[:, i], E[i], Q[i, :]}. Masking a triplet zeroes E[i] only (the
reference behaviour); P and Q keep training, so a masked triplet can win back its place at a later
allocation. ``rank_mask`` records the latest allocation so that ``model.state_dict()`` carries it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

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
    layer_type: ClassVar[str] = ""  # name of the base layer type in adapter files (see io.py)

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        """(d_out, d_in) of the update matrix for base layer ``module`` (or an adapter of this class)."""
        d_out, d_in = module.weight.shape
        return d_out, d_in

    @classmethod
    def layer_type_for(cls, module: nn.Module) -> str:
        """The ``layer_type`` recorded in adapter files for ``module`` (a base layer or an adapter)."""
        return cls.layer_type

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be adapted although its type is supported (None if it can be)."""
        return None

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

    def layer_options(self) -> dict[str, Any]:
        """Settings of the base layer besides its weight shape, as JSON values (recorded in adapter files)."""
        return {}

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
        if not self.adapter_enabled or self.r == 0:  # rank 0 (compacted away): nothing to add
            return out
        return out + self.adapter_output(x)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scale={self.scale:g}"


class SVDLinear(SVDAdapter):
    """Adapter for ``torch.nn.Linear``: ``weight`` is ``(d_out, d_in)``."""

    layer_type = "linear"

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

    layer_type = "conv1d"  # transformers' GPT-2 Conv1D (a linear layer); torch's nn.Conv1d is "nn_conv1d"

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        d_in, d_out = module.weight.shape
        return d_out, d_in

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> SVDConv1D:
        d_out, d_in = cls.dims(module)
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


_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FNS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _overrides(module: nn.Module, base: type[nn.Module], *methods: str) -> list[str]:
    """The methods of ``base`` that ``module``'s class redefines (e.g. a scaled embedding's ``forward``)."""
    return [m for m in methods if getattr(type(module), m) is not getattr(base, m)]


class SVDConv(SVDAdapter):
    """Adapter for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: the triplets act as two convolutions.

    The base kernel has shape ``(out, in / groups, *kernel_size)``; the update is the matrix
    ``scale * P diag(lambda) Q`` with ``P: (out, r)`` and ``Q: (r, in / groups * prod(kernel_size))``, viewed in the
    kernel's layout. The forward never forms that kernel (the update is linear in the kernel, so convolving with
    Q's r small kernels first and mixing their r output channels with P afterwards gives the same result):

        h = conv(dropout(x), Q viewed as (r, in / groups, *kernel_size))    same stride, padding, dilation
        y = base(x) + conv_1x1(h, scale * P diag(lambda))                     (out, r, 1, ...) kernel

    With ``groups = g > 1`` the base kernel is block-diagonal over channel groups, and so is the update: Q's r
    kernels are applied to every input group (a grouped convolution producing g * r channels) and output group j
    mixes the r channels computed from input group j (a grouped 1 x 1 convolution with P). The merged kernel is
    the same ``(out, in / g, *kernel_size)`` tensor as the base's. Cost: g * r intermediate channels (for a
    depthwise convolution, r per input channel), so large ranks on grouped layers are expensive.

    ``padding_mode`` other than ``"zeros"`` is honoured the way ``nn.ConvNd`` does it (explicit padding, then an
    unpadded convolution), so the adapted layer equals the merged layer for every padding mode.

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode: as in the base
            layer (read by code that inspects conv layers).
    """

    def __init__(
        self,
        module: nn.Module,
        r: int,
        scale: float,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        out_channels, d_in = self.dims(module)
        super().__init__(module.weight, module.bias, out_channels, d_in, r, scale, dropout, init_std)
        self.in_channels: int = module.in_channels
        self.out_channels: int = out_channels
        self.kernel_size: tuple[int, ...] = tuple(module.weight.shape[2:])
        self.stride: tuple[int, ...] = tuple(module.stride)
        # "same"/"valid" stay strings, as nn.ConvNd keeps them.
        self.padding: tuple[int, ...] | str = (
            module.padding if isinstance(module.padding, str) else tuple(module.padding)
        )
        self.dilation: tuple[int, ...] = tuple(module.dilation)
        self.groups: int = module.groups
        self.padding_mode: str = module.padding_mode
        self._reversed_padding_repeated_twice: list[int] = list(module._reversed_padding_repeated_twice)

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        out_channels = module.weight.shape[0]
        return out_channels, module.weight[0].numel()  # in / groups * prod(kernel_size)

    @classmethod
    def layer_type_for(cls, module: nn.Module) -> str:
        return f"nn_conv{module.weight.dim() - 2}d"

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if isinstance(module, SVDAdapter):
            return None
        base = _CONV_TYPES[module.weight.dim() - 2]
        redefined = _overrides(module, base, "forward", "_conv_forward")
        if redefined:
            return (
                f"its class {type(module).__name__} redefines {', '.join(redefined)} of nn.{base.__name__}, so an "
                "adapter that computes a plain convolution would change what the layer does"
            )
        return None

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> SVDConv:
        return cls(module, r, scale, dropout, init_std)

    def layer_options(self) -> dict[str, Any]:
        return {
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    @property
    def _conv_fn(self) -> Callable[..., torch.Tensor]:
        return _CONV_FNS[len(self.kernel_size)]

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``kernel`` applied as the base layer applies its own (stride, padding and its mode, dilation, groups)."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv_fn(x, kernel, bias, self.stride, 0, self.dilation, self.groups)
        return self._conv_fn(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, self.bias)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """conv_1x1(conv(dropout(x), Q), scale * P diag(lambda)), never forming the ``(out, in/g, *k)`` kernel.

        Args:
            x: input of shape ``(N, in_channels, *spatial)`` or unbatched ``(in_channels, *spatial)``.

        Returns:
            Tensor shaped like the base layer's output, in ``x``'s dtype.
        """
        r, ones = self.r, (1,) * len(self.kernel_size)
        kernels = self.Q.view(r, self.in_channels // self.groups, *self.kernel_size)
        if self.groups > 1:
            kernels = kernels.repeat(self.groups, 1, *ones)  # the same r kernels for every channel group
        h = self._conv(self.dropout(x).to(self.Q.dtype), kernels, None)  # (N, groups * r, *out_spatial)
        mix = (self.P * (self.E * self.scale)).view(self.out_channels, r, *ones)  # scale folded into the r-vector
        return self._conv_fn(h, mix, None, 1, 0, 1, self.groups).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base kernel's layout ``(out, in / groups, *kernel_size)`` (for merging only)."""
        return super().delta_weight().view(self.weight.shape)

    def to_base(self, weight: torch.Tensor) -> nn.Module:
        """A plain ``nn.Conv{1,2,3}d`` with this layer's settings holding ``weight`` and this adapter's bias."""
        module = _CONV_TYPES[len(self.kernel_size)](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
        )
        module.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            module.bias = self.bias
        return module

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}{groups}, "
            f"r={self.r}, scale={self.scale:g}"
        )


class SVDEmbedding(SVDAdapter):
    """Adapter for ``nn.Embedding``: ``weight`` is ``(num_embeddings, embedding_dim)``.

    The update of the lookup table is ``(scale * P diag(lambda) Q)^T`` with ``P: (embedding_dim, r)`` and
    ``Q: (r, num_embeddings)`` (the same layout as PEFT's ``lora_embedding_B``/``lora_embedding_A``). Looking up
    token t reads column t of Q, so the forward gathers r numbers per token and mixes them with P:

        y = W0[t] + scale * (Q[:, t] * lambda) P^T

    The row at ``padding_idx`` stays fixed, as ``nn.Embedding`` promises (its update is zero and Q's column
    there receives no gradient from the loss). Dropout does not apply: the input is token ids (as in PEFT).
    ``max_norm`` is not supported (the renormalisation of whole rows cannot be split between the base and the
    update).

    Attributes:
        num_embeddings, embedding_dim, padding_idx, scale_grad_by_freq, sparse: as in the base layer.
    """

    layer_type = "embedding"
    max_norm = None  # refused at injection; read by code that inspects embedding layers

    def __init__(self, module: nn.Embedding, r: int, scale: float, init_std: float = 0.02) -> None:
        d_out, d_in = self.dims(module)
        super().__init__(module.weight, None, d_out, d_in, r, scale, 0.0, init_std)
        self.num_embeddings: int = d_in
        self.embedding_dim: int = d_out
        self.padding_idx: int | None = module.padding_idx
        self.norm_type: float = module.norm_type
        self.scale_grad_by_freq: bool = module.scale_grad_by_freq
        self.sparse: bool = module.sparse

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        num_embeddings, embedding_dim = module.weight.shape
        return embedding_dim, num_embeddings

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if isinstance(module, SVDAdapter):
            return None
        if module.max_norm is not None:
            return (
                f"max_norm={module.max_norm} renormalises whole rows of the table on lookup, which cannot be split "
                "between the frozen table and the update"
            )
        if _overrides(module, nn.Embedding, "forward"):
            return (
                f"its class {type(module).__name__} redefines forward (e.g. a scaled embedding), so an adapter that "
                "computes a plain lookup would change what the layer does"
            )
        return None

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> SVDEmbedding:
        return cls(module, r, scale, init_std)  # type: ignore[arg-type]

    def layer_options(self) -> dict[str, Any]:
        return {"padding_idx": self.padding_idx}

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """scale * (Q[:, x] * lambda) P^T: r gathered numbers per token, then a ``(d_out, r)`` product.

        Args:
            x: token ids of any shape ``(...)``.

        Returns:
            Tensor of shape ``(..., embedding_dim)`` in the base table's dtype.
        """
        h = F.embedding(x, self.Q.T)  # (..., r): column x of Q for every id
        if self.padding_idx is not None:
            h = h.masked_fill((x == self.padding_idx).unsqueeze(-1), 0.0)  # the padding row stays as it is
        h = h * (self.E * self.scale)
        return F.linear(h, self.P).to(self.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update in the table's layout ``(num_embeddings, embedding_dim)``; zero at ``padding_idx``."""
        delta = super().delta_weight().T
        if self.padding_idx is not None:
            delta = delta.clone()
            delta[self.padding_idx] = 0.0
        return delta

    def to_base(self, weight: torch.Tensor) -> nn.Embedding:
        """A plain ``nn.Embedding`` with this layer's settings holding ``weight``."""
        module = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
            device="meta",
        )
        module.weight = nn.Parameter(weight, requires_grad=False)
        return module

    def extra_repr(self) -> str:
        padding = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}, r={self.r}, scale={self.scale:g}"


def adapter_class_for(module: nn.Module) -> type[SVDAdapter] | None:
    """The adapter type that can replace ``module``, or None if its type is not supported.

    Some modules of a supported type still cannot be adapted (e.g. an embedding with ``max_norm``): check
    ``adapter_class.unsupported_reason(module)`` too.
    """
    if isinstance(module, SVDAdapter):
        return None
    if isinstance(module, nn.Linear):
        return SVDLinear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return SVDConv
    if isinstance(module, nn.Embedding):
        return SVDEmbedding
    conv1d = _conv1d_type()  # after the torch types: the transformers import is only paid for unknown modules
    if conv1d is not None and isinstance(module, conv1d):
        return SVDConv1D
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile``, ``DistributedDataParallel`` and ``DataParallel`` wrappers.

    Every function of the library that takes a model looks through these wrappers, so that module names (saved
    adapter keys, checkpoints, rank patterns) read the same whether or not the model was compiled or wrapped,
    instead of gaining an ``_orig_mod.`` or ``module.`` prefix that a plain model could not load. FSDP2 does not
    wrap, so it needs nothing here.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def find_adapters(model: nn.Module) -> list[tuple[str, SVDAdapter]]:
    """All adapters in ``model``, found by type, as (qualified module name, adapter) in module order.

    Names are relative to the model inside any ``torch.compile``/DDP wrapper (:func:`unwrap_model`).
    """
    return [(name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, SVDAdapter)]


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
