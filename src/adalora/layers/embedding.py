"""Adapter for ``nn.Embedding``: the update of the lookup table in SVD form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PAPER_START, KeptFactors, SVDAdapter, TripletStart, overrides


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

    def __init__(self, module: nn.Embedding, r: int, scale: float, start: TripletStart = PAPER_START) -> None:
        d_out, d_in = self.dims(module)
        super().__init__(module.weight, d_out, d_in, r, scale, 0.0, start)
        self.weight = module.weight
        self.bias = None
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
        if overrides(module, nn.Embedding, "forward"):
            return (
                f"its class {type(module).__name__} redefines forward (e.g. a scaled embedding), so an adapter that "
                "computes a plain lookup would change what the layer does"
            )
        return None

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ) -> SVDEmbedding:
        return cls(module, r, scale, start)  # type: ignore[arg-type]

    def layer_options(self) -> dict[str, Any]:
        return {"padding_idx": self.padding_idx}

    @classmethod
    def lora_tensors(
        cls, factors: KeptFactors, weight_shape: Sequence[int], options: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """PEFT's ``lora_embedding_A (k, num_embeddings)`` and ``lora_embedding_B (embedding_dim, k)`` (no ``.weight``).

        The column of ``padding_idx`` is written as zeros: our update leaves that row alone, PEFT's would not.
        """
        a = factors.lora_a()
        padding_idx = options.get("padding_idx")
        if padding_idx is not None:
            a[:, padding_idx] = 0.0
        return {"lora_embedding_A": a, "lora_embedding_B": factors.P.contiguous().clone()}

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Q's column for every token id (zero at ``padding_idx``): r gathered numbers per token.

        Args:
            x: token ids of any shape ``(...)``.

        Returns:
            Tensor of shape ``(..., r)``; the base class mixes it with ``scale * P diag(lambda)``.
        """
        h = F.embedding(x, self.Q.T)
        if self.padding_idx is not None:
            h = h.masked_fill((x == self.padding_idx).unsqueeze(-1), 0.0)  # the padding row stays as it is
        return h

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
