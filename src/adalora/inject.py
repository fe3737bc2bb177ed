"""Put SVD adapters into any ``nn.Module`` by target-module names, and freeze everything else."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

from .config import AdaLoRAConfig
from .layers import (
    FusedWeight,
    SVDAdapter,
    SVDExperts,
    adapter_class_for,
    expert_weight_names,
    find_adapters,
    is_experts_block,
    keep_differentiable_layout,
    refusal,
    supported_layers,
    unwrap_model,
)

Target = nn.Module | FusedWeight  # what an adapter replaces: a layer, or a fused expert weight of an MoE block


def name_matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """Whether module ``name`` is targeted: suffix match on ``.``-separated names, or a full regex match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, config: AdaLoRAConfig) -> list[tuple[str, Target]]:
    """Every (name, target) that ``config`` selects in ``model``, in module order.

    A ``target_modules`` match is the module itself, or, for a mixture-of-experts block, each of its fused expert
    weights (``<block>.gate_up_proj``, ``<block>.down_proj``); a ``target_parameters`` match is the parameter. On a
    model with adapters the names are the same (an expert adapter stands where its parameter was).
    """
    targets: dict[str, Target] = {}
    for name, module in model.named_modules():
        if isinstance(module, SVDExperts):
            continue  # counted with its block, as the parameter it replaced
        prefix = f"{name}." if name else ""
        if name and name_matches(name, config.target_modules):
            if is_experts_block(module):
                targets.update({prefix + p: FusedWeight(module, p) for p in expert_weight_names(module)})
            else:
                targets[name] = module
        if config.target_parameters:
            own = [n for n, _ in module.named_parameters(recurse=False)]
            own += [n for n, child in module.named_children() if isinstance(child, SVDExperts)]
            for param in own:
                if name_matches(prefix + param, config.target_parameters):
                    targets[prefix + param] = FusedWeight(module, param)
    return list(targets.items())


def _check_supported(model: nn.Module, config: AdaLoRAConfig, matched: list[tuple[str, Target]]) -> None:
    """Raise ``ValueError`` naming every matched target whose type, or whose settings, no adapter supports."""
    unsupported = [(n, _kind(m)) for n, m in matched if adapter_class_for(m) is None]
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
            refused.append(f"{name} ({_kind(module)}): {reason}")
    if refused:
        raise ValueError(
            f"inject: cannot adapt {'; '.join(refused[:4])}{' ...' if len(refused) > 4 else ''}. Leave "
            f"{'it' if len(refused) == 1 else 'them'} out of target_modules and target_parameters."
        )


def _kind(target: Target) -> str:
    """How messages name a target's type: the module's class, or for a parameter the class of its module."""
    if isinstance(target, FusedWeight):
        return f"a parameter of {type(target.block).__name__}"
    return type(target).__name__


def _warn_unadapted_experts(model: nn.Module, names: Iterable[str]) -> None:
    """Say once that the targets leave a mixture-of-experts model's experts as they are."""
    targeted = set(names)
    blocks = [
        (n, m)
        for n, m in model.named_modules()
        if is_experts_block(m) and not any(f"{n}.{p}" in targeted for p in expert_weight_names(m))
    ]
    if blocks:
        warnings.warn(
            f"inject: {len(blocks)} mixture-of-experts block(s) ({type(blocks[0][1]).__name__}, e.g. '{blocks[0][0]}') "
            "keep their expert weights unadapted. Add 'experts' to target_modules (or their weights to "
            "target_parameters) to adapt them.",
            UserWarning,
            stacklevel=3,
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module | nn.Parameter) -> None:
    """Put ``module`` at ``name``; a fused expert weight (a parameter) and its adapter (a module) replace each other."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child in parent._parameters and isinstance(module, nn.Module):
        delattr(parent, child)  # nn.Module refuses to assign a module where a parameter is registered
    setattr(parent, child, module)


def _describe_candidates(model: nn.Module, limit: int = 12) -> str:
    """A few names of replaceable modules, to help the user fix a target list that matched nothing."""
    names = [n for n, m in model.named_modules() if n and adapter_class_for(m) is not None]
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return shown or f"none (the model has no {supported_layers()} layers)"


def inject(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """Replace every targeted layer of ``model`` by an SVD adapter, in place, and freeze the rest.

    After this call only the adapters' P, E, Q and the parameters of ``config.modules_to_save`` are
    trainable. The adapted model computes exactly what the base model did (lambda starts at 0, or P at 0:
    ``config.triplet_init``). Quantized layers of the model, adapted or not, pass the dequantized layer's gradient
    to their input, in eval mode too (see ``adalora.layers.keep_differentiable_layout``).

    Args:
        model: any module; Hugging Face transformers models work as they are.
        config: the AdaLoRA configuration.

    Returns:
        ``model`` itself, for chaining.

    Raises:
        ValueError: if the model already has adapters, nothing matches ``config.target_modules`` or
            ``config.target_parameters``, a matched module's (or parameter's module's) type or settings are
            unsupported (see ``adalora.layers``), or a ``modules_to_save`` entry matches nothing. Everything is
            checked before the model is changed.

    A model with mixture-of-experts blocks whose expert weights the targets leave out gets one warning saying so.
    """
    wrapped, model = model, unwrap_model(model)  # a compiled/DDP model is changed inside, and returned as given
    if find_adapters(model):
        raise ValueError(
            "inject: this model already contains AdaLoRA adapters. Inject into a fresh copy of the base model."
        )
    matched = find_targets(model, config)
    if not matched:
        parameters = f" or target_parameters={config.target_parameters!r}" if config.target_parameters else ""
        raise ValueError(
            f"inject: no module name matches target_modules={config.target_modules!r}{parameters}. "
            f"Modules that can be adapted include: {_describe_candidates(model)}."
        )
    _check_supported(model, config, matched)
    _warn_unadapted_experts(model, (n for n, _ in matched))
    for param in model.parameters():
        param.requires_grad_(False)
    keep_differentiable_layout(model)  # bitsandbytes' CPU inference kernel for 4-bit weights has no backward
    for name, module in matched:
        adapter_cls = adapter_class_for(module)
        assert adapter_cls is not None
        adapter = adapter_cls.from_base(module, config.init_r, config.scale, config.dropout, config.triplet_start)
        adapter.train(module.block.training if isinstance(module, FusedWeight) else module.training)
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
