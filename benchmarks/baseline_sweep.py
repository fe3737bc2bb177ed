"""Seed sweep of ``adalora train`` at its default learning rates, and the small lr probe that chose them.

Each run is one ``python -m adalora train`` process (exactly what a user types), sized like the runs that
found LoRA collapsing at the old default learning rate: 2,000 training examples, ``--max-length 64``, batch 32,
2 epochs (124 optimizer steps), ``--threads 1``, one run at a time (the machine is shared).

- ``--probe``: LoRA at r = 2 and r = 8, a few learning rates x 3 seeds, evaluated on a validation slice of
  500 examples carved from the task's *training* split (after the 2,000 training examples; never the test
  split). This is the evidence for the defaults in ``src/adalora/run/defaults.py``.
- default (the sweep): LoRA (rank r) and AdaLoRA (init 1.5 r -> target r) at r = 2 and 8, seeds 0..4, at the
  CLI's default learning rate (no ``--lr``), evaluated on the first 1,000 examples of the task's held-out
  split. Reported as collapses / runs (``adalora.run.collapse``) and accuracy mean +- std.

Resumable: every finished run is written to ``benchmarks/results/baseline_sweep.json`` at once; started
again, the script skips finished runs and continues an interrupted one from its checkpoint (``--resume``).
Run directories go under ``benchmarks/runs/baseline_sweep/`` (git-ignored).

Usage:
    nohup python benchmarks/baseline_sweep.py --probe > benchmarks/runs/baseline_probe.log 2>&1 &
    nohup python benchmarks/baseline_sweep.py > benchmarks/runs/baseline_sweep.log 2>&1 &
    python benchmarks/baseline_sweep.py --table      # print the tables from the results file, run nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = ROOT / "benchmarks" / "results" / "baseline_sweep.json"
RUNS = ROOT / "benchmarks" / "runs" / "baseline_sweep"

TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 2000, 500, 1000
COMMON = ["--max-length", "64", "--batch-size", "32", "--epochs", "2", "--threads", "1", "--no-progress"]
TASKS = ("rotten-tomatoes", "trec")
BUDGETS = (2, 8)
METHODS = ("adalora", "lora")
SWEEP_SEEDS = (0, 1, 2, 3, 4)
PROBE_LRS = {2: (1e-3, 2e-3), 8: (1e-3, 2e-3)}  # LoRA rank -> learning rates tried
PROBE_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Spec:
    """One run: ``phase`` is "probe" (validation slice, explicit lr) or "sweep" (test slice, default lr)."""

    phase: str
    task: str
    method: str
    r: int
    seed: int
    lr: float | None = None

    @property
    def key(self) -> str:
        lr = f"/lr{self.lr:g}" if self.lr is not None else ""
        return f"{self.phase}/{self.task}/{self.method}/r{self.r}{lr}/s{self.seed}"

    def rank_args(self) -> list[str]:
        if self.method == "lora":
            return ["--method", "lora", "--lora-r", str(self.r), "--target-r", str(self.r)]
        return ["--method", self.method, "--init-r", str(round(1.5 * self.r)), "--target-r", str(self.r)]


def probe_specs(task: str, seeds: tuple[int, ...] = PROBE_SEEDS) -> list[Spec]:
    # Seed-major: the first seed of every (rank, lr) comes first.
    return [Spec("probe", task, "lora", r, seed, lr) for seed in seeds for r, lrs in PROBE_LRS.items() for lr in lrs]


def sweep_specs(tasks: tuple[str, ...]) -> list[Spec]:
    """Per task: the first seed of every cell, then every seed of LoRA r = 2 (the cell that collapsed at the
    old default learning rate), then the other cells seed by seed, so that an interrupted sweep has answered the
    main question first and has every cell started."""
    specs = []
    for task in tasks:
        cells = [(method, r) for method in METHODS for r in BUDGETS]
        first = [Spec("sweep", task, m, r, SWEEP_SEEDS[0]) for m, r in cells]
        lora_2 = [Spec("sweep", task, "lora", min(BUDGETS), seed) for seed in SWEEP_SEEDS[1:]]
        rest = [Spec("sweep", task, m, r, s) for s in SWEEP_SEEDS[1:] for m, r in cells if (m, r) != ("lora", 2)]
        specs += first + lora_2 + rest
    return specs


# ---------------------------------------------------------------------------------------------- data
def task_pool(task: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(training pool, held-out split) of a built-in task, in the order ``adalora train`` reads them."""
    from adalora.run.data import builtin_task

    data = builtin_task(task)
    return (
        list(zip(data.train.texts, data.train.labels, strict=True)),
        list(zip(data.eval.texts, data.eval.labels, strict=True)),
    )


def probe_files(task: str) -> dict[str, Path]:
    """train.jsonl (the first 2,000 training examples: the sweep's training set) and val.jsonl (the next 500)."""
    pool, _ = task_pool(task)
    directory = RUNS / "data" / task
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", pool[:TRAIN_SIZE]), ("val", pool[TRAIN_SIZE : TRAIN_SIZE + VAL_SIZE])):
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
        files[split] = path
    return files


def label_counts(task: str) -> tuple[list[int], list[int]]:
    """Label counts of the 2,000 training examples and of the sweep's 1,000 test examples."""
    pool, test = task_pool(task)
    train, held = Counter(y for _, y in pool[:TRAIN_SIZE]), Counter(y for _, y in test[:TEST_SIZE])
    classes = range(max(max(train), max(held)) + 1)
    return [train[c] for c in classes], [held[c] for c in classes]


# ---------------------------------------------------------------------------------------------- runs
def command(spec: Spec, run_dir: Path) -> list[str]:
    base = [sys.executable, "-m", "adalora", "train"]
    if (run_dir / "run.json").is_file():  # interrupted: continue from its checkpoint with the saved settings
        return [*base, "--resume", str(run_dir), "--no-progress"]
    args = [*base, *COMMON, *spec.rank_args(), "--seed", str(spec.seed), "--output-dir", str(run_dir), "--overwrite"]
    if spec.phase == "probe":
        files = probe_files(spec.task)
        args += ["--train", str(files["train"]), "--eval", str(files["val"]), "--max-train", "all"]
        args += ["--max-eval", "all", "--lr", f"{spec.lr:g}"]
    else:
        args += ["--task", spec.task, "--max-train", str(TRAIN_SIZE), "--max-eval", str(TEST_SIZE)]
    return args


def execute(spec: Spec) -> dict[str, Any]:
    """Run (or finish) one training process and return its record for the results file."""
    run_dir = RUNS / spec.key.replace("/", "_")
    # The process's output goes beside the run directory: `adalora train` refuses an output directory that
    # holds anything but an adalora run.
    log_path = run_dir.with_name(run_dir.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    started, ran = time.perf_counter(), not (run_dir / "metrics.json").is_file()
    if ran:  # else finished, but not yet recorded (the script was stopped): record it, time unknown
        with log_path.open("a") as log:
            done = subprocess.run(command(spec, run_dir), env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{spec.key}: exit status {done.returncode}; see {log_path}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    derived = json.loads((run_dir / "run.json").read_text())["derived"]
    return {
        "phase": spec.phase,
        "task": spec.task,
        "method": spec.method,
        "r": spec.r,
        "seed": spec.seed,
        "lr": derived["lr"],
        "eval_split": "val" if spec.phase == "probe" else "test",
        "accuracy": metrics["eval_accuracy"],
        "epochs": [{k: e[k] for k in ("epoch", "train_loss", "eval_accuracy", "eval_loss")} for e in metrics["epochs"]],
        "collapse_reported": metrics.get("collapse"),  # what the run's own guard said (None before the guard)
        "trainable_parameters": metrics["trainable_parameters"],
        "total_steps": metrics["total_steps"],
        "wall_seconds": round(time.perf_counter() - started, 1) if ran else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def load_results() -> dict[str, Any]:
    if RESULTS_FILE.is_file():
        return json.loads(RESULTS_FILE.read_text())
    return {"runs": {}}


def save_results(results: dict[str, Any]) -> None:
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS_FILE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, RESULTS_FILE)


# ---------------------------------------------------------------------------------------------- tables
def collapsed(record: dict[str, Any], counts: dict[str, tuple[list[int], list[int]]]) -> bool:
    """Whether the run collapsed, by :func:`adalora.run.collapse.detect_collapse` on its final epoch."""
    from adalora.run.collapse import detect_collapse

    train, held = counts[record["task"]]
    if record["eval_split"] == "val":  # the probe's validation slice: the next 500 of the training pool
        pool, _ = task_pool(record["task"])
        val = Counter(y for _, y in pool[TRAIN_SIZE : TRAIN_SIZE + VAL_SIZE])
        held = [val[c] for c in range(len(train))]
    last = record["epochs"][-1]
    return detect_collapse(last["train_loss"], last["eval_accuracy"], train, held) is not None


def summarise(results: dict[str, Any], phase: str) -> list[list[str]]:
    runs = [r for r in results["runs"].values() if r["phase"] == phase]
    counts = {task: label_counts(task) for task in sorted({r["task"] for r in runs})}
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for record in runs:
        cells.setdefault((record["task"], record["method"], record["r"], record["lr"]), []).append(record)
    rows = []
    for (task, method, r, lr), records in sorted(cells.items()):
        accs = [100 * rec["accuracy"] for rec in records]
        n_collapsed = sum(collapsed(rec, counts) for rec in records)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rank = f"{round(1.5 * r)} -> {r}" if method == "adalora" else str(r)
        rows.append(
            [task, method, rank, f"{lr:g}", f"{n_collapsed}/{len(records)}", f"{statistics.mean(accs):.2f} ± {std:.2f}"]
        )
    return rows


def print_tables(results: dict[str, Any], planned: dict[str, list[Spec]]) -> None:
    """The probe's and the sweep's tables; "done of planned" counts this invocation's runs (``planned``)."""
    for phase, title in (("probe", "lr probe (validation slice)"), ("sweep", "seed sweep at the defaults (test)")):
        rows = summarise(results, phase)
        done = sum(1 for r in results["runs"].values() if r["phase"] == phase)
        if phase in planned:
            finished = sum(spec.key in results["runs"] for spec in planned[phase])
            done_text = f"{finished} of the {len(planned[phase])} runs asked for done ({done} in the file)"
        else:
            done_text = f"{done} runs done"
        print(f"\n{title}: {done_text}")
        if rows:
            headers = ["task", "method", "rank", "lr", "collapses", "accuracy % (mean ± std)"]
            print("| " + " | ".join(headers) + " |")
            print("|" + "---|" * len(headers))
            for row in rows:
                print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="the lr probe (LoRA, validation slice)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks of the sweep")
    parser.add_argument("--seeds", nargs="+", type=int, help="probe only: these seeds (default 0 1 2)")
    parser.add_argument("--table", action="store_true", help="run nothing: record finished runs, print the tables")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))

    results = load_results()
    if args.probe:
        specs = probe_specs("rotten-tomatoes", tuple(args.seeds) if args.seeds else PROBE_SEEDS)
        planned = {"probe": probe_specs("rotten-tomatoes")}
    else:
        specs = sweep_specs(tuple(args.tasks))
        planned = {"sweep": specs}
    for spec in specs:
        if spec.key in results["runs"]:
            continue
        if args.table and not (RUNS / spec.key.replace("/", "_") / "metrics.json").is_file():
            continue  # --table runs nothing; it only records runs that finished while no script was recording
        print(f"{time.strftime('%H:%M:%S')} {spec.key} ...", flush=True)
        record = execute(spec)
        results = load_results()  # another invocation (the probe, the sweep) may have added runs meanwhile
        results["runs"][spec.key] = record
        save_results(results)
        last = record["epochs"][-1]
        print(
            f"{time.strftime('%H:%M:%S')} {spec.key}: lr {record['lr']:g}, accuracy {record['accuracy']:.4f}, "
            f"train loss {last['train_loss']:.4f}, {record['wall_seconds']} s",
            flush=True,
        )
    print_tables(results, planned)


if __name__ == "__main__":
    main()
