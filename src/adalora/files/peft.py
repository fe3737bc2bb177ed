"""Hugging Face PEFT formats: export as a plain LoRA adapter, import a PEFT AdaLoRA checkpoint.

Export (``export_peft``, ``write_peft``): each adapted module becomes a LoRA pair with the singular values folded
into ``lora_A``, laid out (:mod:`adalora.files.lora_layout`) so that a reader's scale rule gives our scale:

- ``layout="compact"`` (default): each module at its own kept rank k (all listed in ``rank_pattern``), one
  global ``lora_alpha = r`` (the most common rank), no ``alpha_pattern``; ``lora_A = (scale k / lora_alpha)
  diag(lambda) Q``. PEFT's ``lora_alpha / k`` and llama.cpp's ``lora_alpha / (tensor rank)`` both give ``scale``.
- ``layout="uniform"``: every module zero-padded to one rank R, ``r = lora_alpha = R``, no patterns;
  ``lora_A = scale diag(lambda) Q``: exact for readers that apply one ``lora_alpha / r`` to every module
  (SGLang; vLLM releases that ignore ``rank_pattern``) as well.

Modules whose rank went to 0 are left out; ``target_modules`` lists the exported modules by full name, as PEFT
writes them itself. No ``peft`` import is needed to write the files.

Layouts per layer type (PEFT's names and shapes; ``SVDAdapter.lora_tensors`` of each layer type):

- ``nn.Linear``, GPT-2 ``Conv1D``: ``lora_A.weight (k, d_in)``, ``lora_B.weight (d_out, k)``;
- ``nn.Conv{1,2,3}d``: ``lora_A.weight (k, in, *kernel_size)``, ``lora_B.weight (out, k, 1, ...)``;
- ``nn.Embedding``: ``lora_embedding_A (k, num_embeddings)``, ``lora_embedding_B (embedding_dim, k)``;
- a fused expert weight of an MoE block (PEFT's ``target_parameters``, its ``ParamWrapper``): ``lora_A.weight
  (E k, d_in)``, ``lora_B.weight (d_out, k E)`` at the experts' largest kept rank k (zero-lambda padding for the
  others), under the block's name with one ``base_layer.`` per weight of the block that PEFT wraps after it (it nests
  one wrapper per parameter, in the block's parameter order). PEFT refuses ``lora_dropout`` on parameters, so an
  export with experts records ``lora_dropout = 0`` (the file is for inference; dropout does not act there).

Import (``import_peft``): PEFT's AdaLoRA layers compute ``(x (A * E)^T B^T) * lora_alpha / (ranknum + 1e-5)``
with ``ranknum = init_r``, while ours use ``alpha / init_r``. The factor ``init_r / (init_r + 1e-5)`` (a relative
1e-5 / init_r) is folded into lambda on import, so the imported model computes what the PEFT model computed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..compact import resize_adapters
from ..config import AdaLoRAConfig
from ..inject import inject, name_matches
from ..layers import adapter_class_for, find_adapters, unwrap_model
from .adapter import _get_tensor
from .atomic import atomic_directory
from .export_source import ExportSource
from .lora_layout import lay_out
from .updates import ModuleUpdate

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_ADALORA_EPS = 1e-5  # PEFT's AdaLoRA divides by (ranknum + 1e-5)
AUTO = "auto"  # task_type: take PEFT's task type from the base model's class


# ---------------------------------------------------------------------- export
def export_peft(
    model: nn.Module,
    directory: str | os.PathLike[str],
    config: AdaLoRAConfig,
    *,
    layout: str = "compact",
    rank: int | None = None,
    task_type: str | None = AUTO,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``model``'s adapters as a standard PEFT LoRA adapter directory, atomically.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then computes what ``model`` computes (in
    ``eval()`` mode), in either layout. ``config.modules_to_save`` modules are exported as PEFT
    ``modules_to_save``.

    Args:
        model: a model with AdaLoRA adapters (masked or compacted).
        directory: the PEFT adapter directory to create or replace.
        config: the configuration the model was injected with (dropout and modules_to_save are taken from it).
        layout: ``"compact"`` (per-module ranks; PEFT, vLLM 0.32, llama.cpp) or ``"uniform"`` (one padded rank;
            also for readers without ``rank_pattern``, e.g. SGLang).
        rank: uniform only: the rank to pad every module to (default: the largest kept rank).
        task_type: PEFT's ``task_type`` (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``); ``"auto"`` (default) takes it from
            the model's class; None writes none (PEFT then loads a plain ``PeftModel``).
        base_model_name_or_path: recorded in ``adapter_config.json``; default: the model's ``name_or_path``.

    Returns:
        The directory.

    Raises:
        ValueError: if the model has no adapters, every adapter has rank 0, a layer has no PEFT LoRA layout, or
            ``layout``/``rank`` are invalid.
    """
    try:
        source = ExportSource.from_model(model, config, base_model_name_or_path)
    except ValueError as error:
        raise ValueError(f"export_peft: {error}") from None
    return write_peft(source, directory, layout=layout, rank=rank, task_type=task_type)


def write_peft(
    source: ExportSource,
    directory: str | os.PathLike[str],
    *,
    layout: str = "compact",
    rank: int | None = None,
    task_type: str | None = AUTO,
) -> Path:
    """Write ``source`` as a PEFT LoRA adapter directory in ``layout`` (see the module docstring), atomically.

    Returns:
        The directory.
    """
    try:
        laid_out = lay_out(source.updates, layout, rank)
    except ValueError as error:
        raise ValueError(f"export_peft: {error}") from None
    modules, parameters = _peft_targets(laid_out.updates)
    tensors: dict[str, torch.Tensor] = {}
    for update in laid_out.updates:
        tensors.update(_lora_tensors(update, modules.get(update.name) or parameters[update.name]))
    for key, value in source.modules_to_save.items():
        tensors[f"{PEFT_PREFIX}{key}"] = value.contiguous().clone()
    fan_in_fan_out = any(u.adapter_class.peft_fan_in_fan_out for u in laid_out.updates)
    if parameters and fan_in_fan_out:
        raise ValueError(
            "export_peft: PEFT cannot load fused expert weights (target_parameters) together with GPT-2 Conv1D "
            "layers (fan_in_fan_out) in one adapter. Export from a model that adapts only one of them."
        )
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": source.task_type if task_type == AUTO else task_type,
        "base_model_name_or_path": source.base_model_name,
        "target_modules": sorted(modules),
        **({"target_parameters": sorted(parameters)} if parameters else {}),
        "r": laid_out.r,
        "lora_alpha": laid_out.lora_alpha,
        "rank_pattern": laid_out.rank_pattern,
        "alpha_pattern": {},  # one lora_alpha: llama.cpp and SGLang have no alpha_pattern
        "lora_dropout": 0.0 if parameters else source.config.dropout,  # PEFT refuses dropout on parameters
        # GPT-2's Conv1D stores (d_in, d_out) weights; PEFT needs to know to merge them correctly.
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": list(source.config.modules_to_save) or None,
        "use_rslora": False,  # rslora would scale by alpha / sqrt(r), not the alpha / r the layouts assume
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with atomic_directory(directory, marker=PEFT_CONFIG_NAME) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def _peft_targets(updates: list[ModuleUpdate]) -> tuple[dict[str, str], dict[str, str]]:
    """``({module: its key in PEFT's files}, {fused expert weight: the key of PEFT's wrapper for it})``.

    PEFT wraps the targeted parameters of one block one inside the other, in the block's parameter order: the last
    is the outermost wrapper (keys ``<block>.lora_A...``), each earlier one a ``base_layer`` deeper.
    """
    modules = {u.name: u.name for u in updates if u.layer_type != "experts"}
    blocks: dict[str, list[ModuleUpdate]] = {}
    for u in updates:
        if u.layer_type == "experts":
            blocks.setdefault(u.name.rpartition(".")[0], []).append(u)
    parameters = {}
    for block, members in blocks.items():
        members.sort(key=lambda u: u.options["order"])
        for depth, u in enumerate(reversed(members)):
            parameters[u.name] = block + ".base_layer" * depth
    return modules, parameters


def _lora_tensors(update: ModuleUpdate, key: str) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors of one module stored under ``key`` (with the ``base_model.model.`` prefix), lambda folded
    into A."""
    try:
        tensors = update.adapter_class.lora_tensors(update.factors, update.weight_shape, update.options)
    except ValueError as error:
        raise ValueError(f"export_peft: module '{update.name}' has {error}") from None
    return {f"{PEFT_PREFIX}{key}.{suffix}": value for suffix, value in tensors.items()}


# ---------------------------------------------------------------------- import
def read_peft_checkpoint(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` and tensors (``base_model.model.`` prefix removed) of a PEFT AdaLoRA directory.

    Raises:
        FileNotFoundError: if the directory, its config or its weights are missing.
        ValueError: if the config is not valid JSON or not an AdaLoRA (``peft_type: ADALORA``) adapter.
    """
    directory = Path(directory)
    config_path = directory / PEFT_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"'{directory}' is not a PEFT adapter directory: {PEFT_CONFIG_NAME} is missing.")
    try:
        peft_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"'{config_path}' is not valid JSON: {error}") from error
    peft_type = peft_config.get("peft_type")
    if peft_type != "ADALORA":
        raise ValueError(
            f"'{directory}' holds a PEFT {peft_type} adapter, not an AdaLoRA one (peft_type 'ADALORA'). A LoRA adapter "
            "is loaded with peft.PeftModel.from_pretrained; import_peft converts PEFT AdaLoRA checkpoints."
        )
    weights = directory / PEFT_WEIGHTS_NAME
    legacy = directory / "adapter_model.bin"
    try:
        if weights.is_file():
            state = load_file(str(weights))
        elif legacy.is_file():
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"'{directory}' has no {PEFT_WEIGHTS_NAME} (nor adapter_model.bin).")
    except (OSError, RuntimeError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"the weights in '{directory}' cannot be read (truncated or corrupted?): {error}") from error
    return peft_config, {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def adalora_config_from_peft(peft_config: dict[str, Any], module_names: Iterable[str] | None = None) -> AdaLoRAConfig:
    """Our :class:`AdaLoRAConfig` for a PEFT ``AdaLoraConfig`` dict (schedule, betas, regulariser, alpha, ...).

    Args:
        peft_config: the parsed ``adapter_config.json``.
        module_names: if given, ``target_modules`` becomes this exact list of module names (what
            :func:`import_peft` uses, so that PEFT's ``layers_to_transform``/``exclude_modules`` need no
            translation); otherwise PEFT's ``target_modules`` as they are.
    """
    init_r = int(peft_config.get("init_r", 12))
    alpha = float(peft_config.get("lora_alpha") or 0) or float(init_r)  # PEFT: scaling = r when lora_alpha == 0
    targets = tuple(module_names) if module_names is not None else peft_config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    try:
        return AdaLoRAConfig(
            target_modules=targets,
            init_r=init_r,
            target_r=int(peft_config.get("target_r", 8)),
            alpha=alpha,
            dropout=float(peft_config.get("lora_dropout") or 0.0),
            warmup_steps=int(peft_config.get("tinit", 0)),
            final_steps=int(peft_config.get("tfinal", 0)),
            mask_interval=int(peft_config.get("deltaT", 1)),
            total_steps=peft_config.get("total_step"),
            beta1=float(peft_config.get("beta1", 0.85)),
            beta2=float(peft_config.get("beta2", 0.85)),
            orth_reg_weight=float(peft_config.get("orth_reg_weight", 0.5)),
            modules_to_save=tuple(peft_config.get("modules_to_save") or ()),
        )
    except ValueError as error:
        raise ValueError(f"the PEFT AdaLoRA config cannot be expressed as an adalora config: {error}") from error


def import_peft(base_model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load a PEFT AdaLoRA checkpoint (``save_pretrained`` output) into ``base_model`` as adalora adapters.

    Each module gets the rank PEFT saved (PEFT slices to the kept triplets once a rank pattern exists; an
    unsliced checkpoint keeps ``init_r`` with zeros in lambda for masked triplets). PEFT's
    ``modules_to_save`` weights (e.g. the classifier) are loaded too. Everything is checked before
    ``base_model`` is modified. Use :func:`adalora_config_from_peft` for the matching configuration, e.g. to
    :func:`adalora.save_adapter` the result.

    Args:
        base_model: a fresh copy of the base model the PEFT adapter was trained on (no adapters).
        directory: the PEFT adapter directory.

    Returns:
        ``base_model`` with adapters; its outputs equal the PEFT model's to float rounding.

    Raises:
        FileNotFoundError: if files are missing.
        ValueError: if the checkpoint is not AdaLoRA, uses unsupported options, or does not fit ``base_model``.
    """
    wrapped, base_model = base_model, unwrap_model(base_model)  # changed inside a compiled/DDP wrapper
    peft_config, state = read_peft_checkpoint(directory)
    if peft_config.get("bias", "none") != "none":
        raise ValueError(
            f"import_peft: bias={peft_config['bias']!r} (trained biases) is not supported; only bias='none'."
        )
    if find_adapters(base_model):
        raise ValueError("import_peft: the base model already has AdaLoRA adapters. Use a fresh base model.")

    factors, extra = _peft_factors(peft_config, state, directory)
    _check_peft_fits(base_model, factors, extra, directory)
    names = [name for name, _ in factors]
    config = adalora_config_from_peft(peft_config, names)
    # PEFT adds "classifier" and "score" for SEQ_CLS whatever the model has; keep the names that exist here.
    module_names = [n for n, _ in base_model.named_modules() if n]
    present = tuple(m for m in config.modules_to_save if any(name_matches(n, (m,)) for n in module_names))
    config = config.replace(modules_to_save=present)
    init_r = config.init_r
    # PEFT's scale is alpha / (init_r + 1e-5), ours alpha / init_r: fold the ratio into lambda.
    fold = init_r / (init_r + PEFT_ADALORA_EPS)

    inject(base_model, config)
    resize_adapters(base_model, {name: e.numel() for name, (_, e, _) in factors})
    adapters = dict(find_adapters(base_model))
    with torch.no_grad():
        for name, (p, e, q) in factors:
            adapter = adapters[name]
            adapter.P.copy_(p)
            adapter.E.copy_(e.to(torch.float64).mul(fold))
            adapter.Q.copy_(q)
        for key, value in extra.items():
            _get_tensor(base_model, key).copy_(value)
    return wrapped


def _peft_factors(
    peft_config: dict[str, Any], state: dict[str, torch.Tensor], directory: str | os.PathLike[str]
) -> tuple[list[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Group PEFT tensors into per-module (P, E, Q) (sliced by ``rank_pattern`` if needed) and the rest."""
    suffixes = (".lora_A", ".lora_B", ".lora_E")
    modules = sorted({k.rpartition(".")[0] for k in state if k.endswith(suffixes)})
    if not modules:
        raise ValueError(f"'{directory}' holds no AdaLoRA tensors (keys ending in .lora_A/.lora_B/.lora_E).")
    rank_pattern = {k.removesuffix(".lora_E"): v for k, v in (peft_config.get("rank_pattern") or {}).items()}
    factors = []
    for name in modules:
        missing = [s for s in suffixes if f"{name}{s}" not in state]
        if missing:
            raise ValueError(f"'{directory}': module '{name}' lacks {missing} (an incomplete checkpoint).")
        a, b, e = (state[f"{name}{s}"] for s in suffixes)
        e = e.reshape(-1)
        if not (a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] == e.numel()):
            raise ValueError(
                f"'{directory}': module '{name}' has inconsistent shapes lora_A {list(a.shape)}, lora_B "
                f"{list(b.shape)}, lora_E {list(e.shape)} (expected (k, d_in), (d_out, k), (k, 1))."
            )
        mask = rank_pattern.get(name)
        if mask is not None and len(mask) == e.numel() and sum(mask) < e.numel():
            keep = torch.tensor(mask, dtype=torch.bool).nonzero().squeeze(1)  # a full-size checkpoint: slice it
            a, b, e = a.index_select(0, keep), b.index_select(1, keep), e.index_select(0, keep)
        factors.append((name, (b, e, a)))
    extra = {k: v for k, v in state.items() if not k.endswith((*suffixes, ".ranknum"))}
    return factors, extra


def _check_peft_fits(
    model: nn.Module,
    factors: list[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    extra: dict[str, torch.Tensor],
    directory: str | os.PathLike[str],
) -> None:
    for name, (p, _, q) in factors:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"'{directory}' adapts module '{name}', which this base model does not have. Use the base model "
                "the PEFT adapter was trained on."
            ) from None
        adapter_cls = adapter_class_for(module)
        if adapter_cls is None:
            raise ValueError(f"'{directory}': module '{name}' is a {type(module).__name__}, not a supported layer.")
        d_out, d_in = adapter_cls.dims(module)
        if (p.shape[0], q.shape[1]) != (d_out, d_in):
            raise ValueError(
                f"'{directory}': module '{name}' has lora_B {list(p.shape)} and lora_A {list(q.shape)}, but the base "
                f"layer maps {d_in} -> {d_out} features. Use the base model the PEFT adapter was trained on."
            )
    for key, value in extra.items():
        try:
            target = _get_tensor(model, key)
        except AttributeError:
            raise ValueError(f"'{directory}': saved tensor '{key}' has no counterpart in the base model.") from None
        if target.shape != value.shape:
            raise ValueError(
                f"'{directory}': saved tensor '{key}' has shape {list(value.shape)}, the base model's has "
                f"{list(target.shape)}."
            )
