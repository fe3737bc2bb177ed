"""Rank heatmap and budget curve: module names to (layer, matrix type), and PNG files that open."""

from __future__ import annotations

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
