"""Why adapters got no gradient: the frameworks that bypass a module, read from the module names.

An adapter whose module never feeds the loss scores zero importance and is pruned first; the allocator warns once,
and this names the likeliest cause so that the warning says what to change.
"""

from __future__ import annotations

from collections.abc import Sequence

LM_HEADS = ("lm_head", "embed_out", "output_projection")
"""Last name components of language-model heads (Llama, GPT-NeoX, fairseq)."""


def no_gradient_cause(names: Sequence[str]) -> str:
    """The likeliest reason adapters on modules ``names`` got no gradient."""
    heads = [n for n in names if n.rsplit(".", 1)[-1] in LM_HEADS]
    if heads:
        return (
            f"{heads[0]} is a language-model head: trainers with a fused LM-head loss (TRL's SFTTrainer and "
            "DPOTrainer) compute log-probabilities from its weight directly and never call the module, so its "
            "adapter takes no part in the loss."
        )
    if any("pooler" in n for n in names):
        return "The pooler is unused when the loss reads hidden states only (e.g. BERT's pooler under a custom head)."
    return "They do not feed the loss (modules the forward pass never calls, or whose output is discarded)."


def no_gradient_warning(names: Sequence[str]) -> str:
    """The warning for adapters on modules ``names`` (sorted) that received no gradient."""
    listed = f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
    return (
        f"AdaLoRA adapters received no gradient and count as unimportant (zero sensitivity): {listed}. "
        f"{no_gradient_cause(names)} Drop them from target_modules."
    )
