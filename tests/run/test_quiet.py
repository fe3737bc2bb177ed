"""Nothing from optional packages prints in a normal run: ``adalora train`` (and ``merge``) in a fresh process, as a
user runs them, with its real stderr.

Our own stderr is the progress bar. tqdm draws it as segments separated by carriage returns (a final newline
ends it), each beginning with the bar's description, the method's name, ``adalora`` here, or ``adalora
(evaluating)`` while the held-out split is scored, followed by a colon and the percentage; tqdm clears a
finished bar with spaces. Every other non-blank segment comes from someone else, and fails the test. The process
also reports every attempt to open a network connection on stderr (an audit hook), so a package reaching for a
model hub fails it too, whether or not this machine is online.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model
from lm_helpers import qa_train_args, write_tiny_lm

# ``python -c`` with this as the program: the CLI, with network connections reported on stderr.
CLI = (
    "import sys\n"
    "sys.addaudithook(lambda event, args: event == 'socket.connect' and print('connect', args, file=sys.stderr))\n"
    "from adalora.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
OUR_BAR = re.compile(r"adalora( \(evaluating\))?: +\d+%\|")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TQDM_"))}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a hub that is never there: reaching for it cannot succeed
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env, timeout=600)


def foreign_lines(stderr: str) -> list[str]:
    """The stderr segments that are neither blank nor a segment of our progress bar."""
    segments = re.split(r"[\r\n]", stderr)
    return [s for s in segments if s.strip() and not OUR_BAR.match(s)]


def test_the_bar_check_tells_our_lines_from_others() -> None:
    ours = "adalora:  50%|█████     | 3/6 [00:00<00:00, 24.20step/s, loss=2.8]\radalora (evaluating): 100%|██| 6/6\r"
    assert foreign_lines(ours + " " * 40 + "\n") == []
    theirs = "Loading weights: 100%|██████████| 39/39"
    assert foreign_lines(ours + theirs + "\n") == [theirs]
    assert foreign_lines("W1207 01:05:30 torch/utils/_pytree.py:630] <enum 'KernelPreference'>\n") != []


@pytest.mark.slow
def test_a_default_run_and_its_merge_print_only_our_own_lines(tmp_path) -> None:
    """``adalora train`` with its defaults (progress bar on) on a tiny BERT, then ``adalora merge``."""
    model, data, out = write_tiny_model(tmp_path / "model"), write_tiny_data(tmp_path / "data"), tmp_path / "run"
    args = [a for a in tiny_train_args(model, data, out) if a != "--no-progress"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert OUR_BAR.search(result.stderr)  # the bar is there, and is all there is
    assert foreign_lines(result.stderr) == []
    merged = run_cli("merge", str(out), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    assert merged.stderr == ""
    assert merged.stdout.splitlines() == [
        f"merged model written to {tmp_path / 'merged'} (load it with from_pretrained; no adalora needed)"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["bnb-4bit", "bnb-8bit"])
def test_a_quantized_causal_lm_run_prints_only_our_own_lines(tmp_path, quantize: str) -> None:
    """bitsandbytes 4-bit (which on this CPU used to try to fetch a kernel from the Hugging Face Hub at import, and
    to warn at the first step that its inference kernel has no backward) and 8-bit (which warned at every
    evaluation batch that it casts its inputs to float16), in bfloat16, evaluation before training included."""
    model = write_tiny_lm(tmp_path / "model", hidden=64)  # 64 inputs at least for 4-bit layers
    result = run_cli(*qa_train_args(model, tmp_path, "--precision", "bf16", "--quantize", quantize))
    assert result.returncode == 0, result.stderr
    assert "held-out perplexity before training" in result.stdout
    assert foreign_lines(result.stderr) == []
    generated = run_cli("generate", str(tmp_path / "run"), "--prompt", "Q: the cat sat", "--max-new-tokens", "3")
    assert generated.returncode == 0 and generated.stderr == "", generated.stderr  # the base quantized again


def test_generate_prints_the_completion_only(tmp_path) -> None:
    """``adalora generate`` on a causal-lm run, with the adapter and merged: its stdout is the completion."""
    import torch

    from adalora.cli import main

    model, threads = write_tiny_lm(tmp_path / "model"), torch.get_num_threads()
    try:
        assert main([*qa_train_args(model, tmp_path, "--epochs", "1"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)  # the run set one thread for this process
    for merged in ((), ("--merged",)):
        result = run_cli(
            "generate", str(tmp_path / "run"), "--prompt", "Q: the dog sat", "--max-new-tokens", "3", *merged
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert len(result.stdout.splitlines()) == 1


def test_no_progress_bars_silences_transformers_bars_and_the_gguf_converter_and_puts_them_back(capfd) -> None:
    """GGUF files (the packaged SmolLM2) are converted under a plain tqdm of transformers' GGUF loader, which
    transformers' own ``disable_progress_bar`` does not reach; loading and saving use transformers' tqdm."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    from adalora.run.quiet import no_progress_bars

    hf_logging.enable_progress_bar()
    converter = gguf_loading.tqdm
    with no_progress_bars():
        list(gguf_loading.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        list(hf_logging.tqdm(range(3), desc="Loading weights"))
    assert capfd.readouterr().err == ""
    assert gguf_loading.tqdm is converter and hf_logging.is_progress_bar_enabled()
    list(gguf_loading.tqdm(range(3), desc="Converting"))
    assert "Converting" in capfd.readouterr().err  # the check can fail: outside the block the bar shows


def test_importing_bitsandbytes_for_a_run_leaves_the_kernels_package_as_it_was() -> None:
    """``kernels`` is hidden only while bitsandbytes imports (so that it cannot fetch a hub kernel)."""
    from adalora.run.quantize import require_package

    before = sys.modules.get("kernels")
    require_package("bnb-4bit")
    assert sys.modules.get("kernels") is before
    assert "bitsandbytes" in sys.modules
