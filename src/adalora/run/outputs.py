"""What a finished run leaves in its output directory: the trained weights, the rank pattern, the allocation
history, the figures and, last (it marks the run complete), ``metrics.json``; and what a failed one leaves:
its ``run.json`` saying why, and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import parallel
from ..allocator import RankAllocator
from ..files.atomic import atomic_directory, read_json, write_json
from ..layers import find_adapters, matrix_ranks
from .defaults import training_rank
from .directory import (
    BUDGET_FILE,
    CHECKPOINT_FILE,
    HEATMAP_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    RANKS_FILE,
    RUN_FILE,
)
from .method import Method
from .model import Model
from .plots import plot_budget_curve, plot_rank_heatmap
from .settings import RunSettings
from .tasks import AnyTask, kind_of
from .words import plural


def rank_pattern(model: Model, method: Method) -> dict[str, int]:
    """Final rank of every adapted matrix (each expert of a fused MoE weight apart; empty for full fine-tuning)."""
    if method.allocator is not None:
        return method.allocator.rank_pattern()
    return matrix_ranks(find_adapters(model.module))


def save_weights(settings: RunSettings, task: AnyTask, model: Model, method: Method, output_dir: Path) -> Path:
    """``adapter/`` (adapter methods, via :func:`adalora.files.adapter.save_adapter`) or ``model/`` (full
    fine-tuning). Every process calls it (FSDP2 gathers the shards); rank 0 writes."""
    if method.config is None:
        target = output_dir / "model"
        if parallel.is_main_process():
            # Written aside and swapped in whole; its files then follow the umask (safetensors makes them 0600).
            with atomic_directory(target, marker="config.json") as tmp:
                model.module.save_pretrained(tmp)
                model.tokenizer.save_pretrained(tmp)
        return target
    metadata = {
        "model": str(model.path),
        "task": task.name,
        "num_labels": task.num_labels,
        "label_names": list(task.label_names),
        "method": settings.method,
        "max_length": settings.max_length,
    }
    target = output_dir / "adapter"
    parallel.save_adapter_collective(model.module, target, method.config, metadata)
    return target


def allocation_history(allocator: RankAllocator, budgets: list[int]) -> dict[str, Any]:
    """The schedule, b(t) at every step and every allocation ``{step, budget, ranks}``."""
    names, config = allocator.names, allocator.config
    return {
        "schedule": {
            "init_budget": allocator.init_budget,
            "target_budget": allocator.target_budget,
            "warmup_steps": config.warmup_steps,
            "final_steps": config.final_steps,
            "total_steps": config.total_steps,
            "mask_interval": config.mask_interval,
        },
        "budget": budgets,
        "allocations": [
            {"step": a.step, "budget": a.budget, "ranks": dict(zip(names, a.ranks, strict=True))}
            for a in allocator.history
        ],
    }


def draw_figures(output_dir: str | Path) -> list[Path]:
    """(Re)draw ``rank_heatmap.png`` and ``budget_curve.png`` from a run's JSON files; returns the files drawn."""
    output_dir = Path(output_dir)
    drawn: list[Path] = []
    run = read_json(output_dir / RUN_FILE)
    settings, derived = run["settings"], run["derived"]
    ranks = read_json(output_dir / RANKS_FILE) if (output_dir / RANKS_FILE).is_file() else {}
    if ranks:
        title = f"Final ranks of {derived.get('name', derived['task'])} (total {sum(ranks.values())})"
        config = settings["adalora"]
        rank = training_rank(settings["method"], settings["lora_r"], config["target_r"], config["init_r"])
        drawn.append(plot_rank_heatmap(ranks, output_dir / HEATMAP_FILE, init_r=rank, title=title))
    history = read_json(output_dir / HISTORY_FILE) if (output_dir / HISTORY_FILE).is_file() else {}
    if history.get("budget"):
        schedule = history["schedule"]
        phases = {
            "warmup_steps": schedule["warmup_steps"],
            "final_start": schedule["total_steps"] - schedule["final_steps"],
        }
        drawn.append(
            plot_budget_curve(
                history["budget"],
                output_dir / BUDGET_FILE,
                allocations=history["allocations"],
                phases=phases,
                title=f"Budget b(t): {schedule['init_budget']} -> {schedule['target_budget']} singular values",
            )
        )
    return drawn


def run_metrics(
    settings: RunSettings,
    derived: dict[str, Any],
    state: dict[str, Any],
    ranks: dict[str, int],
    seconds: float,
    files: list[Path],
) -> dict[str, Any]:
    """The content of ``metrics.json``: per-epoch records, final and best score, sizes, time, what was written
    (``files``: the weights, then the figures)."""
    final = state["epochs"][-1] if state["epochs"] else {}
    metric = kind_of(settings.task).metric
    best = min if metric == "perplexity" else max
    weights, *figures = files
    metrics = {
        "task": derived["task"],
        "method": settings.method,
        "model": derived["model_path"],
        f"eval_{metric}": final.get(f"eval_{metric}"),
        "eval_loss": final.get("eval_loss"),
        f"best_eval_{metric}": best((e[f"eval_{metric}"] for e in state["epochs"]), default=None),
        "epochs": state["epochs"],
        "train_examples": derived["train_examples"],
        "eval_examples": derived["eval_examples"],
        "total_steps": derived["total_steps"],
        "trainable_parameters": derived["trainable_parameters"],
        "final_total_rank": sum(ranks.values()) if ranks else None,
        "train_seconds": round(seconds, 1),
        "weights": weights.name,
        "figures": [f.name for f in figures],
        "completed": True,
    }
    if metric == "accuracy":  # the collapse guard's verdict on the final epoch (run/collapse.py)
        metrics.update(collapse=state.get("collapse"), collapse_epochs=state.get("collapse_epochs", []))
    if "eval_before" in state:  # causal-lm: the held-out split measured before training
        metrics.update({f"eval_{k}_before": v for k, v in state["eval_before"].items()})
    return metrics


def finish(
    settings: RunSettings, task: AnyTask, model: Model, method: Method, output_dir: Path, state: dict, seconds: float
) -> dict[str, Any]:
    """Write weights, rank pattern, allocation history, figures and (last, as the completion mark) metrics;
    remove the checkpoint. Every process calls it (saving the adapter is collective); only rank 0 writes and
    returns the metrics (the others return an empty dict)."""
    weights = save_weights(settings, task, model, method, output_dir)
    ranks = rank_pattern(model, method)
    if not parallel.is_main_process():
        return {}
    if ranks:
        write_json(output_dir / RANKS_FILE, ranks)
    if method.allocator is not None:
        write_json(output_dir / HISTORY_FILE, allocation_history(method.allocator, state["budgets"]))
    figures = draw_figures(output_dir)
    derived = read_json(output_dir / RUN_FILE)["derived"]
    metrics = run_metrics(settings, derived, state, ranks, seconds, [weights, *figures])
    write_json(output_dir / METRICS_FILE, metrics)
    remove_checkpoints(output_dir)
    return metrics


def fail(output_dir: Path, failure: dict[str, Any]) -> None:
    """Record a failed run (e.g. :class:`~adalora.run.divergence.Diverged`'s record) under ``"failure"`` in its
    ``run.json`` and remove its checkpoints: a failed run is not resumed (``--resume`` says why) and leaves no
    weights; ``--overwrite`` starts it over. Rank 0 writes."""
    if not parallel.is_main_process():
        return
    write_json(output_dir / RUN_FILE, read_json(output_dir / RUN_FILE) | {"failure": failure})
    remove_checkpoints(output_dir)


def remove_checkpoints(output_dir: Path) -> None:
    """Both checkpoints of the run (a run that has ended needs none)."""
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        (output_dir / name).unlink(missing_ok=True)


def summary(settings: RunSettings, metrics: dict[str, Any], output_dir: Path) -> str:
    """The last line of a run: the final score (and the one before training, for causal-lm), time, where."""
    metric = kind_of(settings.task).metric
    before = metrics.get(f"eval_{metric}_before")
    before_text = "" if before is None else f" (before training {before:.2f})"
    return (
        f"eval {metric} {metrics[f'eval_{metric}']:.4f}{before_text} after {plural(settings.epochs, 'epoch')} "
        f"({metrics['train_seconds']:.0f} s); outputs in {output_dir}"
    )
