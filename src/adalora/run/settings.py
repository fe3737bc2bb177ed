"""What a run can be told: :class:`RunSettings`, the allowed range of every number in it, the defaults that
depend on the model family or the method, and the names of the files a run writes.

Both the command line (``adalora train``, which turns every range into an argparse check naming the flag) and
:func:`adalora.run.train.run` (which checks the settings it is given) read the same :data:`LIMITS` table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["adalora", "lora", "pruned-lora", "full"]
METHODS: tuple[str, ...] = ("adalora", "lora", "pruned-lora", "full")

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # --device: see hardware.py

# The files of an output directory (docs/cli.md, "Output directory").
MARKER_FILE = ".adalora-run"  # written first: says the directory is a run of ours (see directory.py)
LOCK_FILE = ".adalora-run.lock"  # held by the one command using the directory (lock.py); removed after it
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before (files/checkpoint.py: previous_checkpoint)
METRICS_FILE = "metrics.json"
RANKS_FILE = "rank_pattern.json"
HISTORY_FILE = "allocation_history.json"
HEATMAP_FILE = "rank_heatmap.png"
BUDGET_FILE = "budget_curve.png"
OUTPUTS = (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, METRICS_FILE, RANKS_FILE, HISTORY_FILE, HEATMAP_FILE, BUDGET_FILE)
OUTPUT_DIRS = ("adapter", "model", "tensorboard")

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


class RunError(ValueError):
    """The settings cannot make a run (unknown model path, schedule too short, ...); one-line message."""


@dataclass(frozen=True)
class RunSettings:
    """Everything ``adalora train`` can set; stored in ``run.json`` so that ``--resume`` needs nothing else.

    The defaults make the default run: the packaged all-MiniLM-L6-v2 on Rotten Tomatoes sentences, a few
    minutes on 2 CPU cores (numbers and the choice of defaults in docs/cli.md). Schedule lengths left None are
    fractions of the total.
    """

    # data
    task: str = "rotten-tomatoes"  # built-in task, used when no --train/--eval files are given; "causal-lm":
    # next-token training of a decoder on --train (prompt/completion or text) or built-in text (causal_lm.py)
    train_file: str | None = None  # the user's CSV/TSV/JSONL training file
    eval_file: str | None = None  # the user's evaluation file (same columns)
    text_column: str = "text"
    text_pair_column: str | None = None  # second text of sentence-pair tasks
    label_column: str = "label"
    max_train: int | None = 3000  # first N training examples (the built-in split is shuffled); None = all
    max_eval: int | None = None  # first N eval examples; None = all
    max_length: int = 48  # sequences are truncated to this many tokens; a batch is cut to its longest row
    # model and method
    model: str | None = None  # local Hugging Face model directory; None = the packaged all-MiniLM-L6-v2
    method: str = "adalora"  # adalora | lora | pruned-lora | full
    target_modules: tuple[str, ...] | None = None  # None = every attention and FFN matrix (DEFAULT_TARGETS)
    modules_to_save: tuple[str, ...] | None = None  # None = the classification head
    init_r: int = 12  # AdaLoRA / pruned LoRA: rank of every matrix at the start (1.5 x target)
    target_r: int | None = 8  # average final rank; the LoRA baseline uses it as its fixed rank
    target_budget: int | None = None  # final total rank over all matrices, instead of target_r
    lora_r: int | None = None  # LoRA's fixed rank; None = target_r (the same final budget as AdaLoRA)
    alpha: float = 16.0  # adapter scale alpha / r
    dropout: float = 0.0  # dropout on the adapter input
    # budget schedule (optimizer steps); about half of training decreases the budget
    warmup_fraction: float = 0.2  # t_i = fraction x T when warmup_steps is None
    final_fraction: float = 0.3  # t_f = fraction x T when final_steps is None
    warmup_steps: int | None = None
    final_steps: int | None = None
    mask_interval: int = 10  # DeltaT: reallocate every this many steps
    importance: str = "smoothed"  # smoothed | sensitivity | magnitude
    orth_reg_weight: float = 0.1  # gamma of the orthogonality regulariser (AdaLoRA only)
    beta1: float = 0.85
    beta2: float = 0.85
    # optimisation
    epochs: int = 2
    batch_size: int = 32  # the micro-batch: examples per forward/backward pass (over all processes)
    grad_accum: int = 1  # micro-batches per optimizer step: a step sees batch_size x grad_accum examples
    lr: float | None = None  # AdamW learning rate; None = run.defaults.default_lr of the method and scale
    weight_decay: float = 0.0
    lr_warmup_fraction: float = 0.06  # linear LR warm-up, then linear decay to 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # run
    eval_batch_size: int = 128
    save_every: int = 100  # checkpoint every N optimizer steps (and at every epoch end)
    threads: int | None = None  # torch threads; None = chosen when the run starts (threads.py) and saved
    tensorboard: bool = False
    on_misuse: str = "warn"  # warn | error: allocator stepped wrongly (see RankAllocator)
    # hardware (hardware.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps; resolved when the run starts and saved
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass; parameters stay float32
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    quantize: str = "none"  # none | bnb-4bit | bnb-8bit | torchao-nf4 | torchao-int8: the frozen base's weights

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunError(f"{RUN_FILE} has unknown settings {unknown}: written by another adalora version?")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        values.setdefault("device", "cpu")  # runs saved before --device existed ran on the CPU
        values.setdefault("quantize", "none")
        return cls(**values)

    def check(self) -> None:
        """Raise :class:`RunError` naming the flag of the first setting outside its range (:data:`LIMITS`)."""
        if self.method not in METHODS:
            raise RunError(f"unknown --method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise RunError(f"unknown --precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise RunError(f"--device {self.device}: not a device; use auto, cpu, cuda, cuda:N or mps")
        if self.quantize != "none":
            _check_quantize(self.quantize, self.method)
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None:
                problem = limit.problem(value)
                if problem:
                    raise RunError(f"{flag(name)} {problem}")


def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Limit:
    """The allowed values of one numeric setting: an int or a float in [low, high] (ends open where said)."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed

    def describe(self) -> str:
        """The range in words, e.g. ``a number > 0`` or ``an integer >= 1``."""
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        return what

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is allowed, else what is wrong with it (``must be ..., got ...``)."""
        wrong = f"must be {self.describe()}, got {value}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return wrong
        if self.kind is int and not isinstance(value, int):
            return wrong
        if not math.isfinite(value):
            return wrong
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return wrong
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return wrong
        return None


_COUNT, _STEPS, _FRACTION = Limit(int, 1), Limit(int, 0), Limit(float, 0, 1, high_open=True)
# The range of every numeric setting. Counts start at 1, step counts at 0; EMA factors and fractions of
# training lie in [0, 1). max_train/max_eval take 'all' on the command line (None here).
LIMITS: dict[str, Limit] = {
    "max_train": _COUNT,
    "max_eval": _COUNT,
    "max_length": _COUNT,
    "init_r": _COUNT,
    "target_r": _COUNT,
    "target_budget": _COUNT,
    "lora_r": _COUNT,
    "alpha": Limit(float, 0, low_open=True),
    "dropout": _FRACTION,
    "warmup_fraction": _FRACTION,
    "final_fraction": _FRACTION,
    "warmup_steps": _STEPS,
    "final_steps": _STEPS,
    "mask_interval": _COUNT,
    "orth_reg_weight": Limit(float, 0),
    "beta1": _FRACTION,
    "beta2": _FRACTION,
    "epochs": _COUNT,
    "batch_size": _COUNT,
    "grad_accum": _COUNT,
    "lr": Limit(float, 0, low_open=True),
    "weight_decay": Limit(float, 0),
    "lr_warmup_fraction": Limit(float, 0, 1),
    "max_grad_norm": Limit(float, 0),  # 0 on the command line = no clipping (None here)
    "seed": Limit(int, 0),
    "eval_batch_size": _COUNT,
    "save_every": _COUNT,
    "threads": _COUNT,
}


def _check_quantize(method: str, training: str) -> None:
    """``--quantize``: a known method, not with full fine-tuning, and its package installed (checked up front)."""
    from .quantize import METHODS as QUANTIZE_METHODS
    from .quantize import QuantizationUnavailable, require_package

    if method not in QUANTIZE_METHODS:
        raise RunError(f"unknown --quantize '{method}'; choose none or one of {', '.join(QUANTIZE_METHODS)}")
    if training == "full":
        raise RunError(
            f"--quantize {method} freezes the base weights in {method.split('-')[-1]}, so --method full has nothing "
            "to train; use an adapter method (adalora, lora, pruned-lora) or drop --quantize"
        )
    try:
        require_package(method)
    except QuantizationUnavailable as error:
        raise RunError(str(error)) from None
