"""The comparison and verdicts of benchmarks/serving_check.py, on hand-made log-probabilities (no engine runs).

The script decides from these whether an engine reads an export exactly and whether a control fails; a mistake
here would turn a wrong reading into a pass.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest


@pytest.fixture(scope="module")
def sc():
    return importlib.import_module("serving_check")


def test_compare_takes_the_max_and_mean_over_every_prompt_and_counts_top1(sc):
    ours = [np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])), np.log(np.array([[0.5, 0.4, 0.1]]))]
    engine = [ours[0] + np.array([[0.0, 0.01, 0.0], [0.0, 0.0, 0.0]]), ours[1] + np.array([[0.0, 0.3, 0.0]])]
    reading = sc.compare(engine, ours)
    assert reading.max_diff == pytest.approx(0.3)
    assert reading.mean_diff == pytest.approx(0.31 / 9)  # 9 entries in all
    assert reading.positions == 3
    assert reading.top1 == 2  # the last position's top token moved from 0 (log 0.5) to 1 (log 0.4 + 0.3)


def test_compare_refuses_mismatched_prompts(sc):
    a = [np.zeros((2, 3))]
    with pytest.raises(ValueError, match="2 prompts from the engine, 1 of ours"):
        sc.compare(a + a, a)
    with pytest.raises(ValueError, match=r"shape \(1, 3\), ours \(2, 3\)"):
        sc.compare([np.zeros((1, 3))], a)


def test_verdict_is_relative_to_the_engines_floor_and_flags_the_unexpected(sc):
    floor = sc.Reading(5e-5, 1e-6, 10, 10)
    close = sc.Reading(9e-5, 2e-6, 10, 10)
    far = sc.Reading(6.4, 0.1, 7, 10)
    assert sc.verdict(close, floor, expect_exact=True) == ("exact", True)
    assert sc.verdict(far, floor, expect_exact=False) == ("differs", True)
    assert sc.verdict(far, floor, expect_exact=True) == ("differs", False)  # an export read wrongly
    assert sc.verdict(close, floor, expect_exact=False) == ("exact", False)  # a control that did not fail
    just_over = sc.Reading(sc.TOLERANCE_OVER_FLOOR * 5e-5, 0.0, 10, 10)
    assert sc.verdict(just_over, floor, expect_exact=True)[0] == "differs"


def test_table_rows_compare_each_file_with_the_adapted_model_and_the_floor_with_the_base(sc):
    rng = np.random.default_rng(0)
    ours_base = [sc.log_softmax(rng.normal(size=(4, 6)))]
    ours = [sc.log_softmax(rng.normal(size=(4, 6)))]
    engine_files = [v.name for v in sc.VARIANTS if "vllm" in v.expect]
    outputs = {"base": [ours_base[0] + 1e-6]}
    for variant in sc.VARIANTS:
        if "vllm" in variant.expect:  # exports read exactly, controls read as if the adapter were not there
            outputs[variant.name] = [ours[0] + 1e-6] if variant.expect["vllm"] else ours_base
    rows = sc.table_rows("vllm", outputs, {"ours": ours, "ours_base": ours_base})
    assert rows[0]["verdict"] == "floor" and rows[0]["max_diff"] == pytest.approx(1e-6)
    assert [r["file"] for r in rows[1:]] == engine_files
    assert all(r["as_expected"] for r in rows[1:])  # exports exact, controls (read as the base here) differ
