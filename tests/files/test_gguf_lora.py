"""llama.cpp LoRA adapter export, read back with the ``gguf`` reader and applied by llama.cpp's rules.

The rules (llama.cpp's ``llama-adapter.cpp`` / graph, see docs/adapter-files.md): each ``<tensor>.lora_a`` /
``.lora_b`` pair adds ``alpha / k * lora_b @ lora_a`` with k the rank of that pair and alpha the file's one
``adapter.lora.alpha``; ``token_embd``'s ``lora_a`` is stored transposed; Llama's q/k rows are in llama.cpp's
rotary order (pairs ``(2j, 2j+1)`` of a head are HF's rows ``j`` and ``j + head_dim / 2``). The test applies those
rules to the plain base model and compares its logits with our adapted model's.
"""

import copy

import numpy as np
import pytest
import torch
from adapter_helpers import fake_training, logits
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch

from adalora import AdaLoRAConfig, inject, save_adapter
from adalora.files.gguf_lora import export_gguf, permute_rows_for_rope
from adalora.run.convert import export_output_dir

gguf = pytest.importorskip("gguf")

LLAMA_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GPT2_NAMES = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
CASES = {
    "llama": (
        tiny_llama,
        AdaLoRAConfig(
            target_modules=[
                "embed_tokens",
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            init_r=6,
            target_r=2,
            alpha=8.0,
        ),
        "llama",
    ),
    "gpt2": (
        tiny_gpt2,
        AdaLoRAConfig(target_modules=["c_attn", "c_proj", "c_fc"], init_r=6, target_r=2, alpha=12.0),
        "gpt2",
    ),
}
RANKS = [3, 0, 1, 2, 6, 4, 2, 5]  # the first module (Llama's embedding) keeps rank 3; one module per cycle ends at 0


def _hf_module(case: str, gguf_name: str) -> str:
    """The transformers module a llama.cpp tensor name belongs to (written out here, not taken from gguf-py)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens"
    _, block, kind, _ = gguf_name.split(".")
    if case == "llama":
        return f"model.layers.{block}.{LLAMA_NAMES[kind]}"
    return f"transformer.h.{block}.{GPT2_NAMES[kind]}"


def _rope_rows_to_hf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows in llama.cpp's rotary order back to HF's: llama.cpp row ``2j + c`` of a head is HF row ``c hd/2 + j``."""
    hd = w.shape[0] // n_head
    llama_row_of_hf_row = [h * hd + 2 * j + c for h in range(n_head) for c in range(2) for j in range(hd // 2)]
    return w[llama_row_of_hf_row]


def read_lora_gguf(path) -> tuple[dict[str, str | float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    pairs = {
        name.removesuffix(".lora_a"): (tensor, tensors[name.removesuffix(".lora_a") + ".lora_b"])
        for name, tensor in tensors.items()
        if name.endswith(".lora_a")
    }
    assert len(tensors) == 2 * len(pairs)
    return fields, pairs


@torch.no_grad()
def apply_like_llama_cpp(base, path, case: str):
    """``base`` with every pair of the GGUF file added by llama.cpp's rules (a copy; ``base`` is left alone)."""
    model = copy.deepcopy(base)
    fields, pairs = read_lora_gguf(path)
    alpha = fields["adapter.lora.alpha"]
    cfg = model.config
    for name, (a, b) in pairs.items():
        k = b.shape[1]  # ggml b->ne[0]: the rank llama.cpp divides by
        module = model.get_submodule(_hf_module(case, name))
        if name == "token_embd.weight":  # lora_a (n_vocab, k): rows gathered by token id, then b
            module.weight += (alpha / k * b @ a.T).T
            continue
        delta = alpha / k * b @ a  # (d_out, d_in), in llama.cpp's row order
        if case == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            delta = _rope_rows_to_hf(delta, heads)
        module.weight += delta.T if case == "gpt2" else delta  # GPT-2's Conv1D stores (d_in, d_out)
    return model, fields, pairs


def test_rope_permutation_pairs_the_halves_of_each_head():
    rows = torch.arange(16).unsqueeze(1)  # 2 heads of head_dim 8: HF halves [0..3 | 4..7]
    permuted = permute_rows_for_rope(rows, n_head=2).squeeze(1).tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    torch.testing.assert_close(_rope_rows_to_hf(permute_rows_for_rope(rows, 2), 2), rows)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_adapter_applied_by_llama_cpp_rules_gives_our_logits(tmp_path, case):
    build, config, arch = CASES[case]
    base = build()
    model = inject(copy.deepcopy(base), config)
    kept = fake_training(model, RANKS)
    x = token_batch()
    expected = logits(model, x)

    export_gguf(model, tmp_path / "lora.gguf", config, base_model_name="org/base")
    served, fields, pairs = apply_like_llama_cpp(base, tmp_path / "lora.gguf", case)

    assert fields["general.architecture"] == arch
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.name"] == "org/base"
    assert fields["general.quantization_version"] == 2
    assert {_hf_module(case, n) for n in pairs} == {n for n, k in kept.items() if k > 0}  # rank 0 left out
    assert all(b.shape[1] == kept[_hf_module(case, n)] for n, (_, b) in pairs.items())  # each at its own rank
    if case == "llama":
        assert pairs["token_embd.weight"][0].shape == (100, kept["model.embed_tokens"])  # lora_a transposed
    assert logits(base, x).sub(expected).abs().max() > 1e-2  # the adapter does change the outputs
    torch.testing.assert_close(logits(served, x), expected, atol=1e-5, rtol=1e-4)


def test_gguf_from_a_run_directory_equals_the_library_export(tmp_path):
    _, config, _ = CASES["llama"]
    model = inject(tiny_llama(), config)
    fake_training(model, RANKS)
    export_gguf(model, tmp_path / "direct.gguf", config, base_model_name="org/base")
    save_adapter(model, tmp_path / "run" / "adapter", config, metadata={"model": "org/base"})
    written = export_output_dir(tmp_path / "run", format="gguf")
    assert written == tmp_path / "run" / "export-lora.gguf"
    direct_fields, direct = read_lora_gguf(tmp_path / "direct.gguf")
    run_fields, from_run = read_lora_gguf(written)
    assert direct_fields == run_fields
    assert direct.keys() == from_run.keys()
    assert all(torch.equal(direct[n][i], from_run[n][i]) for n in direct for i in (0, 1))


def test_gguf_refuses_what_llama_cpp_cannot_apply(tmp_path):
    bert_config = AdaLoRAConfig(target_modules=["query"], init_r=4, target_r=2, modules_to_save=("classifier",))
    bert = inject(tiny_bert(), bert_config)
    fake_training(bert, [2])
    with pytest.raises(
        ValueError, match="no llama.cpp LoRA mapping for base model class BertForSequenceClassification"
    ):
        export_gguf(bert, tmp_path / "bert.gguf", bert_config)

    config = AdaLoRAConfig(target_modules=["q_proj"], init_r=4, target_r=2, modules_to_save=("lm_head",))
    model = inject(tiny_llama(), config)
    fake_training(model, [2])
    with pytest.raises(ValueError, match=r"modules_to_save \(lm_head\) cannot go into it"):
        export_gguf(model, tmp_path / "llama.gguf", config)
    assert not list(tmp_path.iterdir())
