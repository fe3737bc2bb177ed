"""The AdaLoRA configuration: one frozen dataclass, validated on construction.

Symbols follow the paper (Zhang et al., ICLR 2023; docs/algorithm.md): ``init_r`` is the initial rank of
every adapted matrix, the budget ``b(t)`` is the number of unmasked singular values over all matrices,
``t_i``/``t_f``/``T`` are the warm-up, final-phase and total lengths in *optimizer* steps, ``DeltaT`` the
interval between allocations.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from .fields import COUNT, FRACTION, NON_NEGATIVE, OPEN_UNIT, POSITIVE, STEPS, ConfigError, Names, check_fields, setting
from .layers.base import TripletInit, TripletStart
from .metrics import METRICS

RegularizerForm = Literal["reference", "paper"]
ImportanceTiming = Literal["after_step", "before_step"]

_METRICS_HELP = "; ".join(f"{m.name}: {m.description}" for m in METRICS.values())


@dataclass(frozen=True)
class AdaLoRAConfig:
    """Everything that defines an AdaLoRA run. Immutable: derive variants with :meth:`replace`.

    Every field says what it means and which values it takes (:func:`adalora.fields.setting`); ``adalora train``
    makes each one a flag (``init_r`` -> ``--init-r``) from that alone.

    Raises:
        ValueError: (:class:`~adalora.fields.ConfigError`) on construction, naming the field, what is wrong with
            it and how to fix it.
    """

    target_modules: tuple[str, ...] | str = setting(
        ("query", "key", "value", "dense"),
        'modules to adapt: names equal to an entry or ending in "." + entry (a single string instead is a regular '
        'expression that must match the whole name); an entry naming a mixture-of-experts block ("experts") adapts '
        "each of its fused expert weights",
        metavar="NAME",
    )
    target_parameters: tuple[str, ...] = setting(
        (),
        "parameters to adapt, matched like target_modules entries: the fused 3-D expert weights of mixture-of-experts "
        "blocks (PEFT's target_parameters); each expert gets its own triplets",
        Names("parameter names", '["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]'),
        metavar="NAME",
    )
    init_r: int = setting(
        12, "r at step 0 of every adapted matrix (the paper starts at ~1.5 x the final rank)", COUNT, metavar="R"
    )
    target_r: int | None = setting(
        8, "average final rank: b(T) = target_r x the number of matrices", COUNT, metavar="R"
    )
    target_total_rank: int | None = setting(
        None, "the final budget b(T) over all matrices, instead of target_r", COUNT, metavar="B", instead_of="target_r"
    )
    alpha: float = setting(
        16.0, "adapter scale = alpha / init_r, fixed even when triplets are masked (reference)", POSITIVE
    )
    dropout: float = setting(0.0, "dropout probability on the adapter input", FRACTION, metavar="P")
    warmup_steps: int = setting(200, "t_i: no masking while t <= t_i", STEPS, metavar="T_I")
    final_steps: int = setting(500, "t_f: the last t_f steps train with a frozen rank pattern", STEPS, metavar="T_F")
    mask_interval: int = setting(
        10, "DeltaT: reallocate when t % DeltaT == 0 in the budgeting phase", COUNT, metavar="STEPS"
    )
    total_steps: int | None = setting(3000, "T in optimizer steps; None = let a training integration fill it in", COUNT)
    beta1: float = setting(0.85, "EMA factor of the smoothed sensitivity Ibar (eq. 9)", OPEN_UNIT)
    beta2: float = setting(0.85, "EMA factor of the uncertainty Ubar (eq. 10)", OPEN_UNIT)
    orth_reg_weight: float = setting(
        0.1, "gamma: weight of the orthogonality regulariser R(P, Q)", NON_NEGATIVE, metavar="GAMMA"
    )
    importance: str = setting(
        "smoothed", f"score that ranks the singular values: {_METRICS_HELP}", choices=tuple(METRICS)
    )
    regularizer: RegularizerForm = setting(
        "reference", "R(P, Q): mean ||cov - I||_F (authors' code) or sum of squares (eq. 4)"
    )
    importance_timing: ImportanceTiming = setting(
        "after_step", "measure importance after optimizer.step (authors' code) or before it (Alg. 1)"
    )
    modules_to_save: tuple[str, ...] = setting(
        (), "modules trained fully and saved with the adapter", Names("module names", '["classifier"]'), metavar="NAME"
    )
    init_std: float = setting(0.02, "std of the Gaussian P and Q of triplet_init paper", POSITIVE)
    triplet_init: TripletInit = setting(
        "paper",
        "how P, lambda, Q start; the update (eq. 3) is zero either way. paper: lambda = 0, P and Q ~ "
        "N(0, init_std^2), so P and Q get no gradient until lambda moves (the paper, PEFT); lora (opt-in): P = 0, "
        "lambda = 1, Q Kaiming-uniform as LoRA's A, so P learns from step 0 as LoRA's B does (the LoRA baselines "
        "always start so)",
    )
    compact_at_final: bool = setting(False, "cut adapters to their kept rank at the final allocation (compact.py)")

    def __post_init__(self) -> None:
        # Normalise list inputs to tuples so the frozen config is hashable and JSON round-trips exactly.
        for name in ("target_modules", "target_parameters"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.modules_to_save, list | str):
            value = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
            object.__setattr__(self, "modules_to_save", tuple(value))
        check_fields(self)
        self._check_relations()

    # ------------------------------------------------------------------ validation
    def _check_relations(self) -> None:
        """What one field alone cannot say: some target (modules or parameters), one final budget below the initial
        one, and a budgeting phase between warm-up and final phase."""

        def fail(name: str, problem: str, fix: str) -> None:
            raise ConfigError("AdaLoRAConfig", name, problem, fix)

        targets, parameters = self.target_modules, self.target_parameters
        if isinstance(targets, str) and not targets:
            fail("target_modules", "is an empty regular expression", "Name the modules to adapt.")
        listed = isinstance(targets, tuple) and all(isinstance(t, str) and t for t in targets)
        if not isinstance(targets, str) and (not listed or not (targets or parameters)):
            fail(
                "target_modules",
                f"must be a non-empty list of module names or a regex string, got {targets!r}",
                'List the modules to adapt, e.g. ["query", "value"] for BERT or ["q_proj", "v_proj"] for Llama '
                "(or leave it empty and name fused expert weights in target_parameters).",
            )
        if (self.target_r is None) == (self.target_total_rank is None):
            fail(
                "target_r",
                "exactly one of target_r and target_total_rank must be set",
                "Give the average final rank (target_r) or the total final budget (target_total_rank), not both.",
            )
        if self.target_r is not None and self.target_r >= self.init_r:
            fail(
                "target_r",
                f"the final rank must be smaller than init_r, got target_r={self.target_r} >= init_r={self.init_r}",
                f"Lower target_r or raise init_r (the paper starts at about 1.5 x the target, "
                f"e.g. init_r={max(self.target_r + 1, round(1.5 * self.target_r))}).",
            )
        if self.total_steps is not None and self.total_steps <= self.warmup_steps + self.final_steps:
            fail(
                "total_steps",
                f"total_steps={self.total_steps} leaves no budgeting phase after warmup_steps="
                f"{self.warmup_steps} and before final_steps={self.final_steps}",
                "Train for more steps or shorten warmup_steps/final_steps so that "
                "total_steps > warmup_steps + final_steps (the authors spend about half of training "
                "reducing the budget).",
            )

    # ------------------------------------------------------------------ derived values
    @property
    def triplet_start(self) -> TripletStart:
        """How every adapter's P, lambda, Q start (``triplet_init`` and ``init_std``; gradients in its docstring)."""
        return TripletStart(self.triplet_init, self.init_std)

    @property
    def scale(self) -> float:
        """The adapter scale ``alpha / init_r`` (reference; not updated when triplets are masked)."""
        return self.alpha / self.init_r

    def target_budget(self, num_matrices: int) -> int:
        """b(T): the total number of singular values kept at the end over ``num_matrices`` adapters."""
        if self.target_total_rank is not None:
            return self.target_total_rank
        assert self.target_r is not None
        return self.target_r * num_matrices

    def replace(self, **changes: Any) -> AdaLoRAConfig:
        """A validated copy with ``changes`` applied; this config is left untouched."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaLoRAConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error rather than silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"AdaLoRAConfig: unknown field(s) {unknown}. Known fields: {sorted(known)}. "
                "Was this file written by a newer version of adalora?"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> AdaLoRAConfig:
        return cls.from_dict(json.loads(text))
