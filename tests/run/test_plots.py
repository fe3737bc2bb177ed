"""Rank heatmap and budget curve: module names to (layer, matrix type), and PNG files that open."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from adalora.run.plots import plot_budget_curve, plot_rank_heatmap, rank_grid, split_name

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert.encoder.layer.3.attention.self.query", (3, "Wq")),
        ("bert.encoder.layer.0.attention.output.dense", (0, "Wo")),
        ("bert.encoder.layer.11.output.dense", (11, "Wf2")),
        ("model.layers.2.mlp.down_proj", (2, "Wf2")),
        ("transformer.h.1.attn.c_attn", (1, "Wqkv")),
        ("encoder.block.4.custom_proj", (4, "custom_proj")),
        ("pooler.dense", (None, "pooler.dense")),
    ],
)
def test_split_name(name: str, expected: tuple) -> None:
    assert split_name(name) == expected


def test_rank_grid_is_types_by_layers() -> None:
    ranks = {
        "bert.encoder.layer.0.attention.self.query": 3,
        "bert.encoder.layer.0.intermediate.dense": 5,
        "bert.encoder.layer.1.attention.self.query": 1,
        "bert.pooler.dense": 2,
    }
    types, layers, grid = rank_grid(ranks)
    assert types == ["Wq", "Wf1", "bert.pooler.dense"]
    assert layers == [0, 1, None]
    assert grid == [[3, 1, None], [5, None, None], [None, None, 2]]


def test_figures_are_png_files(tmp_path: Path) -> None:
    ranks = {f"bert.encoder.layer.{i}.attention.self.{m}": i + j for i in range(3) for j, m in enumerate("qkv")}
    heatmap = plot_rank_heatmap(ranks, tmp_path / "ranks.png", init_r=6)
    allocations = [{"step": 5, "ranks": [4, 4]}, {"step": 6, "ranks": {"a": 3, "b": 4}}]
    curve = plot_budget_curve(
        [8] * 5 + [8, 7, 7], tmp_path / "budget.png", allocations=allocations, phases={"warmup_steps": 5}
    )
    for path in (heatmap, curve):
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[16:24]  # IHDR: width and height, big-endian
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_budget_curve_is_large_and_its_phase_names_sit_clear_of_every_line(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure where its texts landed
    budgets = [48] * 20 + list(range(48, 24, -1)) + [24] * 30
    path = plot_budget_curve(budgets, tmp_path / "budget.png", phases={"warmup_steps": 20, "final_start": 44})
    width, height = png_size(path)
    assert width >= 1200 and height >= 675
    (fig,) = figures
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    plot_area = ax.get_window_extent(renderer)
    names = [t for t in ax.texts if t.get_text() in ("warm-up", "budget decreasing", "final phase")]
    assert [t.get_text() for t in names] == ["warm-up", "budget decreasing", "final phase"]
    boxes = [t.get_window_extent(renderer) for t in names]
    for box in boxes:  # above the plot area: no curve, point or boundary line can be under a name
        assert box.y0 >= plot_area.y1
    assert ax.title.get_window_extent(renderer).y0 >= max(box.y1 for box in boxes)  # and below the title
    for left, right in itertools.pairwise(boxes):
        assert left.x1 <= right.x0  # the names do not overlap each other
    monkeypatch.undo()
    plt.close(fig)


def test_rank_heatmap_is_large_enough_to_read(tmp_path: Path) -> None:
    ranks = {f"bert.encoder.layer.{i}.attention.self.{m}": i + j for i in range(6) for j, m in enumerate("qkv")}
    width, height = png_size(plot_rank_heatmap(ranks, tmp_path / "ranks.png", init_r=8))
    assert width >= 1000 and height >= 400
