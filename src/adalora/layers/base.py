"""The SVD adapter every layer type shares: W = W0 + scale * P diag(lambda) Q (paper eq. 3).

Whatever the base layer, P is a ``(d_out, r)`` matrix and Q a ``(r, d_in)`` matrix per adapted matrix (the fused
expert weights of an MoE block stack one per expert: ``(E, d_out, r)``, see :mod:`.experts`), so that importance
scores, the regulariser, allocation, saving, merging and compaction treat every layer type alike; only the forward
and the layout of the merged update differ (see each subclass).

The frozen base stays where the model's state dict expects it: most adapters own the base ``weight`` and ``bias``
themselves (the very same ``Parameter`` objects the replaced module held), a quantized layer is held whole as
``base_layer`` (its weight carries quantization state that only the layer knows how to save; see
``layers.quantized``). Either way the base model's state-dict keys are unchanged and the adapter keys (``P``,
``E``, ``Q``, ``rank_mask``) are simply added.

Triplet i of an adapter is G_i = {P[:, i], E[i], Q[i, :]}. Masking a triplet zeroes E[i] only (the reference
behaviour); P and Q keep training, so a masked triplet can win back its place at a later allocation. How the
triplets start (:class:`TripletStart`: the paper's lambda = 0, or LoRA's P = 0) is decided here, once, for every
layer type.
``rank_mask`` records the latest allocation so that ``model.state_dict()`` carries it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .mixing import svd_mix

TripletInit = Literal["paper", "lora"]  # how the triplets start (TripletStart)

# (attribute, dimension that indexes triplets): P is (..., d_out, r), E is (..., r), Q is (..., r, d_in), where "..."
# is empty for one matrix and (experts,) for the fused expert weights of an MoE block (layers.experts).
TRIPLET_DIMS: tuple[tuple[str, int], ...] = (("P", -1), ("E", -1), ("Q", -2))


def take_triplets(tensor: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """The triplets ``keep`` of a factor (or of a tensor shaped like one): a copy, never a view.

    Args:
        tensor: P ``(..., d_out, r)``, lambda or ``rank_mask`` ``(..., r)`` or Q ``(..., r, d_in)``.
        dim: its triplet dimension (:data:`TRIPLET_DIMS`).
        keep: triplet indices ``(..., k)``, one row per matrix (the same leading dimensions as lambda).
    """
    if tensor.dim() > keep.dim():
        keep = keep.unsqueeze(-2) if dim == -1 else keep.unsqueeze(-1)
    return torch.take_along_dim(tensor, keep, dim=dim)


@dataclass(frozen=True)
class KeptFactors:
    """The kept triplets of one adapter: P ``(d_out, k)``, lambda ``(k,)``, Q ``(k, d_in)`` and the scale."""

    P: torch.Tensor
    E: torch.Tensor
    Q: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """k, the number of triplets of each matrix (for fused experts, the largest kept rank of any expert)."""
        return self.E.shape[-1]

    def lora_a(self) -> torch.Tensor:
        """``diag(lambda) Q``, shape ``(..., k, d_in)``: the singular values folded into the right factor."""
        return (self.E.unsqueeze(-1) * self.Q).contiguous()

    def to(self, device: torch.device | str) -> KeptFactors:
        return KeptFactors(self.P.to(device), self.E.to(device), self.Q.to(device), self.scale)


@dataclass(frozen=True)
class TripletStart:
    """How an adapter's triplets start (``AdaLoRAConfig.triplet_init`` and ``init_std``); the update
    ``Delta = scale * P diag(lambda) Q`` (paper eq. 3) is zero either way, so the adapted model computes what the
    base model did and the base weights are never touched.

    With ``G = dL/dy`` the gradient at the layer's output ``y`` ``(d_out,)`` and ``x`` its input ``(d_in,)`` (summed
    over the tokens of a batch), the gradients of eq. 3 are

        dL/dP = scale * G x^T Q^T diag(lambda)        (d_out, r)
        dL/dQ = scale * diag(lambda) P^T G x^T        (r, d_in)
        dL/dlambda_i = scale * P_i^T G x^T Q_i^T      (one number per triplet)

    - ``"paper"`` (the paper, the authors' code and PEFT): lambda = 0, P and Q ~ N(0, ``std``^2). At lambda = 0,
      dL/dP = dL/dQ = 0: until lambda moves, only its r numbers per matrix learn, and P and Q follow only as
      lambda grows (the orthogonality regulariser aside).
    - ``"lora"``: P = 0, lambda = 1, Q Kaiming-uniform with a = sqrt(5) (U(-1/sqrt(d_in), 1/sqrt(d_in)), LoRA's A;
      one draw per matrix, so each expert of a fused MoE weight starts like a separate layer). Then
      dL/dP = scale * G x^T Q^T is dense at step 0, so P learns as LoRA's B does, while the loss gives Q and
      lambda no gradient until P has moved (P = 0): they follow from the second step on (Q also gets the
      orthogonality regulariser's gradient from the first). The regulariser's gradient on P is zero at P = 0
      (dR/dP is proportional to P (P^T P - I)): P leaves 0 by the loss alone. ``std`` is unused.

    Masking a triplet zeroes its lambda whatever the start, so everything downstream (allocation, saving, merging,
    exports) is the same.

    Attributes:
        init: ``"paper"`` or ``"lora"``.
        std: the standard deviation of the paper's Gaussian P and Q.
    """

    init: TripletInit = "paper"
    std: float = 0.02

    def __post_init__(self) -> None:
        if self.init not in get_args(TripletInit):
            raise ValueError(f"unknown triplet start {self.init!r}; choose one of {', '.join(get_args(TripletInit))}")

    @torch.no_grad()
    def apply(self, P: torch.Tensor, E: torch.Tensor, Q: torch.Tensor) -> None:
        """Set P ``(..., d_out, r)``, lambda ``(..., r)`` and Q ``(..., r, d_in)`` in place, as the start says.

        The paper's P and Q are drawn whatever the start; the LoRA start then resets them (as
        :func:`adalora.baselines.as_lora` resets injected factors), which is how the runs of
        benchmarks/decoder_screen.py drew them: a seed gives the factors measured there.
        """
        nn.init.normal_(P, std=self.std)
        nn.init.normal_(Q, std=self.std)
        E.zero_()
        if self.init == "lora":
            start_like_lora(P, E, Q)


PAPER_START = TripletStart()


@torch.no_grad()
def start_like_lora(P: torch.Tensor, E: torch.Tensor, Q: torch.Tensor) -> None:
    """LoRA's start, in place: P (B) ``(..., d_out, r)`` = 0, lambda ``(..., r)`` = 1, and Q (A) ``(..., r, d_in)``
    Kaiming-uniform with a = sqrt(5) as in loralib and PEFT, drawn per matrix (``(r, d_in)`` fan-in ``d_in``, not
    that of a stacked 3-D tensor)."""
    P.zero_()
    for q in Q.view(-1, *Q.shape[-2:]):
        nn.init.kaiming_uniform_(q, a=math.sqrt(5))
    E.fill_(1.0)


def overrides(module: nn.Module, base: type[nn.Module], *methods: str) -> list[str]:
    """The methods of ``base`` that ``module``'s class redefines (e.g. a scaled embedding's ``forward``)."""
    return [m for m in methods if getattr(type(module), m) is not getattr(base, m)]


class SVDAdapter(nn.Module):
    """Base class of every AdaLoRA adapter; subclasses define how the frozen base layer computes.

    Attributes:
        weight: the frozen base weight, in the layout of the module it replaced.
        bias: the frozen base bias or ``None``.
        P: left singular vectors, shape ``(d_out, r)`` (``(E, d_out, r)`` with ``experts=E``).
        E: singular values lambda, shape ``(r,)`` (``(E, r)``); starts at 0, or at 1 with P = 0
            (:class:`TripletStart`), so that the adapted model equals the base.
        Q: right singular vectors, shape ``(r, d_in)`` (``(E, r, d_in)``).
        rank_mask: bool buffer shaped like lambda, True for triplets kept by the latest allocation.
        scale: ``alpha / init_r``, fixed for the life of the adapter.
    """

    rank_mask: torch.Tensor
    weight: torch.Tensor  # the frozen base weight in the replaced layer's layout (owned, or read from base_layer)
    bias: torch.Tensor | None
    layer_type: ClassVar[str] = ""  # the name recorded in adapter files; see layers.registry
    peft_fan_in_fan_out: ClassVar[bool] = False  # PEFT must transpose the merged update (GPT-2 Conv1D)

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        """(d_out, d_in) of the update matrix for base layer ``module`` (or an adapter of this class)."""
        d_out, d_in = module.weight.shape
        return d_out, d_in

    @classmethod
    def layer_type_name(cls, module: nn.Module) -> str:
        """The ``layer_type`` name recorded in adapter files for ``module`` (a base layer or an adapter)."""
        return cls.layer_type

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be adapted although its type is supported (None if it can be)."""
        return None

    @classmethod
    def lora_tensors(
        cls, factors: KeptFactors, weight_shape: Sequence[int], options: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The update as LoRA tensors in PEFT's layout for this layer type, keyed by PEFT's suffixes.

        ``lora_B @ lora_A = P diag(lambda) Q`` (the scale is left to the caller): ``lora_A = diag(lambda) Q``
        ``(k, d_in)`` and ``lora_B = P`` ``(d_out, k)`` for linear layers; subclasses reshape (convolutions) or
        rename (embeddings).

        Args:
            factors: the kept triplets (:meth:`kept_factors`), on the CPU.
            weight_shape: the base weight's shape.
            options: :meth:`layer_options` of the adapter.
        """
        return {"lora_A.weight": factors.lora_a(), "lora_B.weight": factors.P.contiguous().clone()}

    def __init__(
        self,
        like: torch.Tensor,
        d_out: int,
        d_in: int,
        r: int,
        scale: float,
        dropout: float = 0.0,
        start: TripletStart = PAPER_START,
        *,
        experts: int | None = None,
    ) -> None:
        """Create the factors; the subclass then holds its base (``weight``/``bias``, or ``base_layer``).

        Args:
            like: the base weight: the factors are made on its device, in float32 unless it is float32/float64
                (half-precision bases get float32 adapters: the adapter is what trains, and its updates and
                importance scores are too small for fp16/bf16 resolution).
            d_out, d_in: the update matrix's shape.
            r: the initial rank (number of triplets).
            scale: alpha / init_r.
            dropout: dropout probability on the adapter input.
            start: how P, lambda and Q start (:class:`TripletStart`: the paper's by default).
            experts: for the fused expert weights of an MoE block, E: one matrix (and set of triplets) per expert.
        """
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.scale = float(scale)
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": like.device, "dtype": dtype}
        lead = () if experts is None else (experts,)  # fused MoE experts: one matrix per expert (layers.experts)
        self.P = nn.Parameter(torch.empty(*lead, d_out, r, **factory))
        self.E = nn.Parameter(torch.zeros(*lead, r, **factory))
        self.Q = nn.Parameter(torch.empty(*lead, r, d_in, **factory))
        self.register_buffer("rank_mask", torch.ones(*lead, r, dtype=torch.bool, device=like.device))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        start.apply(self.P, self.E, self.Q)

    # ------------------------------------------------------------------ shapes
    @property
    def r(self) -> int:
        """Current number of triplets of each matrix (the initial rank until the adapter is compacted).

        Read from ``rank_mask``, a buffer that is always whole: DeepSpeed ZeRO-3 empties the parameters outside the
        forward pass (lambda's local shape is then ``(0,)``).
        """
        return self.rank_mask.shape[-1]

    @property
    def num_matrices(self) -> int:
        """Matrices the adapter holds triplets for: 1, or one per expert of a fused MoE weight."""
        return math.prod(self.rank_mask.shape[:-1])

    def layer_options(self) -> dict[str, Any]:
        """Settings of the base layer besides its weight shape, as JSON values (recorded in adapter files)."""
        return {}

    def base_shape(self) -> tuple[int, ...]:
        """The base weight's logical shape in the base layout (a quantized weight's storage may be packed; a
        weight partitioned by DeepSpeed ZeRO-3 keeps its shape in ``ds_shape``)."""
        return tuple(getattr(self.weight, "ds_shape", self.weight.shape))

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a plain tensor in the base layout (quantized bases dequantize; for merging)."""
        return self.weight

    def to_base(self, weight: torch.Tensor) -> nn.Module:
        """A plain base layer of this adapter's kind and settings holding ``weight`` (base layout) and the bias:
        what :func:`adalora.merge` puts back (with the merged weight) and :meth:`unloaded` returns."""
        raise NotImplementedError(f"{type(self).__name__} must define to_base")

    def unloaded(self) -> nn.Module:
        """The base layer as it was before :func:`adalora.inject`, holding the original ``weight``/``bias``."""
        base = self.to_base(self.weight)
        base.weight = self.weight  # the original Parameter object, not a new one sharing its storage
        return base

    def kept_rank(self) -> int:
        """Triplets kept by the latest allocation (reads the mask: a host sync on GPU)."""
        return int(self.rank_mask.sum())

    def kept_factors(self, keep: torch.Tensor | None = None) -> KeptFactors:
        """Copies of P, lambda and Q cut to the triplets ``keep`` (default: those ``rank_mask`` keeps).

        What saving, exporting and compacting an adapter start from. The selection copies, so the result never
        shares storage with the parameters.

        Args:
            keep: triplet indices ``(..., k)`` as :func:`kept_triplets` gives them (it reads every adapter's mask with
                one host sync). Rows padded with masked triplets (fused experts of unequal ranks) get lambda = 0.
        """
        if keep is None:
            keep = kept_triplets([self])[0]
        keep = keep.to(self.E.device)
        with torch.no_grad():
            p, e, q = (take_triplets(getattr(self, attr).detach(), dim, keep) for attr, dim in TRIPLET_DIMS)
            if e.dim() > 1:  # padding: the masked triplets that fill an expert's row up to the largest kept rank
                e *= take_triplets(self.rank_mask, -1, keep)
        return KeptFactors(p, e, q, self.scale)

    def adapter_parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """The trainable factors (P, E, Q)."""
        return self.P, self.E, self.Q

    # ------------------------------------------------------------------ compute
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The triplets' inputs ``h = dropout(x) Q^T``, in the adapter's dtype (subclasses: how Q reads ``x``).

        Args:
            x: input of shape ``(..., d_in)``.

        Returns:
            Tensor of shape ``(..., r)``.
        """
        return F.linear(self.dropout(x).to(self.Q.dtype), self.Q)

    def delta_weight(self) -> torch.Tensor:
        """scale * P diag(lambda) Q, shape ``(d_out, d_in)`` (for merging; never used in forward)."""
        return (self.P * (self.E * self.scale)) @ self.Q

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base layer's output for ``x``."""
        raise NotImplementedError(f"{type(self).__name__} must define base_forward")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled or self.r == 0:  # rank 0 (compacted away): nothing to add
            return self.base_forward(x)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the update, the update mixed into the base output by one product (:func:`svd_mix`).

        Subclasses whose triplets do not act on the last dimension (convolutions) add their own update instead;
        linear layers compute base and update together when they can (``layers.linear``).
        """
        out = self.base_forward(x)
        h = self.project(x)
        if h.dtype != out.dtype:  # a half-precision base: the float32 update is cast, then added
            return out + svd_mix(h, self.P, self.E, self.scale).to(out.dtype)
        return svd_mix(h, self.P, self.E, self.scale, out=out)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scale={self.scale:g}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile``, ``DistributedDataParallel``, ``DataParallel`` and DeepSpeed
    engine wrappers.

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
        elif type(model).__module__.startswith("deepspeed.") and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # a DeepSpeedEngine, recognised without importing deepspeed
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


def kept_triplets(adapters: Sequence[SVDAdapter]) -> list[torch.Tensor]:
    """Indices of the triplets each adapter's ``rank_mask`` keeps, read with one host sync for all.

    One matrix: the kept triplets in ascending order, ``(k,)``. Fused experts, whose tensors hold every expert at one
    rank: ``(experts, k)`` with k the largest kept rank of any expert; each row lists that expert's kept triplets in
    ascending order, then as many of its masked ones as fill the row (:meth:`SVDAdapter.kept_factors` zeroes their
    lambda; their ``rank_mask`` stays False).
    """
    masks = [a.rank_mask for a in adapters]
    if not masks:
        return []
    kept = torch.cat([m.reshape(-1) for m in masks]).cpu().split([m.numel() for m in masks])
    out = []
    for mask, flat in zip(masks, kept, strict=True):
        mask = flat.view(mask.shape)
        k = int(mask.sum(-1).max()) if mask.numel() else 0
        # A stable sort of "masked" puts the kept triplets first, each group in ascending order.
        out.append(torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :k])
    return out
