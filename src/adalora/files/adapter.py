"""Adapter files: save a trained adapter compactly, load it onto a fresh base model, all-or-nothing.

An adapter directory holds two files:

- ``adalora_config.json``: the :class:`AdaLoRAConfig`, each adapted module's final rank, scale, layer type,
  base weight shape and layer settings (kernel, stride, ... of a convolution; padding index of an embedding), a
  manifest of the tensors (name, shape, dtype), the size and SHA-256 of the weights file, the library version,
  a fingerprint of the base model (its parameter names and shapes) and the caller's free-form ``metadata``;
- ``adalora_adapter.safetensors``: ``<module>.P`` ``(d_out, k)``, ``<module>.E`` ``(k,)``, ``<module>.Q``
  ``(k, d_in)`` sliced to the k kept triplets of each module, plus the full state of ``modules_to_save``. The fused
  expert weight of an MoE block (``<block>.gate_up_proj``) has ``(E, d_out, k)``, ``(E, k)``, ``(E, k, d_in)`` with
  k its experts' largest kept rank: each expert's kept triplets first, then zero-lambda padding, and its config
  entry lists every expert's rank (``expert_ranks``).

The names differ from PEFT's (``adapter_config.json``) on purpose: a PEFT loader pointed at an AdaLoRA
directory fails at once instead of misreading it. :func:`adalora.export_peft` writes PEFT's format.

Writes are atomic: everything goes to a temporary directory beside the target, is fsync'ed, and then replaces
the target in one rename (an atomic exchange on Linux), so a crash never leaves a half-written adapter where
the previous one was. Loads check everything (files, sizes, checksum, manifest, base-model fingerprint,
shapes) before they touch the model, so a failed load leaves it unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from ..compact import resize_adapters
from ..config import AdaLoRAConfig
from ..finite import require_finite
from ..inject import find_targets, inject, name_matches
from ..layers import (
    FusedWeight,
    SVDAdapter,
    SVDExperts,
    adapter_class_for,
    find_adapters,
    is_quantized_precision,
    kept_triplets,
    logical_shape,
    precision_of,
    unwrap_model,
)
from ..version import __version__
from .atomic import atomic_directory

CONFIG_NAME = "adalora_config.json"
WEIGHTS_NAME = "adalora_adapter.safetensors"
FORMAT = "adalora-adapter"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------- public API
def save_adapter(
    model: nn.Module, directory: str | os.PathLike[str], config: AdaLoRAConfig, metadata: dict | None = None
) -> Path:
    """Write ``model``'s adapters, sliced to their kept triplets, and its ``modules_to_save`` to ``directory``.

    Masked triplets (``rank_mask`` False) are left out, whether or not the model was compacted: an adapter
    trained from ``init_r=12`` down to an average rank of 2 takes about a sixth of the space of the full one.
    An existing adapter directory at ``directory`` is replaced atomically.

    Args:
        model: a model prepared by :func:`adalora.inject` (possibly trained, masked or compacted).
        directory: the adapter directory to create or replace.
        config: the configuration ``model`` was injected with.
        metadata: free-form JSON-able information stored with the adapter (e.g. ``{"model": base model path,
            "task": ...}``; the ``adalora merge`` command reads ``"model"`` to find the base model).

    Returns:
        The adapter directory.

    Raises:
        ValueError: if the model has no adapters, its adapters do not match ``config.target_modules``, DeepSpeed
            ZeRO-3 partitions them (see :func:`adalora.parallel.save_adapter_collective`), a kept
            factor or ``modules_to_save`` tensor holds NaN or inf (training diverged: :mod:`adalora.finite`),
            ``metadata`` is not JSON-serialisable, or ``directory`` exists and is not an adapter directory.
    """
    directory = Path(directory)
    model = unwrap_model(model)  # the keys of a compiled or DDP model, read as a plain model's
    named = find_adapters(model)
    if not named:
        raise ValueError("save_adapter: the model has no AdaLoRA adapters. Call adalora.inject(model, config) first.")
    _check_targets(model, [n for n, _ in named], config, "save_adapter")
    check_whole([a for _, a in named], "save_adapter")
    metadata_json = _json_copy(metadata or {})
    tensors, modules = _kept_tensors(named)
    extra = _modules_to_save_state(model, config)
    tensors.update(extra)
    require_finite(tensors.items(), f"save_adapter: the model's adapter (for '{directory}')")

    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": config.to_dict(),
        "modules": modules,
        "modules_to_save_tensors": sorted(extra),
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
        "base_model": _describe_base_model(model),
        "metadata": metadata_json,
    }
    with atomic_directory(directory, marker=CONFIG_NAME) as tmp:
        weights = tmp / WEIGHTS_NAME
        save_file(tensors, str(weights), metadata={"format": "pt"})
        info["weights_file"] = {"name": WEIGHTS_NAME, "bytes": weights.stat().st_size, "sha256": _sha256(weights)}
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return directory


def _json_copy(metadata: dict) -> dict:
    """``metadata`` as it reads back from JSON; a one-line error if JSON cannot hold it."""
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"save_adapter: metadata must be JSON-serialisable (str, numbers, lists, dicts): {error}"
        ) from error


def _kept_tensors(named: list[tuple[str, SVDAdapter]]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The kept triplets of every adapter as ``{name.P, name.E, name.Q: tensor}`` on the CPU, and what the config
    file records about each module."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for (name, adapter), keep in zip(named, kept_triplets([a for _, a in named]), strict=True):
        # Copies (kept_factors selects), so the saved tensors never share storage (safetensors refuses that).
        factors = adapter.kept_factors(keep).to("cpu")
        tensors[f"{name}.P"], tensors[f"{name}.E"], tensors[f"{name}.Q"] = factors.P, factors.E, factors.Q
        modules[name] = _module_entry(adapter, factors.rank)
    return tensors, modules


def _module_entry(adapter: SVDAdapter, rank: int) -> dict[str, Any]:
    """What ``adalora_config.json`` records about one adapted module saved at ``rank`` triplets."""
    entry = {
        "type": adapter.layer_type_name(adapter),
        "rank": rank,
        "scale": adapter.scale,
        "d_out": adapter.d_out,
        "d_in": adapter.d_in,
        # P and Q are 2-D per matrix whatever the layer; the base layout (e.g. a conv kernel) is needed to export them.
        "weight_shape": list(adapter.base_shape()),  # logical: a packed 4-bit weight has another shape
        "layer": adapter.layer_options(),
        # Factors trained models keep frozen (the LoRA baseline's lambda gate) stay frozen after loading.
        "frozen": [attr for attr in ("P", "E", "Q") if not getattr(adapter, attr).requires_grad],
    }
    if isinstance(adapter, SVDExperts):  # the rank of each expert; its padding up to "rank" has lambda = 0
        entry["expert_ranks"] = adapter.rank_mask.sum(-1).tolist()
    return entry


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adalora_config.json`` of an adapter directory (checked for format, not for the weights).

    Raises:
        FileNotFoundError: if the directory or its config file does not exist.
        ValueError: if the config file is not valid JSON or not an AdaLoRA adapter config of a known version.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory '{directory}' does not exist (expected a save_adapter output).")
    if not path.is_file():
        hint = (
            " It looks like a PEFT adapter: use adalora.import_peft for PEFT AdaLoRA checkpoints."
            if (directory / "adapter_config.json").is_file()
            else ""
        )
        raise FileNotFoundError(f"'{directory}' is not an AdaLoRA adapter directory: {CONFIG_NAME} is missing.{hint}")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"'{path}' is not valid JSON (truncated or corrupted?): {error}. Save the adapter again."
        ) from error
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an AdaLoRA adapter config (its 'format' is not '{FORMAT}').")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        fix = "Upgrade adalora." if isinstance(version, int) and version > FORMAT_VERSION else "Save the adapter again."
        raise ValueError(
            f"'{path}' has format_version {version!r}; this adalora ({__version__}) reads version "
            f"{FORMAT_VERSION} only. {fix}"
        )
    missing = [k for k in ("config", "modules", "tensors", "weights_file", "base_model") if k not in info]
    if missing:
        raise ValueError(f"'{path}' lacks the field(s) {missing} (truncated or edited?). Save the adapter again.")
    return info


def load_adapter(base_model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Inject the saved adapters into ``base_model`` (with each module's saved rank) and load their values.

    Everything is checked before ``base_model`` is touched: the files, the weights' size and checksum, the
    tensor manifest, the base model's fingerprint (parameter names and shapes) and every tensor's shape and
    dtype. A failed load raises and leaves ``base_model`` unchanged. Each adapter gets its saved scale, which
    is ``alpha / init_r`` even when the adapter was saved at a lower rank.

    Args:
        base_model: a fresh copy of the base model the adapter was trained on (no adapters).
        directory: a directory written by :func:`save_adapter`.

    Returns:
        ``base_model`` with adapters and ``modules_to_save`` loaded; adapters and ``modules_to_save`` are
        trainable, everything else frozen (as after :func:`adalora.inject`), except adapter factors that were
        frozen when saved (e.g. the LoRA baseline's lambda), which stay frozen.

    Raises:
        FileNotFoundError: if the directory or one of its files is missing.
        ValueError: if a file is truncated or corrupted, a tensor holds NaN or inf, or the base model or a tensor
            does not match.
    """
    directory = Path(directory)
    wrapped, base_model = base_model, unwrap_model(base_model)  # changed inside a compiled/DDP wrapper
    info = read_adapter_config(directory)
    if find_adapters(base_model):
        raise ValueError("load_adapter: the base model already has AdaLoRA adapters. Load onto a fresh base model.")
    try:
        config = AdaLoRAConfig.from_dict(info["config"])
        base = info["base_model"]
        check_fingerprint(base_model, base.get("fingerprint"), str(directory), base.get("precision"))
        tensors = _read_weights(directory, info)
        _check_against_model(base_model, info, config, tensors, directory)
    except (KeyError, TypeError, AttributeError) as error:  # a hand-edited config with fields missing or mistyped
        raise ValueError(
            f"'{directory / CONFIG_NAME}' is malformed ({type(error).__name__}: {error}). Save the adapter again."
        ) from error

    # From here on nothing can fail on bad input: everything above has been checked.
    inject(base_model, config)
    resize_adapters(base_model, {name: meta["rank"] for name, meta in info["modules"].items()})
    with torch.no_grad():
        for name, adapter in find_adapters(base_model):
            meta = info["modules"][name]
            adapter.scale = float(meta["scale"])
            for attr in ("P", "E", "Q"):
                param = getattr(adapter, attr)
                param.copy_(tensors[f"{name}.{attr}"])
                param.requires_grad_(attr not in meta.get("frozen", ()))
            if "expert_ranks" in meta:  # each expert keeps its own rank; the rest of its row is padding
                ranks = torch.tensor(meta["expert_ranks"], device=adapter.rank_mask.device)
                adapter.rank_mask.copy_(torch.arange(adapter.r, device=ranks.device) < ranks.unsqueeze(-1))
        for key in info.get("modules_to_save_tensors", []):
            _get_tensor(base_model, key).copy_(tensors[key])
    return wrapped


# ---------------------------------------------------------------------- fingerprint
def base_model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Parameter names and logical shapes of the base model (adapter factors excluded), with their SHA-256.

    Equal for a fresh base model and the same model after :func:`adalora.inject`, since adapters keep the
    base layers' ``weight``/``bias`` under their original names. Shapes are logical: a bitsandbytes 4-bit weight,
    stored packed as ``(out * in / 2, 1)`` bytes, counts as ``(out, in)``, so a quantized model has the fingerprint
    of its float original (and a float model the one it had before quantized bases were supported). Dtypes and
    quantization are left out on purpose: an adapter trained on a float32 base loads onto a bfloat16 or 4-bit copy
    of it, and vice versa; :func:`base_model_precision` records them beside the fingerprint.
    """
    shapes = {name: list(logical_shape(param)) for name, param in _base_parameters(model)}
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    return {
        "sha256": digest,
        "num_parameters": sum(math.prod(s) for s in shapes.values()),
        "parameters": shapes,
    }


def base_model_precision(model: nn.Module) -> dict[str, int]:
    """How the base model's parameters are stored: number of tensors per dtype or quantization kind, e.g.
    ``{"bnb-nf4-dq": 210, "float32": 63}`` (see ``adalora.layers.precision_of``)."""
    return dict(sorted(Counter(precision_of(param) for _, param in _base_parameters(model)).items()))


def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the base model: adapter factors left out, names as in the model before inject."""
    named = find_adapters(model)
    adapter_params = {id(p) for _, a in named for p in a.adapter_parameters()}
    # Adapters of quantized layers hold the layer itself: its parameters are named '<name>.base_layer.weight'.
    nested = tuple(f"{n}.base_layer." for n, a in named if "base_layer" in a._modules)
    # An adapter of a fused expert weight stands where the parameter was: '<name>.weight' was '<name>'.
    fused = {f"{n}.weight": n for n, a in named if isinstance(a, SVDExperts)}
    params = []
    for name, param in model.named_parameters():
        if id(param) in adapter_params:
            continue
        name = fused.get(name, name)
        if name.startswith(nested):
            head, _, tail = name.partition(".base_layer.")
            name = f"{head}.{tail}"
        params.append((name, param))
    return params


def _quantization(precision: dict[str, int]) -> dict[str, int]:
    """The quantized part of a fingerprint's ``precision`` (storage kinds of the layer table's quantized layers)."""
    return {k: v for k, v in precision.items() if is_quantized_precision(k)}


def _describe_precision(precision: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in precision.items()) + " tensors"


def check_fingerprint(
    model: nn.Module, fingerprint: dict[str, Any] | None, source: str, precision: dict[str, int] | None = None
) -> None:
    """Raise a ValueError naming the differences if ``model`` is not the base model ``fingerprint`` describes.

    When the models match but one is quantized differently from the other (a 4-bit base against its float
    original, nf4 against int8), a UserWarning says so: the adapter loads, and the adapted model's outputs differ
    from those it was trained with by the difference between the two bases' weights. A difference of dtype alone
    (float32 against bfloat16) passes silently, as it always has.

    Args:
        precision: the saved :func:`base_model_precision` (None for adapters saved before it was recorded).
    """
    if not fingerprint:
        return
    current = base_model_fingerprint(model)
    precision_note = ""
    if precision is not None:
        ours = base_model_precision(model)
        if _quantization(precision) != _quantization(ours):
            precision_note = (
                f"the adapter was saved from a base stored as {_describe_precision(precision)}; this base is "
                f"stored as {_describe_precision(ours)}"
            )
    if current["sha256"] == fingerprint.get("sha256"):
        if precision_note:
            warnings.warn(
                f"Loading the adapter in '{source}' onto a differently quantized base: {precision_note}. The update "
                "is the same; the outputs differ by the difference between the two bases' weights.",
                UserWarning,
                stacklevel=3,
            )
        return
    saved: dict[str, list[int]] = fingerprint.get("parameters", {})
    ours: dict[str, list[int]] = current["parameters"]
    missing = [n for n in saved if n not in ours]
    extra = [n for n in ours if n not in saved]
    reshaped = [f"{n} (saved {saved[n]}, this model {ours[n]})" for n in saved if n in ours and saved[n] != ours[n]]
    details = []
    for label, items in (("missing here", missing), ("not in the saved base", extra), ("shape differs", reshaped)):
        if items:
            details.append(f"{label}: {', '.join(items[:4])}{f' ... ({len(items)} in all)' if len(items) > 4 else ''}")
    if precision_note:
        details.append(precision_note)
    raise ValueError(
        f"The base model does not match the one the adapter in '{source}' was saved from "
        f"({'; '.join(details) or 'parameter order differs'}). Load the same base model (same checkpoint, "
        "architecture and head, e.g. the same num_labels)."
    )


# ---------------------------------------------------------------------- helpers
def _check_targets(model: nn.Module, adapter_names: list[str], config: AdaLoRAConfig, caller: str) -> None:
    """The adapters must be exactly the targets ``config`` selects, or a load would differ."""
    targeted = [n for n, _ in find_targets(model, config)]
    if sorted(targeted) != sorted(adapter_names):
        stray = sorted(set(adapter_names) - set(targeted))[:3]
        unadapted = sorted(set(targeted) - set(adapter_names))[:3]
        raise ValueError(
            f"{caller}: the model's adapters do not match config.target_modules={config.target_modules!r} "
            f"(adapters not targeted: {stray}; targeted but not adapted: {unadapted}). Pass the config the model "
            "was injected with."
        )


def check_whole(adapters: list[SVDAdapter], what: str) -> None:
    """Raise ``ValueError`` if DeepSpeed ZeRO-3 partitions the adapters: this process holds only its share of them.

    ``adalora.parallel.gathered_adapters`` replaces them with whole copies (a collective: on every process).
    """
    if any(hasattr(p, "ds_id") for a in adapters for p in a.adapter_parameters()):
        raise ValueError(
            f"{what}: DeepSpeed ZeRO-3 partitions this model's adapters over the processes. On every process, call "
            "adalora.parallel.save_adapter_collective(engine, directory, config), or read the model inside "
            "adalora.parallel.gathered_adapters(engine, config)."
        )


def _modules_to_save_state(model: nn.Module, config: AdaLoRAConfig) -> dict[str, torch.Tensor]:
    """Full state of every ``modules_to_save`` module, minus adapters inside it (saved as adapters)."""
    state: dict[str, torch.Tensor] = {}
    if not config.modules_to_save:
        return state
    for name, module in model.named_modules():
        if not name or not name_matches(name, config.modules_to_save):
            continue
        adapter_prefixes = [f"{n}." for n, m in module.named_modules() if n and isinstance(m, SVDAdapter)]
        for key, value in module.state_dict().items():
            if any(key.startswith(p) for p in adapter_prefixes):
                continue
            state[f"{name}.{key}"] = value.detach().cpu().clone()
    return state


def _describe_base_model(model: nn.Module) -> dict[str, Any]:
    model_type = type(model)
    hf_config = getattr(model, "config", None)
    config_dict = None
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        with contextlib.suppress(TypeError, ValueError):
            config_dict = json.loads(hf_config.to_json_string())
    return {
        "class": f"{model_type.__module__}.{model_type.__qualname__}",
        "name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "config": config_dict,
        "fingerprint": base_model_fingerprint(model),
        "precision": base_model_precision(model),
    }


def _read_weights(directory: Path, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load the weights file after checking its size, format, manifest and checksum (in that order)."""
    record = info["weights_file"]
    path = directory / record.get("name", WEIGHTS_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights '{path}' are missing. Save the adapter again.")
    data = path.read_bytes()
    if len(data) != record["bytes"]:
        what = "truncated" if len(data) < record["bytes"] else "longer than when it was saved"
        raise ValueError(
            f"adapter weights '{path}' are {what}: {len(data)} bytes, {CONFIG_NAME} records {record['bytes']}. "
            "The copy or the save was interrupted; save or copy the adapter again."
        )
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ValueError(f"adapter weights '{path}' are not a valid safetensors file: {error}") from error
    manifest: dict[str, dict[str, Any]] = info["tensors"]
    missing = sorted(set(manifest) - set(tensors))
    unexpected = sorted(set(tensors) - set(manifest))
    if missing or unexpected:
        raise ValueError(
            f"adapter weights '{path}' do not match {CONFIG_NAME}: missing tensors {missing[:4]}, unexpected "
            f"tensors {unexpected[:4]}. The two files come from different saves; save the adapter again."
        )
    for key, entry in manifest.items():
        tensor = tensors[key]
        if list(tensor.shape) != list(entry["shape"]):
            raise ValueError(
                f"tensor '{key}' in '{path}' has shape {list(tensor.shape)}, but {CONFIG_NAME} records "
                f"{entry['shape']}."
            )
        if _dtype_name(tensor.dtype) != entry["dtype"] or not tensor.is_floating_point():
            raise ValueError(
                f"tensor '{key}' in '{path}' has dtype {_dtype_name(tensor.dtype)}, but {CONFIG_NAME} records "
                f"{entry['dtype']} (adapter tensors are floating point)."
            )
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ValueError(
            f"adapter weights '{path}' fail their SHA-256 check: the file was modified or corrupted after saving. "
            "Save or copy the adapter again."
        )
    require_finite(tensors.items(), f"the adapter in '{directory}'")  # written before non-finite ones were refused
    return tensors


def _check_against_model(
    model: nn.Module, info: dict[str, Any], config: AdaLoRAConfig, tensors: dict[str, torch.Tensor], directory: Path
) -> None:
    """Every saved module exists in ``model`` with the saved type and shape, and the tensors fit it."""
    modules: dict[str, dict[str, Any]] = info["modules"]
    _check_targets_for_load(model, list(modules), config, directory)
    targets = dict(find_targets(model, config))
    for name, meta in modules.items():
        _check_module(name, targets[name], meta, config, tensors, directory)
    for key in info.get("modules_to_save_tensors", []):
        try:
            target = _get_tensor(model, key)
        except AttributeError:
            raise ValueError(f"saved module-to-save tensor '{key}' has no counterpart in the base model.") from None
        if target.shape != tensors[key].shape:
            raise ValueError(
                f"saved module-to-save tensor '{key}' has shape {list(tensors[key].shape)}, the base model's has "
                f"{list(target.shape)}."
            )


def _check_module(
    name: str,
    module: nn.Module | FusedWeight,
    meta: dict[str, Any],
    config: AdaLoRAConfig,
    tensors: dict[str, torch.Tensor],
    directory: Path,
) -> None:
    """The saved entry ``meta`` and its tensors fit ``module`` (a layer, or a fused expert weight) of the model."""
    adapter_cls = adapter_class_for(module)
    kind = f"a parameter of {type(module.block).__name__}" if isinstance(module, FusedWeight) else type(module).__name__
    if adapter_cls is None or adapter_cls.layer_type_name(module) != meta["type"]:
        raise ValueError(
            f"module '{name}' of the base model is {kind}, but the adapter in '{directory}' was saved for a "
            f"{meta['type']} layer."
        )
    reason = adapter_cls.unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"module '{name}' of the base model cannot be adapted: {reason}.")
    rank, d_out, d_in = int(meta["rank"]), int(meta["d_out"]), int(meta["d_in"])
    if not 0 <= rank <= config.init_r:
        raise ValueError(f"module '{name}': saved rank {rank} is outside [0, init_r={config.init_r}].")
    lead = [module.weight.shape[0]] if isinstance(module, FusedWeight) else []  # one matrix per expert
    expected = {"P": [*lead, d_out, rank], "E": [*lead, rank], "Q": [*lead, rank, d_in]}
    for attr, shape in expected.items():
        key = f"{name}.{attr}"
        if key not in tensors or list(tensors[key].shape) != shape:
            got = list(tensors[key].shape) if key in tensors else "nothing"
            raise ValueError(
                f"tensor '{key}' has shape {got}, but module '{name}' (d_out={d_out}, d_in={d_in}) at the saved "
                f"rank {rank} needs {shape}."
            )
    if adapter_cls.dims(module) != (d_out, d_in):
        raise ValueError(
            f"module '{name}' has weight shape {list(logical_shape(module.weight))} (an update of "
            f"{adapter_cls.dims(module)} as (d_out, d_in)), the adapter expects ({d_out}, {d_in})."
        )
    ranks = meta.get("expert_ranks")
    if lead and not (
        isinstance(ranks, list) and len(ranks) == lead[0] and all(isinstance(k, int) and 0 <= k <= rank for k in ranks)
    ):
        raise ValueError(
            f"module '{name}': expert_ranks {ranks!r} must list a rank in [0, {rank}] for each of its {lead[0]} "
            "experts (the file was edited?). Save the adapter again."
        )


def _check_targets_for_load(model: nn.Module, saved: list[str], config: AdaLoRAConfig, directory: Path) -> None:
    targeted = [n for n, _ in find_targets(model, config)]
    if sorted(targeted) != sorted(saved):
        raise ValueError(
            f"the adapter in '{directory}' has modules {sorted(set(saved) - set(targeted))[:3]} that "
            f"target_modules does not select in this model, or this model has targeted modules "
            f"{sorted(set(targeted) - set(saved))[:3]} without saved weights. Load onto the same base model."
        )


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    tensor = getattr(module, attr)
    if not torch.is_tensor(tensor):
        raise AttributeError(key)
    return tensor


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
