"""Shared fixtures: tiny randomly initialised transformers models built from configs (nothing to download), and
the small AdaLoRA schedule the training tests run them with."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adalora import AdaLoRAConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, and the session's thread count back afterwards (``adalora train`` sets
    it for its process). Tiny models run as fast on one thread, and a shared machine's busy cores do not slow
    them down. Use it for a whole module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> AdaLoRAConfig:
    """AdaLoRA on tiny_bert's query and value projections (4 triplets each, 2 kept on average) with a schedule a
    few steps long: t_i = 1, t_f = 2, reallocation at every step, T left to the training integration, and the
    classifier trained in full. A test names only what it changes (``small_config(total_steps=6)``).

    A plain function rather than a fixture: tests build their configuration at module level and in parameters."""
    settings = dict(
        target_modules=("query", "value"),
        init_r=4,
        target_r=2,
        warmup_steps=1,
        final_steps=2,
        mask_interval=1,
        total_steps=None,
        modules_to_save=("classifier",),
    )
    return AdaLoRAConfig(**{**settings, **overrides})


def tiny_bert(num_labels: int = 2, layers: int = 2, hidden: int = 32):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(layers: int = 2, hidden: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def token_batch(batch: int = 4, length: int = 8, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


class RecordAllocatedShapes(TorchDispatchMode):
    """Inside the block, records the shape of every tensor an op allocates (views excluded): lets a test check
    that a forward never materialises, say, the full (d_out, d_in) update."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
            self.shapes.append(tuple(out.shape))
        return out


# Per MoE model type: the config fields for the number of experts and for the width of each.
MOE_FIELDS = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "mixtral": ("num_local_experts", "intermediate_size"),
}


def tiny_moe(model_type: str, layers: int = 2, hidden: int = 16, experts: int = 4, top_k: int = 2, vocab: int = 100):
    """A mixture-of-experts decoder whose every layer is sparse: ``mlp.experts.gate_up_proj (E, 2I, H)``,
    ``mlp.experts.down_proj (E, H, I)`` with I = hidden / 2, and a router ``mlp.gate``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    count, width = MOE_FIELDS[model_type]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts_per_tok=top_k,
        max_position_embeddings=64,
        **{count: experts, width: hidden // 2},
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_qwen3_moe(**sizes):
    return tiny_moe("qwen3_moe", **sizes)


def tiny_mixtral(**sizes):
    return tiny_moe("mixtral", **sizes)
