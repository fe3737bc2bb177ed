"""SVD-form adapter layers, W = W0 + scale * P diag(lambda) Q (paper eq. 3), one module per kind of base layer.

- :mod:`.base`: :class:`SVDAdapter` (what every adapter shares), kept factors, finding adapters in a model;
- :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`: one adapter class per kind of base layer;
- :mod:`.quantized`: adapters for bitsandbytes and torchao quantized linear layers (QLoRA-style);
- :mod:`.registry`: the table of supported layer types (the one place a new layer type is added).
"""

from .base import (
    TRIPLET_DIMS,
    KeptFactors,
    SVDAdapter,
    disable_adapters,
    find_adapters,
    kept_triplets,
    overrides,
    unwrap_model,
)
from .conv import SVDConv
from .embedding import SVDEmbedding
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
    "QUANTIZATIONS",
    "TRIPLET_DIMS",
    "KeptFactors",
    "LayerType",
    "Quantization",
    "QuantizedAdapter",
    "SVDAdapter",
    "SVDConv",
    "SVDConv1D",
    "SVDEmbedding",
    "SVDLinear",
    "SVDLinear4bit",
    "SVDLinear8bitLt",
    "SVDTorchAOLinear",
    "adapter_class_for",
    "adapter_class_named",
    "disable_adapters",
    "find_adapters",
    "is_quantized_precision",
    "keep_differentiable_layout",
    "kept_triplets",
    "layer_type_of",
    "logical_shape",
    "overrides",
    "precision_of",
    "refusal",
    "supported_layers",
    "supported_quantized",
    "unwrap_model",
]
