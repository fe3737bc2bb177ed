"""Text from a finished causal-LM run, to try it on a prompt: what ``adalora generate`` does.

The run's base model is loaded as training loaded it (the same ``--model``, the same ``--quantize`` and compute
precision), its adapter is put on it, and, with ``merged``, folded into the weights as ``adalora merge`` would (so
the two paths can be compared: under greedy decoding they give the same text up to float rounding). A fully
fine-tuned run's ``model/`` is loaded as it is. The prompt goes through the tokenizer's chat template as one user
turn when the tokenizer has one (unless told not to), else it is tokenised as training tokenised prompts. Decoding
is greedy unless a temperature is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files.adapter import load_adapter
from ..files.atomic import read_json
from ..merge import merge
from .directory import METRICS_FILE, RUN_FILE, is_unstarted, not_started, require_run_dir
from .hardware import autocast, resolve_device
from .model import causal_lm_path, load_causal_lm, quantize_base
from .quantize import QuantizationUnavailable, require_package
from .quiet import quiet_imports
from .settings import CAUSAL_LM, RunError, RunSettings

COMMAND = "adalora generate"


@dataclass
class RunModel:
    """A finished run's model, ready to generate.

    Attributes:
        tokenizer: the base model's tokenizer (a fully fine-tuned run's own).
        module: the causal LM with the run's adapter (or merged, or fully fine-tuned), in eval mode, on ``device``.
        device: where it computes.
        precision: the run's ``--precision``: generation runs under the same autocast as training's forward.
    """

    tokenizer: Any
    module: nn.Module
    device: str
    precision: str


def finished_run(path: str | Path) -> RunSettings:
    """The settings of the finished causal-LM run in ``path``.

    Raises:
        RunError: in one line, if ``path`` is no run of ours, a classification run, or a run that failed, never
            started or has not finished.
    """
    directory = require_run_dir(path, COMMAND)
    if is_unstarted(directory):
        raise RunError(f"{COMMAND} {directory}: {not_started(directory)}")
    try:
        run = read_json(directory / RUN_FILE)
        settings = RunSettings.from_dict(run["settings"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunError(f"{directory / RUN_FILE} cannot be read ({error}); the run directory is damaged") from None
    if settings.task != CAUSAL_LM:
        raise RunError(
            f"{COMMAND} {directory}: a classification run (--task {settings.task}) predicts labels, not text; "
            f"generate needs a run of --task {CAUSAL_LM}"
        )
    if "failure" in run:
        raise RunError(f"{COMMAND} {directory}: the run failed ({run['failure'].get('message')}); it left no weights")
    if not (directory / METRICS_FILE).is_file():
        raise RunError(
            f"{COMMAND} {directory}: the run has not finished (no {METRICS_FILE}); finish it with "
            f"adalora train --resume {directory}, or wait for it to end"
        )
    return settings


def load_run_model(path: str | Path, *, merged: bool = False, device: str = "auto") -> RunModel:
    """The model of the finished causal-LM run in ``path`` (module docstring), on ``device`` (``auto``: the GPU when
    there is one).

    Raises:
        RunError, LMError: in one line, if the run cannot be used (:func:`finished_run`), its base model cannot be
            found or loaded, or ``--quantize``'s package is missing.
    """
    settings = finished_run(path)
    directory, device = Path(path), resolve_device(device)
    if settings.method == "full":
        tokenizer, module = load_causal_lm(directory / "model")
    else:
        tokenizer, module = load_causal_lm(causal_lm_path(settings.model))
        if settings.quantize != "none":
            try:
                require_package(settings.quantize)
            except QuantizationUnavailable as error:
                raise RunError(str(error)) from None
            quantize_base(module, settings.replace(device=device), settings.value("modules_to_save") or ())
        load_adapter(module, directory / "adapter")
        if merged:
            merge(module)
    return RunModel(tokenizer, module.to(device).eval(), device, settings.precision)


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """The prompt's token ids, ``(1, length)``: as one user turn of the tokenizer's chat template with the
    assistant's turn opened (when ``chat_template`` and the tokenizer has one; the template writes its own special
    tokens), else tokenised as training tokenises prompts (with the tokenizer's special tokens, e.g. BOS)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def generate(
    run_model: RunModel,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    chat_template: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The completion of ``prompt`` (without the prompt): greedy (``temperature`` 0) or sampled at ``temperature``
    (seeded by ``seed``), at most ``max_new_tokens`` tokens, ended early by the tokenizer's EOS (special tokens are
    not shown)."""
    tokenizer, model = run_model.tokenizer, run_model.module
    ids = prompt_ids(tokenizer, prompt, chat_template).to(run_model.device)
    options = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    torch.manual_seed(seed)
    with quiet_imports():
        from transformers import GenerationConfig
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **options,
    )
    with torch.no_grad(), autocast(run_model.device, run_model.precision):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
