"""Figures of a run: the final rank of every adapted matrix (layers x matrix types, as the paper's figure of
the rank distribution) and the budget b(t) over the optimizer steps.

matplotlib is imported only inside the drawing functions, with the non-interactive Agg backend, so that
``import adalora`` stays light and plots work on machines without a display. A figure is written like every
other file of a run (files/atomic.py): whole or not at all, never an empty PNG on a full disk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files.atomic import atomic_write

# Paper symbols for the matrix types of common architectures (BERT/DeBERTa, Llama, GPT-2); others keep
# their module name.
MATRIX_SYMBOLS = {
    "attention.self.query": "Wq",
    "attention.self.key": "Wk",
    "attention.self.value": "Wv",
    "attention.output.dense": "Wo",
    "intermediate.dense": "Wf1",
    "output.dense": "Wf2",
    "attention.self.query_proj": "Wq",
    "attention.self.key_proj": "Wk",
    "attention.self.value_proj": "Wv",
    "self_attn.q_proj": "Wq",
    "self_attn.k_proj": "Wk",
    "self_attn.v_proj": "Wv",
    "self_attn.o_proj": "Wo",
    "mlp.gate_proj": "Wg",
    "mlp.up_proj": "Wf1",
    "mlp.down_proj": "Wf2",
    "attn.c_attn": "Wqkv",
    "attn.c_proj": "Wo",
    "mlp.c_fc": "Wf1",
    "mlp.c_proj": "Wf2",
    # The fused expert weights of MoE blocks (one row per expert: "Wgu[3]" is expert 3's gate and up projection).
    "mlp.experts.gate_up_proj": "Wgu",
    "mlp.experts.up_proj": "Wf1",
    "mlp.experts.down_proj": "Wf2",
}

_LAYER = re.compile(r"^(?:.*\.)?(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int | None, str]:
    """(layer index, matrix type) of a module name: ``bert.encoder.layer.3.attention.self.query`` -> (3, Wq).

    The layer is the last integer component followed by more components; names without one get None. An expert of a
    fused MoE weight, ``model.layers.3.mlp.experts.down_proj[5]``, is its own matrix type: (3, Wf2[5]).
    """
    match = _LAYER.match(name)
    layer, kind = (None, name) if match is None else (int(match.group(1)), match.group(2))
    base, bracket, expert = kind.partition("[")
    return layer, MATRIX_SYMBOLS.get(base, base) + bracket + expert


def rank_grid(rank_pattern: Mapping[str, int]) -> tuple[list[str], list[int | None], list[list[int | None]]]:
    """Arrange ``{module name: rank}`` as a table.

    Returns:
        ``(types, layers, grid)``: matrix types in order of first appearance, sorted layer indices (None for
        modules outside numbered layers), and ``grid[i][j]`` = rank of type i in layer j (None if absent).
    """
    cells: dict[tuple[str, int | None], int] = {}
    types: list[str] = []
    layers: set[int | None] = set()
    for name, rank in rank_pattern.items():
        layer, kind = split_name(name)
        if kind not in types:
            types.append(kind)
        layers.add(layer)
        cells[(kind, layer)] = cells.get((kind, layer), 0) + int(rank)
    ordered = sorted(layers, key=lambda layer: (layer is None, layer or 0))
    return types, ordered, [[cells.get((kind, layer)) for layer in ordered] for kind in types]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_rank_heatmap(
    rank_pattern: Mapping[str, int], path: str | Path, *, init_r: int | None = None, title: str | None = None
) -> Path:
    """Save a heatmap of final ranks: one row per matrix type, one column per layer, the rank in each cell.

    Args:
        rank_pattern: ``{module name: kept rank}`` (e.g. ``RankAllocator.rank_pattern()``).
        path: PNG file to write.
        init_r: upper end of the colour scale (the initial rank), raised to the largest rank if that is higher.
        title: figure title.
    """
    import numpy as np

    plt = _pyplot()
    types, layers, grid = rank_grid(rank_pattern)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    # A LoRA trained at a probe's pattern (--rank-pattern) has ranks above its --lora-r: the scale covers them.
    vmax = max(init_r or 1.0, float(np.nanmax(values)))
    # At least 6 inches wide so that a title naming the method and the task fits above 6 layers; MoE models have a
    # row per expert, so beyond a screenful of rows they get thinner and the numbers leave the cells.
    many = len(types) > 32
    row = 0.16 if many else 0.5
    fig, ax = plt.subplots(figsize=(max(7.0, 1.8 + 0.6 * len(layers)), 1.4 + row * max(len(types), 3)))
    image = ax.imshow(values, cmap="YlGnBu", vmin=0, vmax=vmax, aspect="auto")
    for i, cells in enumerate(grid if not many else []):
        for j, value in enumerate(cells):
            if value is not None:
                dark = value > 0.6 * vmax
                ax.text(j, i, str(value), ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_xticks(range(len(layers)), ["-" if layer is None else str(layer + 1) for layer in layers])
    ax.set_yticks(range(len(types)), types, fontsize=6 if many else None)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="final rank")
    ax.set_title(title or f"Final rank per matrix (total {sum(rank_pattern.values())})", fontsize=11)
    fig.tight_layout()
    return save_figure(plt, fig, path)


PHASES = (("warm-up", "#e8f1fa"), ("budget decreasing", "#ffffff"), ("final phase", "#f3f3f3"))
DPI = 150  # with the figure sizes below: 1200 x 675 pixels for the budget curve


def plot_budget_curve(
    budgets: Sequence[int],
    path: str | Path,
    *,
    allocations: Sequence[Mapping[str, Any]] = (),
    phases: Mapping[str, int] | None = None,
    title: str | None = None,
) -> Path:
    """Save the budget b(t) over optimizer steps, with the kept total at each allocation as points.

    One convention for every element: x is t, the 0-based index of the optimizer step just taken, as in
    :func:`adalora.schedule.budget_at` and the allocator's records. So b(t) is drawn at x = t, an allocation at
    its ``step``, and the phase boundaries at t_i (the last warm-up step) and T - t_f (the last budgeting step,
    where the forced final allocation sits: on the boundary, not inside the final phase).

    The three phases of the schedule (warm-up t <= t_i, budget decreasing t_i < t <= T - t_f, final t > T - t_f)
    are shaded and named in a band above the plot area, so that no label covers the curve or a boundary line.

    Args:
        budgets: b(t) for t = 0, 1, ... (one value per optimizer step).
        path: PNG file to write.
        allocations: allocation records with ``step`` (t) and ``ranks`` (kept ranks; a list or a dict).
        phases: optional ``{"warmup_steps": t_i, "final_start": T - t_f}``: phase boundaries.
        title: figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.5))
    ax.plot(range(len(budgets)), budgets, label="budget b(t)", color="tab:blue", linewidth=1.8)
    if allocations:
        steps = [record["step"] for record in allocations]
        kept = [
            sum(record["ranks"].values() if isinstance(record["ranks"], Mapping) else record["ranks"])
            for record in allocations
        ]
        ax.scatter(steps, kept, s=12, color="tab:orange", label="kept at allocation", zorder=3)
    last = max(1, len(budgets) - 1)
    ax.set_xlim(0, last)
    if phases:
        _draw_phases(ax, phases, last)
    ax.set_xlabel("optimizer step t (0-based)")
    ax.set_ylabel("total rank (singular values kept)")
    ax.set_title(title or "Budget schedule", pad=22)  # room for the phase names between title and plot
    ax.legend(loc="upper right", fontsize=9, framealpha=0.95)
    fig.tight_layout()
    return save_figure(plt, fig, path)


def save_figure(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (the format from the suffix, PNG by default) and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda file: fig.savefig(file, format=path.suffix.lstrip(".") or "png", dpi=DPI))
    finally:
        plt.close(fig)
    return path


def _draw_phases(ax: Any, phases: Mapping[str, int], last: int) -> None:
    """Shade the phases over t = 0 .. ``last``, draw their boundaries at t_i and T - t_f, and name each phase above
    the plot area (clear of all lines)."""
    bounds = [0, phases.get("warmup_steps", 0), phases.get("final_start", last), last]
    transform = ax.get_xaxis_transform()  # x in steps, y in axes units (1 = top of the plot area)
    for (name, colour), left, right in zip(PHASES, bounds, bounds[1:], strict=False):
        if right <= left:
            continue
        ax.axvspan(left, right, color=colour, zorder=0, linewidth=0)
        ax.text((left + right) / 2, 1.01, name, ha="center", va="bottom", fontsize=8, color="dimgrey",
                transform=transform, clip_on=False)  # fmt: skip
    for boundary in bounds[1:3]:
        if 0 < boundary < last:
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=0.8, zorder=1)
