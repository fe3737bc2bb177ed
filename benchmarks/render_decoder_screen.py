"""Render the measurements of AdaLoRA's lora start (``decoder_screen.py``) as a markdown section: the pre-check
(first 50 steps), the screen (start x task x lr: validation accuracy and completion perplexity) against the decoder
table's seed-0 search runs of AdaLoRA and LoRA at r = 8, and the confirmation (seeds 1-3, test split) against the
table's final rows. Options that a prototype measured in the first screen but the library does not offer are shown
with their records, labelled so.

Prints the section; with ``--doc`` it also goes into that file between ``<!-- DECODER-SCREEN -->`` and
``<!-- /DECODER-SCREEN -->`` (appended with its heading if missing). Usage:
    python benchmarks/render_decoder_screen.py [--screen PATH] [--confirm PATH] [--precheck PATH] [--baselines PATH]
        [--doc PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from decoder_screen import SCREEN_VARIANTS
from decoder_table import PROMPT_TASKS
from paper_table import RESULTS, VARIANTS, Cell, choose_lr, search_scores
from render_paper_table import difference, final_runs, markdown, replace_between_markers, summary

BEGIN, END = "<!-- DECODER-SCREEN -->", "<!-- /DECODER-SCREEN -->"
HEADING = "### Starting the triplets as LoRA does: screen and confirmation"
BASELINES = ("lora", "adalora")  # the decoder table's rows, from its own results file
STARTS = tuple(v.name for v in SCREEN_VARIANTS)  # the lora start and its variations, in that order
TASKS = ("trec", "sms-spam")
# Options a prototype measured in the first screen (decoder_screen.json, decoder_screen_precheck.json) that the
# library does not offer: their product changes the base weights (which adapter files, exports and quantized bases
# cannot carry), or lambda trains at a learning rate of its own. Shown with their records; not run again.
NOT_OFFERED = {
    "adalora-init-orthonormal": "random orthonormal P, Q, lambda = 1, scale P Q subtracted from W0",
    "adalora-init-orthonormal-drop": "orthonormal, a masked triplet's product left out of W0",
    "adalora-init-svd": "W0's top singular triplets, W0 replaced by its residual",
    "adalora-init-svd-drop": "svd, a masked triplet deleted from W0",
    "adalora-lambda-lr16": "lambda at 16x the lr",
}


def label(variant: str) -> str:
    if variant in NOT_OFFERED:
        return f"prototype, not offered: {NOT_OFFERED[variant]}"
    return {"lora": "LoRA", "adalora": "AdaLoRA, triplet_init paper (the default)"}.get(
        variant, VARIANTS[variant].label
    )


def variants_in(runs: dict[str, Any]) -> list[str]:
    """The baselines, the lora start and its variations, then the prototype's options that have runs, in that
    order."""
    present = {r["variant"] for r in runs.values()}
    return [v for v in (*BASELINES, *STARTS, *NOT_OFFERED) if v in present]


def cell_runs(runs: dict[str, Any], task: str, variant: str, budget: int = 8) -> dict[float, dict[str, Any]]:
    """The seed-0 validation runs of ``variant`` at r = ``budget`` on ``task``, by lr."""
    prefix = f"{task}/{variant}/r{budget}/search/"
    return {r["lr"]: r for key, r in runs.items() if key.startswith(prefix)}


def best_lr(runs: dict[str, Any], task: str, variant: str, budget: int = 8) -> float | None:
    """The lr the table's rule picks among those tried (best accuracy, then lower completion loss)."""
    scores = search_scores(runs, Cell(task, variant, budget))
    return choose_lr(scores, scores, 0)[0] if scores else None


def entry(run: dict[str, Any] | None) -> str:
    return "" if run is None else f"{100 * run['accuracy']:.2f} / {run['perplexity']:.3f}"


def screen_tables(runs: dict[str, Any], budget: int = 8) -> str:
    """Per task: accuracy (%) / completion perplexity at every lr tried at r = ``budget``, for the baselines and
    every start."""
    parts = []
    for task in TASKS:
        variants = [v for v in variants_in(runs) if cell_runs(runs, task, v, budget)]
        if variants == [v for v in BASELINES if v in variants]:
            continue  # no start screened on this task yet
        lrs = sorted({lr for v in variants for lr in cell_runs(runs, task, v, budget)})
        rows = []
        for variant in variants:
            tried, best = cell_runs(runs, task, variant, budget), best_lr(runs, task, variant, budget)
            rows.append([label(variant), *(entry(tried.get(lr)) for lr in lrs), f"{best:g}", entry(tried[best])])
        header = ["Start", *(f"lr {lr:g}" for lr in lrs), "best lr", "at best lr"]
        title = f"{PROMPT_TASKS[task].label}, r = {budget} (validation accuracy % / completion perplexity)"
        parts.append(f"{title}:\n\n{markdown(header, rows)}")
    return "\n\n".join(parts)


def summary_table(runs: dict[str, Any]) -> str:
    """Per start: best validation accuracy per task (its difference to LoRA's best) and the completion perplexity
    there, and the best lr / LoRA's; the mean difference where every task was screened."""
    lora = {task: cell_runs(runs, task, "lora")[best_lr(runs, task, "lora")] for task in TASKS}
    rows = []
    for variant in variants_in(runs):
        row, diffs = [label(variant)], []
        for task in TASKS:
            best = best_lr(runs, task, variant)
            if best is None:
                row += ["", ""]
                continue
            run = cell_runs(runs, task, variant)[best]
            diffs.append(100 * (run["accuracy"] - lora[task]["accuracy"]))
            row += [f"{100 * run['accuracy']:.2f} ({diffs[-1]:+.2f}) / {run['perplexity']:.3f}",
                    f"{best / lora[task]['lr']:.3g}x"]  # fmt: skip
        row.append(f"{statistics.fmean(diffs):+.2f}" if len(diffs) == len(TASKS) else "")
        rows.append(row)
    header = ["Start"]
    for task in TASKS:
        header += [f"{PROMPT_TASKS[task].label}: best acc. % (vs LoRA) / ppl", "its lr / LoRA's"]
    return markdown([*header, "mean vs LoRA"], rows)


def confirmation_table(confirm: dict[str, Any], baselines: dict[str, Any]) -> str:
    """Per budget and task with final runs of the lora start: test accuracy (mean ± std over seeds) and completion
    perplexity at its chosen lr, with the decoder table's final AdaLoRA and LoRA rows and the differences
    (± standard error)."""
    finals = {**baselines, **confirm["runs"]}
    done = {(r["budget"], r["task"]) for r in confirm["runs"].values() if r["phase"] == "final"}
    rows = []
    for budget, task in sorted(done, key=lambda cell: (-cell[0], TASKS.index(cell[1]))):
        lora = final_runs(finals, task, "lora", budget)
        for variant in (*BASELINES, *STARTS):
            mine = final_runs(finals, task, variant, budget)
            stats = summary(mine)
            if stats is None:
                continue
            lrs = ", ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in mine}))
            perplexity = statistics.fmean(r["perplexity"] for r in mine)
            vs_lora = "" if variant == "lora" else difference(mine, lora)
            rows.append([f"r = {budget}", PROMPT_TASKS[task].label, label(variant), lrs,
                         f"{stats[0]:.2f} ± {stats[1]:.2f}", str(len(mine)), f"{perplexity:.3f}", vs_lora])  # fmt: skip
    header = ["r", "Task", "Start", "lr", "test acc. % (mean ± std)", "seeds", "ppl", "vs LoRA (± s.e.)"]
    return markdown(header, rows)


def precheck_table(precheck: dict[str, Any]) -> str:
    steps = precheck["steps"]
    rows = [
        [label(r["variant"]), f"{r['lr']:g}", " / ".join(f"{x:.2f}" for x in r["train_loss_per_10_steps"]),
         f"{r['val_loss']:.4f}", f"{r['val_perplexity']:.3f}", f"{r['cpu_seconds'] / 60:.1f}"]
        for r in precheck["runs"].values()
    ]  # fmt: skip
    header = ["Start", "lr", f"train loss, mean of steps 1-10 / ... / {steps - 9}-{steps}", f"val loss at {steps}",
              "val perplexity", "CPU min"]  # fmt: skip
    return markdown(header, rows)


def check_line(screen: dict[str, Any]) -> str:
    check = screen.get("baseline_check")
    if check is None:
        return "Baseline check: not run."
    here, there = check["here"], check["decoder_table"]
    return (
        f"Baseline check of the first screen's harness: `{check['key']}` trained again (scored in the training "
        f"process): accuracy {100 * here['accuracy']:.2f} % (decoder table {100 * there['accuracy']:.2f} %), "
        f"perplexity {here['perplexity']:.4f} ({there['perplexity']:.4f}), completion loss {here['eval_loss']:.4f} "
        f"({there['eval_loss']:.4f})."
    )


def cost_line(runs: dict[str, Any], screen: dict[str, Any], precheck: dict[str, Any] | None) -> str:
    """CPU time of every run of the screen and the confirmation (once per key), the baseline check, the pre-check."""
    cpu = [r["cpu_seconds"] for r in runs.values() if r["variant"] not in BASELINES]
    check = screen.get("baseline_check", {}).get("here", {}).get("cpu_seconds", 0.0)
    pre = sum(r["cpu_seconds"] for r in precheck["runs"].values()) if precheck else 0.0
    total = sum(cpu) + check + pre
    median = f"median {statistics.median(cpu) / 60:.1f} CPU min per run; " if cpu else ""
    return (
        f"Cost: {len(cpu)} runs ({median}{sum(cpu) / 3600:.2f} CPU h), the baseline check ({check / 60:.1f} CPU "
        f"min) and the pre-check ({pre / 3600:.2f} CPU h): {total / 3600:.2f} CPU hours, one thread per run."
    )


def block(
    screen: dict[str, Any], confirm: dict[str, Any] | None, baselines: dict[str, Any], precheck: dict[str, Any] | None
) -> str:
    """The whole section. ``screen``, ``confirm``: results files of the first screen and of the confirmation (whose
    seed-0 search runs are the screen's, under the same keys); ``baselines``: the decoder table's runs."""
    options = {**screen["runs"], **(confirm["runs"] if confirm else {})}
    searches = {**baselines, **{k: r for k, r in options.items() if r["phase"] == "search"}}
    parts = [
        "Produced by `benchmarks/decoder_screen.py` and rendered by `benchmarks/render_decoder_screen.py`: the decoder "
        "table's grid at r = 8 (init_r 12, scale 16 / 12) and, where a table says so, r = 2 (init_r 3). Screen: "
        "seed 0 on the 300-example validation slice (a single example is 0.33 points), each start at a short lr "
        "ladder; the AdaLoRA and LoRA rows are the decoder "
        'table\'s own seed-0 lr-search runs. The lora start is `AdaLoRAConfig.triplet_init="lora"` '
        "(`--triplet-init lora`): P = 0, lambda = 1, Q as LoRA's A, the base weights untouched. Its two variations "
        "are flags the CLI already has: `--orth-reg-weight 0` (no orthogonal regulariser) and `--alpha 24` (alpha / "
        "init_r = 24 / 1.5 r, LoRA's scale 16 / r, where the table's alpha 16 gives 2/3 of it). Rows marked "
        "*prototype, not offered* were measured with a prototype whose options the library does not have.",
        check_line(screen),
    ]
    if precheck:
        parts.append(f"Pre-check, TREC-6, first {precheck['steps']} of 150 steps:\n\n{precheck_table(precheck)}")
    parts += [screen_tables(searches), f"Summary (best lr by the table's rule):\n\n{summary_table(searches)}"]
    other_budgets = sorted({r["budget"] for r in options.values()} - {8})
    parts += [screen_tables(searches, budget) for budget in other_budgets]
    if confirm and any(r["phase"] == "final" for r in confirm["runs"].values()):
        parts.append(
            "Confirmation: seeds 1-3 on the test split at the lr the screen chose, beside the decoder table's final "
            f"rows (the cells confirmed so far):\n\n{confirmation_table(confirm, baselines)}"
        )
    else:
        parts.append("Confirmation: no final run yet.")
    parts.append(cost_line(options, screen, precheck))
    return "\n\n".join(parts)


def read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screen", type=Path, default=RESULTS / "decoder_screen.json")
    confirms = sorted(p for p in RESULTS.glob("decoder_confirm*.json") if "smoke" not in p.name)
    parser.add_argument("--confirm", type=Path, nargs="+", default=confirms, help="results files, one per grid")
    parser.add_argument("--precheck", type=Path, default=RESULTS / "decoder_screen_precheck.json")
    parser.add_argument("--baselines", type=Path, default=RESULTS / "decoder_table.json")
    parser.add_argument("--doc", type=Path, default=None, help="also write the section into this markdown file")
    args = parser.parse_args(argv)
    screen = read(args.screen) or {"runs": {}}
    confirms = [c for c in map(read, args.confirm) if c is not None]
    confirm = {"runs": {k: r for c in confirms for k, r in c["runs"].items()}} if confirms else None
    text = block(screen, confirm, json.loads(args.baselines.read_text())["runs"], read(args.precheck))
    print(text)
    if args.doc is not None:
        doc = args.doc.read_text() if args.doc.is_file() else ""
        if BEGIN not in doc:
            doc = doc.rstrip("\n") + f"\n\n{HEADING}\n\n{BEGIN}\n{END}\n"
        tmp = args.doc.with_name(args.doc.name + ".tmp")  # a reader never sees half a file
        tmp.write_text(replace_between_markers(doc, text, BEGIN, END) or doc)
        os.replace(tmp, args.doc)


if __name__ == "__main__":
    main()
