"""Module paths of earlier versions (``adalora.io``, ``adalora.distributed``, ...) that still import, with a warning.

The package was reorganised into the algorithm at the top and the plumbing in ``files/``, ``parallel/``,
``integrations/`` and ``run/``. Code written against the old paths keeps working: importing one gives a module
that forwards every attribute to where it lives now and says so once with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module -> the modules its names live in now (searched in order)
MOVED: dict[str, tuple[str, ...]] = {
    "adalora.io": ("adalora.files.adapter", "adalora.files.atomic", "adalora.run.convert"),
    "adalora.peft_format": ("adalora.files.peft", "adalora.run.convert"),
    "adalora.checkpoint": ("adalora.files.checkpoint", "adalora.files.atomic"),
    "adalora.distributed": ("adalora.parallel",),
    "adalora.training": ("adalora.integrations.loop",),
    "adalora.experiment": ("adalora.run.train",),
    "adalora.data": ("adalora.run.data",),
    "adalora.causal_lm": ("adalora.run.causal_lm",),
    "adalora.plots": ("adalora.run.plots",),
}
# names that changed as well as moved: (old module, old name) -> new name
RENAMED: dict[tuple[str, str], str] = {("adalora.distributed", "save_adapter"): "save_adapter_collective"}


class _MovedModule(types.ModuleType):
    """Forwards attribute reads to the modules the old one was split into."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = RENAMED.get((self.__name__, name), name)
        for home in MOVED[self.__name__]:
            module = importlib.import_module(home)
            if hasattr(module, target):
                warnings.warn(
                    f"{self.__name__}.{name} moved to {home}.{target}; the old path will be removed in a later version",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, target)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, f"Moved: see {', '.join(MOVED[spec.name])}.")

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _MovedLoader())
        return None


def install() -> None:
    """Let ``import adalora.io`` (and the other old paths) resolve; idempotent."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
