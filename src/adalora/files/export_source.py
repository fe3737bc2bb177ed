"""What every export format reads: the trained updates plus what is known about the base model.

An :class:`ExportSource` is built from a model with adapters (:meth:`ExportSource.from_model`) or from a saved
adapter directory (:meth:`ExportSource.from_adapter_dir`, no model loaded), so each format writer (PEFT, GGUF,
rank pattern; see :mod:`adalora.files.exports`) is written once and works for both.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AdaLoRAConfig
from ..finite import require_finite
from ..layers import find_adapters, unwrap_model
from .adapter import _modules_to_save_state, _read_weights, check_whole, read_adapter_config
from .updates import ModuleUpdate, updates_from_adapter, updates_from_model

# transformers' auto-class tables, in the order they are tried, and the PEFT task type each one means.
# CAUSAL_LM comes first: some classes (e.g. ...ForConditionalGeneration decoders) sit in several tables.
_TASK_TABLES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)


def peft_task_type(class_path: str | None) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...), else None.

    Args:
        class_path: the base model's class as adapter files record it, e.g.
            ``"transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"``; a bare class name also works.

    Returns:
        The task type, or None for a class that no transformers auto class lists (a custom ``nn.Module``):
        PEFT then loads the adapter as a plain ``PeftModel``.
    """
    if not class_path:
        return None
    module_name, _, class_name = class_path.rpartition(".")
    if module_name and not module_name.startswith("transformers."):
        return None
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # transformers is optional for adalora itself
        return None
    for table_name, task_type in _TASK_TABLES:
        for value in getattr(modeling_auto, table_name, {}).values():
            names = value if isinstance(value, (tuple, list)) else (value,)
            if class_name in names:
                return task_type
    return None


@dataclass(frozen=True)
class ExportSource:
    """The trained updates of one adapter and its context, as the export formats need them.

    Attributes:
        updates: every adapted module's kept triplets and scale (rank-0 modules included; writers skip them).
        modules_to_save: full state of ``config.modules_to_save`` (e.g. ``classifier.weight``), keyed by name.
        config: the configuration the adapters were trained with.
        base_class: the base model's class path (``transformers.models....LlamaForCausalLM``), if known.
        base_config: the base model's transformers config as a dict (head counts, layer count, ...), if known.
        base_model_name: the name to record for the base model (a hub id or the path the user gave), if known.
        metadata: the adapter file's user metadata (``save_adapter(..., metadata=...)``); empty for a model.
    """

    updates: list[ModuleUpdate]
    modules_to_save: dict[str, torch.Tensor]
    config: AdaLoRAConfig
    base_class: str | None = None
    base_config: dict[str, Any] | None = None
    base_model_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every format writes from an ExportSource: one check refuses a diverged adapter in all of them.
        factors = [(f"{u.name}.{k}", getattr(u.factors, k)) for u in self.updates for k in ("P", "E", "Q")]
        require_finite([*factors, *self.modules_to_save.items()], "the adapter to export")

    @property
    def task_type(self) -> str | None:
        """PEFT's task type of the base model class (see :func:`peft_task_type`)."""
        return peft_task_type(self.base_class)

    @classmethod
    def from_model(cls, model: nn.Module, config: AdaLoRAConfig, base_model_name: str | None = None) -> ExportSource:
        """The updates of ``model`` (masked or compacted; a compiled or DDP wrapper is looked through).

        Args:
            model: a model with AdaLoRA adapters.
            config: the configuration it was injected with (dropout, modules_to_save).
            base_model_name: default: the model's ``config.name_or_path``.

        Raises:
            ValueError: if the model has no adapters, or DeepSpeed ZeRO-3 partitions them (export inside
                ``adalora.parallel.gathered_adapters``).
        """
        model = unwrap_model(model)
        named = find_adapters(model)
        if not named:
            raise ValueError("the model has no AdaLoRA adapters to export. Call adalora.inject(model, config) first.")
        check_whole([a for _, a in named], "export")
        described = _describe_base_model_light(model)
        return cls(
            updates_from_model(model),
            _modules_to_save_state(model, config),
            config,
            described["class"],
            described["config"],
            base_model_name or described["name_or_path"],
        )

    @classmethod
    def from_adapter_dir(cls, directory: str | os.PathLike[str], base_model_name: str | None = None) -> ExportSource:
        """The updates of a saved adapter directory (all the checks of :func:`read_adapter_config` apply).

        Args:
            directory: an adapter directory written by ``save_adapter``.
            base_model_name: default: the ``"model"`` recorded in the adapter's metadata, else the base
                model's ``name_or_path`` recorded at save time.
        """
        directory = Path(directory)
        info = read_adapter_config(directory)
        tensors = _read_weights(directory, info)
        base = info.get("base_model") or {}
        metadata = info.get("metadata") or {}
        return cls(
            updates_from_adapter(info, tensors),
            {key: tensors[key] for key in info.get("modules_to_save_tensors", [])},
            AdaLoRAConfig.from_dict(info["config"]),
            base.get("class"),
            base.get("config"),
            base_model_name or metadata.get("model") or base.get("name_or_path"),
            metadata,
        )


def _describe_base_model_light(model: nn.Module) -> dict[str, Any]:
    """Class, name and transformers config of ``model`` as ``save_adapter`` records them (no fingerprint)."""
    hf_config = getattr(model, "config", None)
    config_dict = None
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        with contextlib.suppress(TypeError, ValueError):
            config_dict = json.loads(hf_config.to_json_string())
    model_type = type(model)
    return {
        "class": f"{model_type.__module__}.{model_type.__qualname__}",
        "name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "config": config_dict,
    }
