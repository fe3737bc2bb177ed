"""A llama.cpp LoRA adapter file (GGUF) for decoder models, written as llama.cpp's own converter writes it.

What llama.cpp expects (its ``convert_lora_to_gguf.py`` writes it, ``llama-adapter.cpp`` checks it, the graph
applies it):

- metadata: ``general.architecture`` (the base GGUF's, e.g. ``llama``, ``gpt2``), ``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha`` (float32), plus ``general.name`` and
  ``general.quantization_version``;
- per adapted matrix, the base tensor's GGUF name with ``.lora_a`` / ``.lora_b``: e.g.
  ``blk.0.attn_q.weight.lora_a``. Torch shapes ``lora_a (k, d_in)``, ``lora_b (d_out, k)`` (ggml ``ne`` is the
  reverse): the loader checks ``a.ne[0] == W.ne[0]`` (d_in) and ``b.ne[1] == W.ne[1]`` (d_out). For
  ``token_embd`` the loader and graph want ``lora_a`` transposed, ``(n_vocab, k)``;
- at run time each pair adds ``adapter_scale * alpha / k * b (a x)`` with k = ``b.ne[0]``, *that tensor's*
  rank (``llama_adapter_lora_weight::get_scale``). That is the compact layout's rule
  (:mod:`adalora.files.lora_layout`), so the compact factors and its ``lora_alpha`` are written.

Per architecture, the converter's base-model transforms apply to the update ``B A`` and so to ``lora_b``:

- Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``): the rows of ``q_proj`` and ``k_proj`` are
  permuted for llama.cpp's rotary layout (``LlamaModel.permute``: per head, reshape ``(2, head_dim / 2)`` and
  swap; ``k_proj`` with the key/value head count);
- GPT-2: its ``Conv1D`` weights are stored ``(d_in, d_out)`` and transposed by the converter into the usual
  ``(d_out, d_in)``. Our factors are already in ``(d_out, d_in)`` orientation (as PEFT's are), so no transpose is
  applied: ``lora_a (k, d_in)``, ``lora_b (d_out, k)``, which is what the loader's shape check accepts. (Run on a
  PEFT adapter of GPT-2, llama.cpp's converter applies the base weight's transpose to the LoRA product too, which
  swaps the factors' roles: refused by the loader for ``c_attn``/``c_fc``, transposed for square ``c_proj``.)
- Qwen2/Qwen3: no transform.

Tensors are written as float32 (the converter's default ``--outtype f32``). GGUF adapters carry LoRA pairs only:
``modules_to_save`` cannot be expressed and are refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AdaLoRAConfig
from .atomic import atomic_write, reporting_writes
from .export_source import ExportSource
from .lora_layout import lay_out
from .updates import ModuleUpdate


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp's converter treats one transformers model class.

    Attributes:
        arch: the ``gguf.MODEL_ARCH`` member name (``"LLAMA"``, ``"GPT2"``, ...).
        permute_qk: whether ``q_proj``/``k_proj`` rows are permuted (``LlamaModel.undo_permute``).
    """

    arch: str
    permute_qk: bool = False


# transformers class name -> what llama.cpp's convert_hf_to_gguf.py registers for it.
GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "LlamaForCausalLM": GGUFArchitecture("LLAMA", permute_qk=True),
    "MistralForCausalLM": GGUFArchitecture("LLAMA", permute_qk=True),
    "GPT2LMHeadModel": GGUFArchitecture("GPT2"),
    "Qwen2ForCausalLM": GGUFArchitecture("QWEN2"),
    "Qwen3ForCausalLM": GGUFArchitecture("QWEN3"),
}


def export_gguf(
    model: nn.Module, path: str | os.PathLike[str], config: AdaLoRAConfig, *, base_model_name: str | None = None
) -> Path:
    """Write ``model``'s adapters as a llama.cpp LoRA adapter GGUF file, atomically.

    ``llama-cli -m base.gguf --lora path`` (or ``llama_adapter_lora_init``) then adds our update to every adapted
    matrix. Needs the ``gguf`` package (``pip install gguf``).

    Args:
        model: a transformers decoder with AdaLoRA adapters (a class in :data:`GGUF_ARCHITECTURES`).
        path: the ``.gguf`` file to create or replace.
        config: the configuration the model was injected with.
        base_model_name: written as ``general.name``; default: the model's ``name_or_path``.

    Raises:
        ValueError: for an architecture llama.cpp's converter does not map here, a module with no llama.cpp
            tensor, ``modules_to_save``, or every rank 0.
        ImportError: if ``gguf`` is not installed.
    """
    try:
        source = ExportSource.from_model(model, config, base_model_name)
    except ValueError as error:
        raise ValueError(f"export_gguf: {error}") from None
    return write_gguf(source, path)


def write_gguf(source: ExportSource, path: str | os.PathLike[str]) -> Path:
    """Write ``source`` as a llama.cpp LoRA adapter GGUF file (see the module docstring), atomically."""
    arch, class_name = _architecture(source)
    if source.modules_to_save:
        raise ValueError(
            f"export_gguf: a llama.cpp LoRA adapter holds LoRA pairs only, so modules_to_save "
            f"({', '.join(source.config.modules_to_save)}) cannot go into it. Merge the adapter instead "
            "(adalora merge), or train without modules_to_save."
        )
    try:
        import gguf
    except ImportError as error:
        raise ImportError("export_gguf needs the 'gguf' package: pip install gguf") from error
    try:
        laid_out = lay_out(source.updates, "compact")
    except ValueError as error:
        raise ValueError(f"export_gguf: {error}") from None
    hparams = source.base_config or {}
    n_blocks = _first(hparams, "num_hidden_layers", "n_layer")
    if n_blocks is None:
        raise ValueError("export_gguf: the base model's config has no layer count (num_hidden_layers / n_layer).")
    model_arch = getattr(gguf.MODEL_ARCH, arch.arch)
    names = gguf.get_tensor_name_map(model_arch, int(n_blocks))
    tensors: list[tuple[str, torch.Tensor]] = []
    for update in laid_out.updates:
        tensors.extend(_gguf_pair(update, names, arch, hparams, class_name))

    path = Path(path)
    # Written whole aside, then copied in atomically; a refused write names the file it was for.
    with reporting_writes(path), tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        written = Path(tmp) / path.name
        writer = gguf.GGUFWriter(str(written), gguf.MODEL_ARCH_NAMES[model_arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(laid_out.lora_alpha))
        if source.base_model_name:
            writer.add_name(str(source.base_model_name))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, tensor in tensors:
            writer.add_tensor(name, tensor.to(torch.float32).contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(written, "rb") as data:
            atomic_write(path, lambda file: shutil.copyfileobj(data, file))
    return path


def _architecture(source: ExportSource) -> tuple[GGUFArchitecture, str]:
    class_name = (source.base_class or "").rpartition(".")[2]
    arch = GGUF_ARCHITECTURES.get(class_name)
    if arch is None:
        supported = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise ValueError(
            f"export_gguf: no llama.cpp LoRA mapping for base model class {class_name or '(unknown)'}; llama.cpp "
            f"adapters are for decoders, and this version maps: {supported}. Export as PEFT instead (--format peft)."
        )
    return arch, class_name


def _gguf_pair(
    update: ModuleUpdate, names: Any, arch: GGUFArchitecture, hparams: dict[str, Any], class_name: str
) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` of one module's ``lora_a`` and ``lora_b`` in llama.cpp's names and layouts."""
    base = names.get_name(update.name)
    if base is None:
        raise ValueError(
            f"export_gguf: module '{update.name}' has no llama.cpp tensor in the {class_name} layout, so llama.cpp "
            "cannot apply its update. Leave it out of target_modules, or export as PEFT."
        )
    tensor_name = f"{base}.weight"
    f = update.factors
    if update.layer_type == "embedding":
        if base != "token_embd":
            raise ValueError(f"export_gguf: embedding '{update.name}' maps to '{base}', not llama.cpp's token_embd.")
        a = update.adapter_class.lora_tensors(f, update.weight_shape, update.options)["lora_embedding_A"]
        return [(f"{tensor_name}.lora_a", a.T.contiguous()), (f"{tensor_name}.lora_b", f.P.contiguous())]
    if update.layer_type not in ("linear", "conv1d"):
        raise ValueError(
            f"export_gguf: module '{update.name}' is a {update.layer_type} layer; llama.cpp LoRA adapters cover "
            "linear layers and the token embedding only."
        )
    if base == "output" and hparams.get("tie_word_embeddings"):
        raise ValueError(
            f"export_gguf: '{update.name}' is tied to the token embedding, so the base GGUF has no separate output "
            "tensor for llama.cpp to adapt. Leave it out of target_modules."
        )
    a = f.lora_a()  # (k, d_in)
    b = f.P.contiguous()  # (d_out, k)
    if arch.permute_qk and update.name.endswith(("q_proj", "k_proj")):
        n_head = int(_first(hparams, "num_attention_heads", "n_head"))
        if update.name.endswith("k_proj"):
            n_head = int(_first(hparams, "num_key_value_heads") or n_head)
        b = permute_rows_for_rope(b, n_head)
    return [(f"{tensor_name}.lora_a", a), (f"{tensor_name}.lora_b", b)]


def permute_rows_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives Llama ``q_proj``/``k_proj`` (``LlamaModel.permute``).

    Rows of each head, ``(2, head_dim / 2)`` (HF's rotate-half halves), are interleaved into
    ``(head_dim / 2, 2)`` pairs, the layout llama.cpp's rotary embedding reads.

    Args:
        weight: ``(n_head * head_dim, ...)``.
        n_head: the number of heads these rows belong to (key/value heads for ``k_proj``).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _first(mapping: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None
