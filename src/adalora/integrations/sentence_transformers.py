"""sentence-transformers: what its ``SentenceTransformer`` needs beyond :class:`AdaLoRACallback`'s generic work.

A ``SentenceTransformer`` saves its backbone with ``save_pretrained``, and loading the directory goes through
``AutoModel.from_pretrained``, which drops the adapters' keys (``...P``, ``...E``, ``...Q``, ``...rank_mask``) as
unexpected: ``SentenceTransformer(dir)`` silently gives the untrained model's embeddings, and the trainer's
``resume_from_checkpoint`` fails on a strict ``load_state_dict`` with the adapters' keys missing. The callback calls
:func:`protect` on such a model when the trainer is built, which

- refuses ``model.save(dir)`` / ``save_pretrained`` outside training while adapters are in the model, with what to
  do instead: ``adalora.merge(model)`` then ``model.save(dir)`` (a plain model that ``SentenceTransformer(dir)``
  loads), or ``adalora.save_adapter(model, dir, config)`` / ``adalora.load_adapter`` (the adapter on its own);
- lets the trainer's own checkpoints save during training, and lets its checkpoint loader skip the adapters' keys,
  which the callback then restores from ``adalora_adapters.pt`` written next to every checkpoint.

Nothing here imports sentence-transformers: a model is recognised by its class's module.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files.atomic import atomic_write
from ..layers import find_adapters

ADAPTERS_FILE = "adalora_adapters.pt"
_FACTORS = ("P", "E", "Q", "rank_mask")


def is_sentence_transformer(model: Any) -> bool:
    """Whether ``model`` is a sentence-transformers model (``SentenceTransformer``, ``SparseEncoder``, ...)."""
    return any(cls.__module__.startswith("sentence_transformers.") for cls in type(model).__mro__)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's P, E, Q and rank_mask, keyed ``<module name>.<factor>`` (clones, on the CPU)."""
    return {
        f"{name}.{factor}": getattr(adapter, factor).detach().cpu().clone()
        for name, adapter in find_adapters(model)
        for factor in _FACTORS
    }


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`adapter_state` output into ``model``'s adapters (same layout: names and ranks)."""
    adapters = dict(find_adapters(model))
    expected = {f"{name}.{factor}" for name in adapters for factor in _FACTORS}
    if set(state) != expected:
        raise ValueError(
            f"{ADAPTERS_FILE}: the saved adapters ({len(state) // len(_FACTORS)} modules) do not match this model's "
            f"({len(adapters)}); resume with the model injected with the same configuration."
        )
    with torch.no_grad():
        for key, value in state.items():
            name, factor = key.rsplit(".", 1)
            getattr(adapters[name], factor).copy_(value)


class _Guard:
    """The state :func:`protect` shares with the callback: whether training is under way, whether a checkpoint
    load skipped the adapters' keys (and so the callback must restore them)."""

    def __init__(self) -> None:
        self.training = False
        self.adapters_pending = False


def protect(model: nn.Module) -> _Guard:
    """Make ``model.save``/``save_pretrained`` refuse to drop adapters silently, and let checkpoint loads skip them.

    Installs instance-level wrappers on ``model`` (once; a second call returns the same guard). See the module
    docstring for what each does.
    """
    guard = getattr(model, "_adalora_guard", None)
    if guard is not None:
        return guard
    guard = _Guard()
    object.__setattr__(model, "_adalora_guard", guard)

    def refuse_unmerged(save):
        @functools.wraps(save)
        def wrapper(*args: Any, **kwargs: Any):
            if not guard.training and find_adapters(model):
                raise RuntimeError(
                    "This SentenceTransformer carries AdaLoRA adapters, and SentenceTransformer(dir) would load the "
                    "saved directory without them (transformers drops their keys as unexpected), silently giving "
                    "the untrained embeddings. For a plain model that loads anywhere: model = adalora.merge(model), "
                    "then model.save(dir). To keep the adapter: adalora.save_adapter(model, dir, config), and "
                    "adalora.load_adapter(SentenceTransformer(base), dir) to load it."
                )
            return save(*args, **kwargs)

        return wrapper

    load_state_dict = model.load_state_dict

    @functools.wraps(load_state_dict)
    def tolerant_load(state_dict: Any, strict: bool = True, assign: bool = False):
        adapter_keys = {f"{name}.{factor}" for name, _ in find_adapters(model) for factor in _FACTORS}
        missing = adapter_keys - set(state_dict)
        if not missing:
            return load_state_dict(state_dict, strict=strict, assign=assign)
        result = load_state_dict(state_dict, strict=False, assign=assign)
        other_missing = [k for k in result.missing_keys if k not in adapter_keys]
        if strict and (other_missing or result.unexpected_keys):
            raise RuntimeError(
                f"load_state_dict: missing keys {other_missing[:4]}, unexpected keys {result.unexpected_keys[:4]}"
            )
        # A checkpoint saved by the trainer, loaded through AutoModel (which dropped the adapters): the callback
        # restores them from its own file when training begins; until then the model holds stale adapters.
        guard.adapters_pending = True
        return result

    for method in ("save", "save_pretrained"):
        if hasattr(model, method):
            object.__setattr__(model, method, refuse_unmerged(getattr(model, method)))
    object.__setattr__(model, "load_state_dict", tolerant_load)
    return guard


def save_adapters_file(model: nn.Module, directory: Path) -> None:
    """Write :func:`adapter_state` to ``directory / adalora_adapters.pt`` atomically."""
    state = adapter_state(model)
    atomic_write(directory / ADAPTERS_FILE, lambda file: torch.save(state, file))


def restore_adapters_file(model: nn.Module, directory: Path) -> None:
    """Load ``directory / adalora_adapters.pt`` into ``model``'s adapters; a clear error if it is missing."""
    path = directory / ADAPTERS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"AdaLoRACallback: resuming a SentenceTransformer from {directory}, whose {ADAPTERS_FILE} is missing: "
            "the trainer's checkpoint loader dropped the adapters and they cannot be restored."
        )
    load_adapter_state(model, torch.load(path, map_location="cpu", weights_only=True))
