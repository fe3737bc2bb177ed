"""Adapters on the fused expert weights of mixture-of-experts blocks: AdaLoRA triplets for every expert.

transformers 5 keeps the experts of an MoE layer as 3-D parameters of one module, not as ``nn.Linear`` modules:
Qwen3-MoE's ``mlp.experts`` holds ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``; gpt-oss stores them
transposed, ``(E, in, out)``, with biases. :class:`SVDExperts` adapts one such parameter; expert e's matrix gets its
own triplets (paper eq. 3, once per expert):

    W_e = W0_e + scale * P_e diag(lambda_e) Q_e        P: (E, d_out, r),  lambda: (E, r),  Q: (E, r, d_in)

with ``rank_mask`` ``(E, r)``. Every (expert, triplet) is one more triplet for the allocator: the budget moves between
experts as well as between layers, and an expert that matters for the task keeps more rank.

**Computing.** Once one of its weights is adapted, the block computes with :func:`experts_forward` instead of its own
forward (and instead of whichever ``experts_implementation``, eager, ``grouped_mm`` or ``batched_mm``, the model was
loaded with; merging or unloading the last adapter of a block gives it back). Tokens are dispatched as
transformers' grouped implementation does: the (token, expert) pairs sorted by expert, each expert's rows computed
as one block, the routing weights applied, the pairs summed back per token. Each expert's update is
``scale * ((x Q_e^T) * lambda_e) P_e^T`` on its rows: no ``(d_out, d_in)`` product is ever formed.

The per-expert products run either as a loop over the experts that received rows (``"loop"``: one host sync per
block to read the row counts) or as grouped matrix products (``"grouped"``: ``torch.nn.functional.grouped_mm``, no
sync; used where its shape, alignment and dtype rules allow, else the loop). See :func:`set_expert_matmul` and
``benchmarks/moe_step.py``.

**Supported blocks** (:data:`SUPPORTED_EXPERTS`): the experts classes whose computation :func:`experts_forward`
reproduces, each checked against the class's own forward in tests/layers/test_experts.py; they are all declared with
transformers' ``use_experts_implementation``, whose flags (``has_gate``, ``has_bias``, ``is_transposed``,
``has_post_expert_norm``, the class's ``_apply_gate``) say how they compute. Others are refused by name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PAPER_START, KeptFactors, SVDAdapter, TripletStart, find_adapters

# The fused-experts classes of transformers 5 that experts_forward reproduces (tests/layers/test_experts.py), by class
# name (transformers is imported lazily), with the model families they serve.
SUPPORTED_EXPERTS: dict[str, str] = {
    "Qwen3MoeExperts": "Qwen3-MoE",
    "Qwen2MoeExperts": "Qwen2-MoE",
    "MixtralExperts": "Mixtral",
    "OlmoeExperts": "OLMoE",
    "GptOssExperts": "gpt-oss",
    "DeepseekV2Experts": "DeepSeek-V2",
    "DeepseekV3Experts": "DeepSeek-V3",
    "Glm4MoeExperts": "GLM-4-MoE",
}

MATMULS = ("loop", "grouped")


def supported_experts() -> str:
    """The supported fused-experts classes in words, for error messages."""
    return ", ".join(f"{name} ({family})" for name, family in SUPPORTED_EXPERTS.items())


def is_experts_block(module: nn.Module) -> bool:
    """Whether ``module`` is a fused-experts block of a supported class (its weights can be adapted)."""
    return type(module).__name__ in SUPPORTED_EXPERTS and hasattr(module, "has_gate")


def expert_weight_names(block: nn.Module) -> tuple[str, ...]:
    """The names of the fused expert weight matrices of a supported block, in the block's parameter order."""
    return ("gate_up_proj" if block.has_gate else "up_proj", "down_proj")


@dataclass(frozen=True)
class FusedWeight:
    """One fused expert weight as a target: what the layer table matches and :meth:`SVDExperts.from_base` adapts.

    Attributes:
        block: the module holding the parameter (the experts block).
        name: the parameter's name in ``block`` (``"gate_up_proj"``, ``"down_proj"``, ...).
    """

    block: nn.Module
    name: str

    @property
    def weight(self) -> torch.Tensor:
        """The parameter itself: ``(E, d_out, d_in)``, or ``(E, d_in, d_out)`` for a transposed block."""
        return getattr(self.block, self.name)

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.block, "is_transposed", False))

    @property
    def order(self) -> int:
        """Position of the weight among the block's expert weights, which is their order among its parameters
        (PEFT nests its wrappers in that order; checked for every supported block in tests/layers/test_experts.py)."""
        return expert_weight_names(self.block).index(self.name)


# ---------------------------------------------------------------------- dispatch
class Routing:
    """The (token, expert) pairs of one block's forward, sorted by expert.

    Args:
        top_k_index: the router's choice, ``(T, K)`` expert indices.
        num_experts: E.

    Attributes:
        order: ``(S,)``, S = T * K: the position in the flattened ``(T, K)`` routing of each sorted pair.
        token: ``(S,)`` the token of each sorted pair.
        experts: ``(S,)`` the expert of each sorted pair, ascending.
        offsets: ``(E,)`` int32, where each expert's rows end (``grouped_mm``'s ``offs``).
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k_index.shape[-1]
        self.experts, self.order = torch.sort(top_k_index.reshape(-1), stable=True)
        self.token = self.order // self.top_k
        self.counts = torch.bincount(self.experts, minlength=num_experts)
        self.offsets = self.counts.cumsum(0).to(torch.int32)

    @functools.cached_property
    def segments(self) -> list[tuple[int, int, int]]:
        """``(expert, first row, end row)`` of every expert that received rows (one host sync, made once)."""
        bounds, start = [], 0
        for expert, count in enumerate(self.counts.tolist()):
            if count:
                bounds.append((expert, start, start + count))
                start += count
        return bounds


def _groupable(*tensors: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` takes these operands: same dtype (float32/bf16/fp16), 16-byte aligned rows."""
    if not hasattr(F, "grouped_mm") or len({t.dtype for t in tensors}) > 1:
        return False
    if tensors[0].dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = tensors[0].element_size()
    # Each matrix needs one unit stride and the other (its leading dimension) a multiple of 16 bytes.
    return all(
        t.data_ptr() % 16 == 0 and 1 in t.stride()[-2:] and all(s * size % 16 == 0 or s == 1 for s in t.stride()[-2:])
        for t in tensors
    )


def expert_mm(a: torch.Tensor, b: torch.Tensor, routing: Routing, matmul: str) -> torch.Tensor:
    """Each expert's rows times that expert's matrix: ``out[rows_e] = a[rows_e] @ b[e]``.

    Args:
        a: ``(S, m)``, rows sorted by expert.
        b: ``(E, m, n)``.

    Returns:
        ``(S, n)``.
    """
    if matmul == "grouped" and _groupable(a, b):
        return F.grouped_mm(a, b, offs=routing.offsets)
    out = a.new_empty(a.shape[0], b.shape[-1])  # every row belongs to one expert: all of it is written
    for expert, lo, hi in routing.segments:
        torch.mm(a[lo:hi], b[expert], out=out[lo:hi])
    return out


def expert_outer(a: torch.Tensor, b: torch.Tensor, routing: Routing, matmul: str) -> torch.Tensor:
    """Per expert ``a[rows_e]^T @ b[rows_e]`` (a weight gradient), zero for an expert without rows.

    Args:
        a: ``(S, m)``, rows sorted by expert.
        b: ``(S, n)``.

    Returns:
        ``(E, m, n)``.
    """
    if matmul == "grouped" and _groupable(a.mT, b):
        return F.grouped_mm(a.mT, b, offs=routing.offsets)
    out = a.new_zeros(routing.num_experts, a.shape[1], b.shape[1])
    for expert, lo, hi in routing.segments:
        torch.mm(a[lo:hi].mT, b[lo:hi], out=out[expert])
    return out


class _ExpertSVD(torch.autograd.Function):
    """``y_rows_e = x W_e^T + scale * ((xd Q_e^T) * lambda_e) P_e^T`` for every expert's rows, gradients written out.

    ``xd`` is the adapter's input (``x`` after dropout; ``x`` itself without). With ``P`` None only the base product
    is computed (a block weight that is not adapted, or an adapter switched off). The base weight's gradient is
    computed only if it requires one (it is frozen after ``inject``).

    Backward, with G the output's gradient, PL = P diag(lambda) and h = xd Q^T (all per expert, on its rows)::

        dPL = scale G^T h        dP = dPL diag(lambda)        dlambda = sum_j dPL[j, :] * P[j, :]
        dh  = scale G PL         dQ = dh^T xd                 dx = G W + dh Q
    """

    @staticmethod
    def forward(ctx: Any, x, xd, W, Q, P, E, scale, transposed, routing, matmul):  # type: ignore[no-untyped-def]
        right = W if transposed else W.mT  # (E, d_in, d_out): the base product is x @ right[e]
        out = expert_mm(x.to(W.dtype), right, routing, matmul)
        h = pl = None
        if P is not None:
            h = expert_mm(xd.to(Q.dtype), Q.mT, routing, matmul)  # (S, r)
            pl = P * E.unsqueeze(-2)  # (E, d_out, r)
            out += expert_mm(h, pl.mT, routing, matmul).mul_(scale).to(out.dtype)
        ctx.save_for_backward(x, xd, W, Q, P, E, pl, h)
        ctx.scale, ctx.transposed, ctx.routing, ctx.matmul = scale, transposed, routing, matmul
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xd, W, Q, P, E, pl, h = ctx.saved_tensors
        routing, matmul, scale = ctx.routing, ctx.matmul, ctx.scale
        need_x, need_xd, need_w, need_q, need_p, need_e = ctx.needs_input_grad[:6]
        right = W if ctx.transposed else W.mT
        grad_x = expert_mm(grad.to(W.dtype), right.mT, routing, matmul).to(x.dtype) if need_x else None
        grad_w = None
        if need_w:  # (E, d_out, d_in), or transposed like the weight
            pair = (x, grad) if ctx.transposed else (grad, x)
            grad_w = expert_outer(*(t.to(W.dtype) for t in pair), routing, matmul)
        grad_xd = grad_q = grad_p = grad_e = None
        if P is not None:
            g = grad.to(P.dtype)
            grad_h = expert_mm(g, pl, routing, matmul).mul_(scale)  # (S, r)
            grad_q = expert_outer(grad_h, xd.to(Q.dtype), routing, matmul) if need_q else None
            grad_xd = expert_mm(grad_h, Q, routing, matmul).to(xd.dtype) if need_xd else None
            if need_p or need_e:
                grad_pl = expert_outer(g, h, routing, matmul).mul_(scale)  # (E, d_out, r)
                grad_p = grad_pl * E.unsqueeze(-2) if need_p else None
                grad_e = (grad_pl * P).sum(-2) if need_e else None
        return grad_x, grad_xd, grad_w, grad_q, grad_p, grad_e, None, None, None, None


# ---------------------------------------------------------------------- the adapter
class SVDExperts(SVDAdapter):
    """Adapter for one fused expert weight of an MoE block: one set of triplets per expert (see the module).

    Attributes:
        weight: the frozen fused weight ``(E, d_out, d_in)`` (``(E, d_in, d_out)`` for a transposed block).
        P, E, Q, rank_mask: ``(E, d_out, r)``, ``(E, r)``, ``(E, r, d_in)``, ``(E, r)``.
        transposed: whether the block stores its weights as ``(E, in, out)``.
        matmul: ``"loop"`` or ``"grouped"``: how the per-expert products run (:func:`set_expert_matmul`).
    """

    layer_type = "experts"
    matmul: str = "loop"
    transposed: bool
    order: int

    @classmethod
    def dims(cls, module: Any) -> tuple[int, int]:
        """(d_out, d_in) of each expert's matrix, for a :class:`FusedWeight` or an adapter."""
        _, first, second = module.weight.shape
        return (second, first) if module.transposed else (first, second)

    @classmethod
    def unsupported_reason(cls, module: Any) -> str | None:
        """Refuses parameters of modules that are not supported experts blocks, and blocks split over processes."""
        block = module.block
        kind = f"{type(block).__module__}.{type(block).__qualname__}"
        if not is_experts_block(block):
            return (
                f"{kind} is not a fused-experts block adalora knows, so it cannot compute its experts with an "
                f"adapter; supported blocks: {supported_experts()}. Adapt nn.Linear modules with target_modules"
            )
        if module.name not in expert_weight_names(block):
            return f"it is not an expert weight matrix of {kind} (those are {', '.join(expert_weight_names(block))})"
        if getattr(block, "_is_expert_parallel", False):
            return "the block's experts are split over processes (expert parallelism), which adalora does not support"
        return None

    def __init__(
        self, fused: FusedWeight, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ):
        d_out, d_in = self.dims(fused)
        weight = fused.weight
        super().__init__(weight, d_out, d_in, r, scale, dropout, start, experts=weight.shape[0])
        self.weight = weight
        self.bias = None  # a block's biases stay the block's: experts_forward adds them
        self.transposed, self.order = fused.transposed, fused.order

    @classmethod
    def from_base(
        cls, module: FusedWeight, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ) -> SVDExperts:
        """The adapter of one fused expert weight; its block computes with :func:`experts_forward` from now on."""
        adapter = cls(module, r, scale, dropout, start)
        _take_over(module.block)
        return adapter

    @classmethod
    def lora_tensors(
        cls, factors: KeptFactors, weight_shape: Sequence[int], options: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """PEFT's LoRA ``ParamWrapper`` layout of a 3-D parameter (``target_parameters``).

        PEFT reads ``lora_A.weight`` ``(E k, d_in)`` as ``(E, k, d_in)`` (expert-major) and ``lora_B.weight``
        ``(d_out, k E)`` as ``(d_out, k, E)`` (expert-minor), and adds ``lora_B_e @ lora_A_e`` to expert e in the
        block's layout, transposed or not.
        """
        a = factors.lora_a()  # (E, k, d_in)
        b = factors.P.permute(1, 2, 0)  # (d_out, k, E)
        return {
            "lora_A.weight": a.reshape(-1, a.shape[-1]).contiguous(),
            "lora_B.weight": b.reshape(b.shape[0], -1).contiguous(),  # a view when k == 1: safetensors wants a copy
        }

    def layer_options(self) -> dict[str, Any]:
        return {"num_experts": self.num_matrices, "transposed": self.transposed, "order": self.order}

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:  # type: ignore[override]
        """The block's product for this weight, update included, on rows sorted by expert.

        Args:
            x: ``(S, d_in)``, rows sorted by expert (``routing``).

        Returns:
            ``(S, d_out)`` in the base weight's dtype.
        """
        if not self.adapter_enabled or self.r == 0:
            return base_expert_product(x, self.weight, self.transposed, routing, self.matmul)
        xd = self.dropout(x)
        return _ExpertSVD.apply(
            x, xd, self.weight, self.Q, self.P, self.E, self.scale, self.transposed, routing, self.matmul
        )

    def delta_weight(self) -> torch.Tensor:
        """scale * P_e diag(lambda_e) Q_e for every expert, in the base layout (for merging; never in forward)."""
        delta = (self.P * (self.E * self.scale).unsqueeze(-2)) @ self.Q  # (E, d_out, d_in)
        return delta.mT if self.transposed else delta

    def to_base(self, weight: torch.Tensor) -> nn.Parameter:
        """The fused weight as the block's plain parameter again (frozen)."""
        return nn.Parameter(weight, requires_grad=False)

    def unloaded(self) -> nn.Parameter:  # type: ignore[override]
        return self.weight

    def extra_repr(self) -> str:
        return f"experts={self.num_matrices}, d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scale={self.scale:g}"


def base_expert_product(
    x: torch.Tensor, weight: torch.Tensor, transposed: bool, routing: Routing, matmul: str
) -> torch.Tensor:
    """``x @ W_e^T`` on every expert's rows, for a weight without an active adapter: ``(S, d_in)`` -> ``(S, d_out)``."""
    return _ExpertSVD.apply(x, x, weight, None, None, None, 0.0, transposed, routing, matmul)


# ---------------------------------------------------------------------- the block
def experts_forward(
    block: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """What an adapted experts block computes: its experts on the routed tokens, adapters included.

    The computation of transformers' grouped implementation, read from the block's declared flags: the first
    projection (``gate_up_proj``, or ``up_proj`` without a gate) plus its bias, the block's gate (or activation), the
    down projection plus its bias, the optional post-expert norm, the routing weight; then each token's K results
    summed.

    Args:
        hidden_states: ``(T, H)``.
        top_k_index: ``(T, K)`` chosen experts.
        top_k_weights: ``(T, K)`` their routing weights.

    Returns:
        ``(T, H)`` in ``hidden_states``' dtype.
    """
    routing = Routing(top_k_index, block.num_experts)
    matmul = next((a.matmul for a in block.children() if isinstance(a, SVDExperts)), "loop")
    first, second = expert_weight_names(block)
    out = _project(block, first, hidden_states[routing.token], routing, matmul)
    out = block._apply_gate(out) if block.has_gate else block.act_fn(out)
    out = _project(block, second, out, routing, matmul)
    if block.has_post_expert_norm:
        out = block.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[routing.order].unsqueeze(-1)
    unsorted = out.new_zeros(out.shape).index_copy(0, routing.order, out)  # back to (token, k) order
    tokens, hidden = hidden_states.shape[0], out.shape[-1]
    return unsorted.view(tokens, routing.top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def _project(block: nn.Module, name: str, x: torch.Tensor, routing: Routing, matmul: str) -> torch.Tensor:
    """One of the block's products on the sorted rows: through its adapter if it has one, plus the block's bias."""
    target = getattr(block, name)
    if isinstance(target, SVDExperts):
        out = target(x, routing)
    else:
        out = base_expert_product(x, target, bool(getattr(block, "is_transposed", False)), routing, matmul)
    if getattr(block, "has_bias", False):
        out = out + getattr(block, f"{name}_bias")[routing.experts]
    return out


def _take_over(block: nn.Module) -> None:
    """Make ``block`` compute with :func:`experts_forward` (an instance attribute over its class's forward; a
    ``partial``, which copies and pickles with the block, unlike a bound method of a function it does not own)."""
    block.forward = functools.partial(experts_forward, block)


def release_blocks(model: nn.Module) -> None:
    """Give every experts block without adapters left its own forward back (after a merge or unload)."""
    for module in model.modules():
        adapted = any(isinstance(child, SVDExperts) for child in module.children())
        if not adapted and getattr(module.__dict__.get("forward"), "func", None) is experts_forward:
            del module.forward


def set_expert_matmul(model: nn.Module, matmul: str) -> None:
    """How every expert adapter of ``model`` runs its per-expert products: ``"loop"`` (default) or ``"grouped"``.

    ``"loop"`` runs one product per expert that received tokens (one host sync per block to read the counts);
    ``"grouped"`` runs ``torch.nn.functional.grouped_mm`` over all experts at once where its rules allow (float32 or
    half precision, 16-byte aligned rows; else the loop). benchmarks/moe_step.py measures both.

    Raises:
        ValueError: for another value.
    """
    if matmul not in MATMULS:
        raise ValueError(f"set_expert_matmul: unknown matmul {matmul!r}; choose one of {', '.join(MATMULS)}")
    for _, adapter in find_adapters(model):
        if isinstance(adapter, SVDExperts):
            adapter.matmul = matmul


# ---------------------------------------------------------------------- ranks per matrix
def matrix_names(name: str, adapter: SVDAdapter) -> list[str]:
    """The names of the matrices an adapter holds triplets for: ``name``, or ``name[e]`` for each expert e."""
    if isinstance(adapter, SVDExperts):
        return [f"{name}[{expert}]" for expert in range(adapter.num_matrices)]
    return [name]


def matrix_ranks(named: Sequence[tuple[str, SVDAdapter]]) -> dict[str, int]:
    """``{matrix name: kept rank}`` of every matrix (each expert of a fused weight apart), read with one host sync."""
    counts = torch.cat([a.rank_mask.sum(-1).reshape(-1) for _, a in named]).tolist() if named else []
    names = [m for name, adapter in named for m in matrix_names(name, adapter)]
    return dict(zip(names, (int(c) for c in counts), strict=True))
