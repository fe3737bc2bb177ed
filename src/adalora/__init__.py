"""adalora: AdaLoRA (Zhang et al., ICLR 2023) for any PyTorch model.

Data flow: ``inject(model, config)`` -> ``loss + allocator.regularization()`` -> ``backward`` ->
``optimizer.step()`` -> ``allocator.step()`` (importance -> budget -> masks).
"""

from .allocator import Allocation, RankAllocator, StepReport, top_b_mask
from .compact import compact, resize_adapters
from .config import AdaLoRAConfig
from .inject import inject, trainable_parameter_count
from .io import load_adapter, read_adapter_config, save_adapter
from .layers import SVDAdapter, SVDConv, SVDConv1D, SVDEmbedding, SVDLinear, disable_adapters, find_adapters
from .merge import merge, unload
from .peft_format import export_peft, import_peft
from .regularizer import orthogonal_penalty
from .schedule import BudgetDecision, budget_at, budget_curve
from .training import StepResult, fit, total_steps

__version__ = "0.1.0"

# The Trainer integration imports transformers; load it on first use so that `import adalora` stays light.
_LAZY = {"AdaLoRACallback": "integrations.trainer", "AdaLoRATrainer": "integrations.trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaLoRACallback",
    "AdaLoRAConfig",
    "AdaLoRATrainer",
    "Allocation",
    "BudgetDecision",
    "RankAllocator",
    "SVDAdapter",
    "SVDConv",
    "SVDConv1D",
    "SVDEmbedding",
    "SVDLinear",
    "StepReport",
    "StepResult",
    "__version__",
    "budget_at",
    "budget_curve",
    "compact",
    "disable_adapters",
    "export_peft",
    "find_adapters",
    "fit",
    "import_peft",
    "inject",
    "load_adapter",
    "merge",
    "orthogonal_penalty",
    "read_adapter_config",
    "resize_adapters",
    "save_adapter",
    "top_b_mask",
    "total_steps",
    "trainable_parameter_count",
    "unload",
]
