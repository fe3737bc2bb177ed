"""adalora: AdaLoRA (Zhang et al., ICLR 2023) for any PyTorch model.

Data flow: ``inject(model, config)`` -> ``loss + allocator.regularization()`` -> ``backward`` ->
``optimizer.step()`` -> ``allocator.step()`` (importance -> budget -> masks) -> ``save_adapter`` / ``merge`` /
``export_peft``.

The top level holds that workflow. Everything else is importable from its module: the algorithm sits flat in
this package (``config``, ``layers``, ``inject``, ``schedule``, ``importance``, ``regularizer``, ``allocator``,
``compact``, ``merge``, ``baselines``), the plumbing in sub-packages (``files``, ``parallel``,
``integrations``, ``run``).
"""

from __future__ import annotations

import importlib

from .allocator import RankAllocator
from .compact import compact
from .config import AdaLoRAConfig
from .files.adapter import load_adapter, save_adapter
from .files.peft import export_peft, import_peft
from .inject import inject
from .integrations.loop import count_optimizer_steps, fit
from .layers import SVDAdapter, disable_adapters, find_adapters
from .merge import merge, unload
from .version import __version__

# The Trainer integration imports transformers; load it on first use so that `import adalora` stays light.
_LAZY = {"AdaLoRACallback": "integrations.trainer", "AdaLoRATrainer": "integrations.trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaLoRACallback",
    "AdaLoRAConfig",
    "AdaLoRATrainer",
    "RankAllocator",
    "SVDAdapter",
    "__version__",
    "compact",
    "count_optimizer_steps",
    "disable_adapters",
    "export_peft",
    "find_adapters",
    "fit",
    "import_peft",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "unload",
]
