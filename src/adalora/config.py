"""The AdaLoRA configuration: one frozen dataclass, validated on construction.

Symbols follow the paper (Zhang et al., ICLR 2023; docs/algorithm.md): ``init_r`` is the initial rank of
every adapted matrix, the budget ``b(t)`` is the number of unmasked singular values over all matrices,
``t_i``/``t_f``/``T`` are the warm-up, final-phase and total lengths in *optimizer* steps, ``DeltaT`` the
interval between allocations.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .metrics import METRICS

RegularizerForm = Literal["reference", "paper"]
ImportanceTiming = Literal["after_step", "before_step"]

_REGULARIZERS = ("reference", "paper")
_TIMINGS = ("after_step", "before_step")


@dataclass(frozen=True)
class AdaLoRAConfig:
    """Everything that defines an AdaLoRA run. Immutable: derive variants with :meth:`replace`.

    Raises:
        ValueError: on construction, naming the field, what is wrong with it and how to fix it.
    """

    target_modules: tuple[str, ...] | str = ("query", "key", "value", "dense")
    """Module names to adapt: a list matches names equal to an entry or ending in ``"." + entry``;
    a single string is a regular expression that must match the whole module name. An entry that names a
    mixture-of-experts block (``"experts"``: Qwen3-MoE's ``mlp.experts``) adapts every fused expert weight of it."""
    target_parameters: tuple[str, ...] = ()
    """Parameter names to adapt, matched like ``target_modules`` entries (suffixes on ``.``-separated names): the
    fused 3-D expert weights of mixture-of-experts blocks, e.g. ``("mlp.experts.gate_up_proj",
    "mlp.experts.down_proj")`` (PEFT's ``target_parameters``); each expert gets its own triplets."""
    init_r: int = 12  # r at step 0 for every adapted matrix; the paper starts at ~1.5 x the final rank
    target_r: int | None = 8  # average final rank: b(T) = target_r * n matrices
    target_total_rank: int | None = None  # alternative to target_r: b(T) given directly
    alpha: float = 16.0  # adapter scale = alpha / init_r, fixed even when triplets are masked (reference)
    dropout: float = 0.0  # dropout on the adapter input only
    warmup_steps: int = 200  # t_i: no masking while t <= t_i
    final_steps: int = 500  # t_f: the last t_f steps train with a frozen rank pattern
    mask_interval: int = 10  # DeltaT: reallocate when t % DeltaT == 0 during the budgeting phase
    total_steps: int | None = 3000  # T in optimizer steps; None = let a training integration fill it in
    beta1: float = 0.85  # EMA factor of the smoothed sensitivity Ibar (eq. 9)
    beta2: float = 0.85  # EMA factor of the uncertainty Ubar (eq. 10)
    orth_reg_weight: float = 0.1  # gamma: weight of the orthogonality regulariser R(P, Q)
    importance: str = "smoothed"  # a METRICS name: s = Ibar * Ubar (eq. 11), plain |w g| (eq. 8), or |lambda|
    regularizer: RegularizerForm = "reference"  # mean ||cov - I||_F (authors' code) or sum of squares (eq. 4)
    importance_timing: ImportanceTiming = "after_step"  # measure after optimizer.step (code) or before (Alg. 1)
    modules_to_save: tuple[str, ...] = ()  # modules trained fully and saved with the adapter (e.g. "classifier")
    init_std: float = 0.02  # std of the Gaussian init of P and Q; lambda starts at 0
    compact_at_final: bool = False  # cut adapters to their kept rank at the final allocation (see compact.py)

    def __post_init__(self) -> None:
        # Normalise list inputs to tuples so the frozen config is hashable and JSON round-trips exactly.
        for name in ("target_modules", "target_parameters"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.modules_to_save, list | str):
            value = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
            object.__setattr__(self, "modules_to_save", tuple(value))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate_targets(self, fail: Callable[[str, str, str], None]) -> None:
        """Module and parameter names: a list or regex of modules, a list of parameters; some target at all."""
        targets, parameters = self.target_modules, self.target_parameters
        if not isinstance(parameters, tuple) or not all(isinstance(t, str) and t for t in parameters):
            fail(
                "target_parameters",
                f"must be a list of parameter names, got {parameters!r}",
                'e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] for the experts of an MoE model.',
            )
        if isinstance(targets, str):
            if not targets:
                fail("target_modules", "is an empty regular expression", "Name the modules to adapt.")
        elif not (targets or parameters) or not all(isinstance(t, str) and t for t in targets):
            fail(
                "target_modules",
                f"must be a non-empty list of module names or a regex string, got {targets!r}",
                'List the modules to adapt, e.g. ["query", "value"] for BERT or ["q_proj", "v_proj"] for Llama '
                "(or leave it empty and name fused expert weights in target_parameters).",
            )

    def _validate(self) -> None:
        def fail(name: str, problem: str, fix: str) -> None:
            raise ValueError(f"AdaLoRAConfig.{name}: {problem}. {fix}")

        def check_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, f"expected an integer, got {value!r}", f"Pass a whole number >= {minimum}.")
            if value < minimum:
                fail(name, f"must be >= {minimum}, got {value}", f"Set {name} to at least {minimum}.")

        self._validate_targets(fail)
        check_int("init_r", 1)
        if (self.target_r is None) == (self.target_total_rank is None):
            fail(
                "target_r",
                "exactly one of target_r and target_total_rank must be set",
                "Give the average final rank (target_r) or the total final budget (target_total_rank), not both.",
            )
        if self.target_r is not None:
            check_int("target_r", 1)
            if self.target_r >= self.init_r:
                fail(
                    "target_r",
                    f"the final rank must be smaller than init_r, got target_r={self.target_r} >= init_r={self.init_r}",
                    f"Lower target_r or raise init_r (the paper starts at about 1.5 x the target, "
                    f"e.g. init_r={max(self.target_r + 1, round(1.5 * self.target_r))}).",
                )
        if self.target_total_rank is not None:
            check_int("target_total_rank", 1)
        for name in ("warmup_steps", "final_steps"):
            check_int(name, 0)
        check_int("mask_interval", 1)
        if self.total_steps is not None:
            check_int("total_steps", 1)
            if self.total_steps <= self.warmup_steps + self.final_steps:
                fail(
                    "total_steps",
                    f"total_steps={self.total_steps} leaves no budgeting phase after warmup_steps="
                    f"{self.warmup_steps} and before final_steps={self.final_steps}",
                    "Train for more steps or shorten warmup_steps/final_steps so that "
                    "total_steps > warmup_steps + final_steps (the authors spend about half of training "
                    "reducing the budget).",
                )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 < value < 1.0:
                fail(name, f"must lie strictly between 0 and 1, got {value!r}", "The paper uses 0.85.")
        for name in ("alpha", "orth_reg_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                fail(name, f"must be a non-negative number, got {value!r}", f"Set {name} >= 0.")
        if not isinstance(self.init_std, int | float) or not self.init_std > 0:
            fail("init_std", f"must be positive, got {self.init_std!r}", "The reference uses 0.02.")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must lie in [0, 1), got {self.dropout!r}", "Use 0.0 for no dropout.")
        for name, allowed in (
            ("importance", tuple(METRICS)),
            ("regularizer", _REGULARIZERS),
            ("importance_timing", _TIMINGS),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"unknown value {getattr(self, name)!r}", f"Choose one of {', '.join(allowed)}.")
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            fail("modules_to_save", f"must be module names, got {self.modules_to_save!r}", 'e.g. ["classifier"].')
        if not isinstance(self.compact_at_final, bool):
            fail("compact_at_final", f"must be True or False, got {self.compact_at_final!r}", "Pass a bool.")

    # ------------------------------------------------------------------ derived values
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
