"""The discovered allocation as a LoRA recipe: per-module ranks for a plain LoRA trained anywhere.

A short AdaLoRA run finds which matrices deserve rank; this file hands that pattern to other trainers:

- ``ranks``: ``{module: rank}`` for every adapted module (0 for those AdaLoRA pruned away);
- ``expert_ranks`` (MoE models only): ``{fused expert weight: [rank of each expert]}``. PEFT's LoRA gives every
  expert of a parameter one rank, so ``ranks`` and the configs below give such a weight its largest expert rank;
- ``peft_lora_config``: keyword arguments for ``peft.LoraConfig`` (``r``, ``lora_alpha``, ``target_modules``,
  ``target_parameters`` for fused expert weights, ``rank_pattern``, ``alpha_pattern``, ``lora_dropout``,
  ``task_type``): ``LoraConfig(**recipe["peft_lora_config"])`` builds modules of exactly those ranks, leaving out the
  rank-0 ones (PEFT refuses dropout on parameters: ``lora_dropout`` is 0 when there are expert weights);
- ``yaml_config``: the same as the flat keys of trainer YAML configs that accept per-module ranks
  (``lora_r``, ``lora_alpha``, ``lora_target_modules``, ``lora_rank_pattern``, ``lora_alpha_pattern``,
  ``lora_dropout``); JSON is valid YAML, so the block can be pasted as it is.

``r`` is the most common kept rank and ``lora_alpha`` its alpha. Each module's alpha is ``scale * rank``, so
PEFT's ``lora_alpha / r`` is, in every module, the scale AdaLoRA trained it with (``alpha / init_r``): the
learning-rate behaviour of the probe carries over. Both patterns list every exported module by full name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_json
from .export_source import ExportSource
from .lora_layout import most_common_rank

RECIPE_FORMAT = "adalora-rank-pattern"
RECIPE_VERSION = 1


def rank_recipe(source: ExportSource) -> dict[str, Any]:
    """The recipe of ``source`` (see the module docstring) as a JSON-ready dict.

    Raises:
        ValueError: if every module has rank 0.
    """
    ranks = {u.name: u.rank for u in source.updates}
    kept = [u for u in source.updates if u.rank > 0]
    if not kept:
        raise ValueError("rank-pattern export: every adapter has rank 0, so the recipe would adapt nothing.")
    r = most_common_rank([u.rank for u in kept])
    alphas = {u.name: _number(u.factors.scale * u.rank) for u in kept}
    lora_alpha = next(alphas[u.name] for u in kept if u.rank == r)
    targets = sorted(u.name for u in kept if not u.expert_ranks)
    parameters = sorted(u.name for u in kept if u.expert_ranks)
    experts = {"target_parameters": parameters} if parameters else {}
    dropout = 0.0 if parameters else source.config.dropout  # PEFT refuses dropout on parameters
    rank_pattern = {u.name: u.rank for u in kept}
    peft_kwargs = {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": targets,
        **experts,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alphas,
        "lora_dropout": dropout,
        "task_type": source.task_type,
    }
    yaml_keys = {
        "lora_r": r,
        "lora_alpha": lora_alpha,
        "lora_target_modules": targets,
        **{f"lora_{key}": value for key, value in experts.items()},
        "lora_rank_pattern": rank_pattern,
        "lora_alpha_pattern": alphas,
        "lora_dropout": dropout,
    }
    expert_ranks = {u.name: list(u.expert_ranks) for u in source.updates if u.expert_ranks}
    return {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "base_model_name_or_path": source.base_model_name,
        "init_r": source.config.init_r,
        "total_rank": sum(sum(u.expert_ranks) if u.expert_ranks else u.rank for u in source.updates),
        "ranks": ranks,
        **({"expert_ranks": expert_ranks} if expert_ranks else {}),
        "peft_lora_config": peft_kwargs,
        "yaml_config": yaml_keys,
    }


def write_rank_pattern(source: ExportSource, path: str | os.PathLike[str]) -> Path:
    """Write :func:`rank_recipe` of ``source`` to ``path`` (JSON), atomically."""
    return write_json(path, rank_recipe(source))


def read_rank_pattern(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{module: rank}`` from a recipe written by :func:`write_rank_pattern` (its ``ranks``, pruned modules at 0).

    Raises:
        ValueError: in one line, if the file is missing, is not JSON, is not such a recipe or lists no rank > 0.
    """
    path = Path(path)
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"rank pattern {path}: cannot read it ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"rank pattern {path}: not JSON ({error})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise ValueError(f"rank pattern {path}: not a rank-pattern recipe; write one with "
                         "`adalora export RUN --format rank-pattern`")  # fmt: skip
    if recipe.get("version") != RECIPE_VERSION:
        raise ValueError(f"rank pattern {path}: recipe version {recipe.get('version')!r}, this adalora reads "
                         f"version {RECIPE_VERSION}; export it again with this version")  # fmt: skip
    ranks = recipe.get("ranks")
    if not isinstance(ranks, dict) or not all(type(r) is int and r >= 0 for r in ranks.values()):
        raise ValueError(f"rank pattern {path}: 'ranks' must map module names to integers >= 0")
    if not any(ranks.values()):
        raise ValueError(f"rank pattern {path}: every rank is 0, so LoRA would train nothing")
    return ranks


def _number(value: float) -> int | float:
    """An integer when ``value`` is one (alphas such as 8.0 read better as 8 in a config)."""
    return int(value) if float(value).is_integer() else float(value)
