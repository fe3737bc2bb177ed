"""Put SVD adapters into any ``nn.Module`` by target-module names, and freeze everything else."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .config import AdaLoRAConfig
from .layers import (
    SVDAdapter,
    adapter_class_for,
    find_adapters,
    keep_differentiable_layout,
    refusal,
    supported_layers,
    unwrap_model,
)


def name_matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """Whether module ``name`` is targeted: suffix match on ``.``-separated names, or a full regex match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _describe_candidates(model: nn.Module, limit: int = 12) -> str:
    """A few names of replaceable modules, to help the user fix a target list that matched nothing."""
    names = [n for n, m in model.named_modules() if n and adapter_class_for(m) is not None]
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return shown or f"none (the model has no {supported_layers()} layers)"


def inject(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """Replace every targeted layer of ``model`` by an SVD adapter, in place, and freeze the rest.

    After this call only the adapters' P, E, Q and the parameters of ``config.modules_to_save`` are
    trainable. The adapted model computes exactly what the base model did (lambda starts at 0). Quantized layers
    of the model, adapted or not, pass the dequantized layer's gradient to their input, in eval mode too (see
    ``adalora.layers.keep_differentiable_layout``).

    Args:
        model: any module; Hugging Face transformers models work as they are.
        config: the AdaLoRA configuration.

    Returns:
        ``model`` itself, for chaining.

    Raises:
        ValueError: if the model already has adapters, no module matches ``config.target_modules``, a matched
            module's type or settings are unsupported (see ``adalora.layers``), or a ``modules_to_save`` entry
            matches nothing. Everything is checked before the model is changed.
    """
    wrapped, model = model, unwrap_model(model)  # a compiled/DDP model is changed inside, and returned as given
    if find_adapters(model):
        raise ValueError(
            "inject: this model already contains AdaLoRA adapters. Inject into a fresh copy of the base model."
        )
    matched = [
        (name, module) for name, module in model.named_modules() if name and name_matches(name, config.target_modules)
    ]
    if not matched:
        raise ValueError(
            f"inject: no module name matches target_modules={config.target_modules!r}. "
            f"Modules that can be adapted include: {_describe_candidates(model)}."
        )
    unsupported = [(n, type(m).__name__) for n, m in matched if adapter_class_for(m) is None]
    if unsupported:
        listed = ", ".join(f"{n} ({t})" for n, t in unsupported[:8])
        raise ValueError(
            f"inject: target_modules={config.target_modules!r} matches modules of unsupported type: {listed}. "
            f"AdaLoRA adapts {supported_layers()}; narrow the targets to those layers "
            "(e.g. 'attention.self.query' instead of 'attention')."
        )
    refused = []
    for name, module in matched:
        reason = refusal(module)
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            # Its forward reads out_proj.weight/bias directly: an adapter in out_proj's place would never run.
            reason = "nn.MultiheadAttention uses its out_proj's weight without calling it, so an adapter there is inert"
        if reason is not None:
            refused.append(f"{name} ({type(module).__name__}): {reason}")
    if refused:
        raise ValueError(
            f"inject: cannot adapt {'; '.join(refused[:4])}{' ...' if len(refused) > 4 else ''}. Leave "
            f"{'this module' if len(refused) == 1 else 'these modules'} out of target_modules."
        )
    for param in model.parameters():
        param.requires_grad_(False)
    keep_differentiable_layout(model)  # bitsandbytes' CPU inference kernel for 4-bit weights has no backward
    for name, module in matched:
        adapter_cls = adapter_class_for(module)
        assert adapter_cls is not None
        adapter = adapter_cls.from_base(module, config.init_r, config.scale, config.dropout, config.init_std)
        adapter.train(module.training)
        _set_submodule(model, name, adapter)
    _unfreeze_modules_to_save(model, config.modules_to_save)
    return wrapped


def _unfreeze_modules_to_save(model: nn.Module, names: Iterable[str]) -> None:
    names = tuple(names)
    if not names:
        return
    found = [m for n, m in model.named_modules() if n and name_matches(n, names)]
    if not found:
        raise ValueError(
            f"inject: modules_to_save={names!r} matches no module. Give the name of the task head, "
            "e.g. 'classifier' for BERT sequence classification or 'score' for Llama."
        )
    for module in found:
        for param in module.parameters():
            if not any(param is p for p in _adapter_base_params(module)):
                param.requires_grad_(True)


def _adapter_base_params(module: nn.Module) -> list[nn.Parameter]:
    """Frozen base weights inside adapters (never unfrozen by modules_to_save)."""
    params: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, SVDAdapter):
            params.append(m.weight)
            if m.bias is not None:
                params.append(m.bias)
    return params


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that will receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
