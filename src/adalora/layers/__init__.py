"""SVD-form adapter layers, W = W0 + scale * P diag(lambda) Q (paper eq. 3), one module per kind of base layer.

- :mod:`.base`: :class:`SVDAdapter` (what every adapter shares), how triplets start, kept factors, finding adapters
  in a model;
- :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`: one adapter class per kind of base layer;
- :mod:`.experts`: adapters on the fused 3-D expert weights of mixture-of-experts blocks, triplets per expert;
- :mod:`.quantized`: adapters for bitsandbytes and torchao quantized linear layers (QLoRA-style);
- :mod:`.registry`: the table of supported layer types (the one place a new layer type is added).
"""

from .base import (
    PAPER_START,
    TRIPLET_DIMS,
    KeptFactors,
    SVDAdapter,
    TripletInit,
    TripletStart,
    disable_adapters,
    find_adapters,
    kept_triplets,
    overrides,
    start_like_lora,
    take_triplets,
    unwrap_model,
)
from .conv import SVDConv
from .embedding import SVDEmbedding
from .experts import (
    SUPPORTED_EXPERTS,
    FusedWeight,
    SVDExperts,
    expert_weight_names,
    is_experts_block,
    matrix_names,
    matrix_ranks,
    release_blocks,
    set_expert_matmul,
)
from .linear import SVDConv1D, SVDLinear
from .quantized import (
    Quantization,
    QuantizedAdapter,
    SVDLinear4bit,
    SVDLinear8bitLt,
    SVDTorchAOLinear,
    is_quantized_precision,
    keep_differentiable_layout,
    logical_shape,
)
from .registry import (
    LAYER_TYPES,
    QUANTIZATIONS,
    LayerType,
    adapter_class_for,
    adapter_class_named,
    layer_type_of,
    precision_of,
    refusal,
    supported_layers,
    supported_quantized,
)

__all__ = [
    "LAYER_TYPES",
    "PAPER_START",
    "QUANTIZATIONS",
    "SUPPORTED_EXPERTS",
    "TRIPLET_DIMS",
    "FusedWeight",
    "KeptFactors",
    "LayerType",
    "Quantization",
    "QuantizedAdapter",
    "SVDAdapter",
    "SVDConv",
    "SVDConv1D",
    "SVDEmbedding",
    "SVDExperts",
    "SVDLinear",
    "SVDLinear4bit",
    "SVDLinear8bitLt",
    "SVDTorchAOLinear",
    "TripletInit",
    "TripletStart",
    "adapter_class_for",
    "adapter_class_named",
    "disable_adapters",
    "expert_weight_names",
    "find_adapters",
    "is_experts_block",
    "is_quantized_precision",
    "keep_differentiable_layout",
    "kept_triplets",
    "layer_type_of",
    "logical_shape",
    "matrix_names",
    "matrix_ranks",
    "overrides",
    "precision_of",
    "refusal",
    "release_blocks",
    "set_expert_matmul",
    "start_like_lora",
    "supported_layers",
    "supported_quantized",
    "take_triplets",
    "unwrap_model",
]
