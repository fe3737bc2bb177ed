"""Quantized bases (QLoRA-style AdaLoRA): bitsandbytes 4-bit (nf4/fp4, with and without double quantization) and
8-bit layers, torchao NF4 and int8 weight-only weights, on tiny Llama/BERT models, on the CPU.

bitsandbytes >= 0.47 runs its layers on the CPU (forward and backward to the input); the CUDA variants at the end
run when a GPU is present.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch
from adapter_helpers import fake_training
from conftest import small_config, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import nn

from adalora import AdaLoRAConfig, RankAllocator, compact, export_peft, find_adapters, inject, merge, unload
from adalora.files.adapter import base_model_fingerprint, base_model_precision, load_adapter, save_adapter
from adalora.layers import SVDLinear4bit, SVDLinear8bitLt, SVDTorchAOLinear, keep_differentiable_layout, logical_shape

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

from adalora.layers import QUANTIZATIONS  # noqa: E402
from adalora.run.quantize import QuantizationUnavailable, quantize_model  # noqa: E402

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG = small_config(target_modules=LLAMA_TARGETS, final_steps=1, total_steps=6, modules_to_save=())
# Every kind of quantized base: bitsandbytes 4-bit in its four flavours, 8-bit, and torchao's two.
KINDS = ("bnb-nf4-dq", "bnb-nf4", "bnb-fp4-dq", "bnb-fp4", "bnb-8bit", "torchao-nf4", "torchao-int8")
ADAPTER_CLASS = {"bnb-8bit": SVDLinear8bitLt, "torchao-nf4": SVDTorchAOLinear, "torchao-int8": SVDTorchAOLinear}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _bnb_4bit(linear: nn.Linear, quant_type: str, double: bool) -> nn.Module:
    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=torch.float32,
        compress_statistics=double, quant_type=quant_type,
    )  # fmt: skip
    module.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, compress_statistics=double, quant_type=quant_type
    )
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.to("cpu")  # bitsandbytes quantizes on the move


def quantized(model: nn.Module, kind: str) -> nn.Module:
    """A quantized copy of ``model`` (the original is left as it is)."""
    model = copy.deepcopy(model)
    if kind in ("bnb-8bit", "torchao-nf4", "torchao-int8"):
        quantize_model(model, kind)
        return model
    _, quant_type, *double = kind.split("-")
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.endswith(LLAMA_TARGETS):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _bnb_4bit(module, quant_type, bool(double)))
    return model


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama(hidden=64)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Training-mode forward with gradients on: the path training takes (bitsandbytes' CPU inference kernel,
    used in eval mode without gradients, computes in bfloat16 and changes state the first time it runs)."""
    model.train()
    return model(x).logits.detach()


# ---------------------------------------------------------------------- inject, forward, gradients
@pytest.mark.parametrize("kind", KINDS)
def test_forward_at_init_equals_the_quantized_model(llama: nn.Module, kind: str) -> None:
    x = token_batch(vocab=100)
    base = quantized(llama, kind)
    expected = logits(base, x)
    model = inject(base, CONFIG)
    adapters = find_adapters(model)
    assert len(adapters) == 2 * len(LLAMA_TARGETS)
    for name, adapter in adapters:
        assert type(adapter) is ADAPTER_CLASS.get(kind, SVDLinear4bit)
        layer = llama.get_submodule(name)
        # The logical shape, not the packed storage's (a 4-bit weight is stored as (out * in / 2, 1) bytes).
        assert adapter.P.shape == (layer.out_features, 4) and adapter.Q.shape == (4, layer.in_features)
        assert adapter.P.dtype == adapter.Q.dtype == adapter.E.dtype == torch.float32
    assert torch.equal(logits(model, x), expected)
    # Inference (eval, no gradients) too, on layers kept off bitsandbytes' CPU inference kernel for 4-bit weights, as
    # inject keeps them (see test_a_4bit_layer_repacked_before_inject_is_put_back for a base that was not).
    base = quantized(llama, kind).eval()
    keep_differentiable_layout(base)
    with torch.no_grad():
        expected = base(x).logits
        assert torch.equal(inject(base, CONFIG).eval()(x).logits, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_p_lambda_q_and_never_the_quantized_weights(llama: nn.Module, kind: str) -> None:
    model = inject(quantized(llama, kind), CONFIG)
    fake_training(model, ranks=[4])  # lambda != 0, so that P and Q get gradients too
    model.train()
    x = token_batch(vocab=100)
    model(x, labels=x).loss.backward()
    for name, adapter in find_adapters(model):
        for attr in ("P", "E", "Q"):
            grad = getattr(adapter, attr).grad
            # Layer 0's adapters are reached only through layer 1's quantized layers: backward to their input works.
            assert grad is not None and grad.abs().sum() > 0, (name, attr)
        assert not adapter.weight.requires_grad and adapter.weight.grad is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{a}" for n, _ in find_adapters(model) for a in ("P", "E", "Q")}


def test_an_allocation_schedule_runs_and_compaction_keeps_the_output(llama: nn.Module) -> None:
    model = inject(quantized(llama, "bnb-nf4-dq"), CONFIG)
    allocator = RankAllocator(model, CONFIG)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = token_batch(vocab=100)
    model.train()
    for _ in range(CONFIG.total_steps):
        (model(x, labels=x).loss + allocator.regularization()).backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    kept = sum(a.kept_rank() for _, a in find_adapters(model))
    assert kept == CONFIG.target_r * len(find_adapters(model))
    before = logits(model, x)
    compact(model, optimizer)
    assert sum(a.r for _, a in find_adapters(model)) == kept
    torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_the_quantized_models(llama: nn.Module) -> None:
    for kind in ("bnb-nf4-dq", "bnb-8bit"):
        base = quantized(llama, kind)
        keys = set(base.state_dict())
        model = inject(base, CONFIG)
        adapted = model.state_dict()
        extra = {k for k in adapted if k.rsplit(".", 1)[-1] in ("P", "E", "Q", "rank_mask")}
        assert set(adapted) - extra == keys  # 'q_proj.weight.absmax', not 'q_proj.base_layer.weight.absmax'
    # They load back (bitsandbytes' 4-bit layers cannot load_state_dict their own quantization state; 8-bit can).
    fresh = inject(quantized(llama, "bnb-8bit"), CONFIG)
    fake_training(model, ranks=[2])
    fresh.load_state_dict(model.state_dict())
    x = token_batch(vocab=100)
    assert torch.equal(logits(fresh, x), logits(model, x))


# ---------------------------------------------------------------------- gradients through an evaluation
def input_gradients(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """One training-mode backward: the loss, and for every adapter the gradients of its input and of its output.

    The embeddings' output is made a leaf that requires gradients, so that layer 0's inputs get gradients too.
    """
    model.train()
    grads: dict[str, tuple[torch.Tensor, ...]] = {}

    def record(name: str):
        return lambda module, grad_in, grad_out: grads.__setitem__(name, (grad_in[0], grad_out[0]))

    hooks = [a.register_full_backward_hook(record(name)) for name, a in find_adapters(model)]
    embeds = model.get_input_embeddings()(x).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=x).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.detach(), grads


@pytest.mark.parametrize("kind", KINDS)
def test_input_gradients_are_the_dequantized_layers_before_and_after_an_evaluation(llama: nn.Module, kind) -> None:
    """At lambda = 0 an adapter's input gradient is its quantized base's, ``g @ W``, W the dequantized weight.

    bitsandbytes repacks a 4-bit CPU weight at the first eval-mode forward without gradients (on AVX512-BF16 CPUs,
    like this one) for a kernel without backward: before inject kept it off, every 4-bit layer passed exactly 0 to
    its input afterwards. The reference weights are read before any evaluation."""
    x = token_batch(vocab=100)
    fresh, evaluated = (inject(quantized(llama, kind), CONFIG) for _ in range(2))
    dense = {name: adapter.dense_weight().float() for name, adapter in find_adapters(fresh)}
    evaluated.eval()
    with torch.no_grad():
        evaluated(x)
    (loss, grads), (loss_after, grads_after) = input_gradients(fresh, x), input_gradients(evaluated, x)
    assert len(grads) == len(dense) == 2 * len(LLAMA_TARGETS)
    for name, (grad_in, grad_out) in grads_after.items():
        expected = grad_out.float() @ dense[name]
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(grad_in.float(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # The evaluation changed nothing that training computes: the same loss and gradients, bit for bit.
    assert torch.equal(loss_after, loss)
    for name, (grad_in, grad_out) in grads.items():
        assert torch.equal(grads_after[name][0], grad_in) and torch.equal(grads_after[name][1], grad_out), name


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of an adapted bitsandbytes model whose bases are float ``nn.Linear`` layers holding the dequantized
    weights, with the same adapters."""
    twin = copy.deepcopy(model)
    for _, adapter in find_adapters(twin):
        adapter.base_layer = adapter.to_base(adapter.dense_weight().float())
    return twin


@pytest.mark.parametrize("kind", ["bnb-nf4-dq", "bnb-fp4", "bnb-8bit"])
def test_training_through_evaluations_follows_the_dequantized_float_model(llama: nn.Module, kind: str) -> None:
    """A tiny Llama trained on a quantized base with an evaluation before and between its steps, as ``adalora
    train`` runs: every step's loss and P, lambda, Q gradients (what the importance scores are made of) are those
    of the same adapters on the dequantized float model, layer 0's included."""
    x = token_batch(vocab=100)
    model = inject(quantized(llama, kind), CONFIG)
    fake_training(model, ranks=[4])  # lambda != 0 from the start, so that P and Q get gradients at every step
    for _, adapter in find_adapters(model):
        adapter.E.data.mul_(0.1)
    twin = float_twin(model)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (model, twin)]
    for step in range(4):
        for m in (model, twin):
            m.eval()
            with torch.no_grad():
                m(x)  # an evaluation: bitsandbytes' repacking point
            m.train()
            m(x, labels=x).loss.backward()
        for (name, a), (_, b) in zip(find_adapters(model), find_adapters(twin), strict=True):
            for attr in ("P", "E", "Q"):
                grad, expected = getattr(a, attr).grad, getattr(b, attr).grad
                assert expected.abs().max() > 0, (step, name, attr)
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["bnb-nf4-dq", "bnb-fp4"])
def test_a_4bit_layer_repacked_before_inject_is_put_back(llama: nn.Module, kind: str) -> None:
    """A model evaluated before inject (on this CPU bitsandbytes repacks its 4-bit weights then, rounding the block
    scales to bfloat16): inject puts every layer back in the layout whose product has a backward, with the scales
    it computed with (a double-quantized layer's are quantized to 8 bits again, as bitsandbytes' own inverse does)."""
    import bitsandbytes.functional as bnbf

    x = token_batch(vocab=100)
    base = quantized(llama, kind).eval()
    layers = {n: m for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    rounded = {}  # each layer's weight with its block scales rounded to bfloat16, as the repacking leaves them
    for name, layer in layers.items():
        state = copy.deepcopy(layer.weight.quant_state)
        if state.nested:
            state.absmax, state.nested = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset, False
        state.absmax = state.absmax.bfloat16().float()
        rounded[name] = bnbf.dequantize_4bit(layer.weight.data, state)
    with torch.no_grad():
        expected = base(x).logits
    assert getattr(layers["model.layers.0.self_attn.q_proj"].weight.quant_state, "packing_format_for_cpu", False) == (
        layers["model.layers.0.self_attn.q_proj"].support_avx512bf16_for_cpu
    )  # repacked if and only if the CPU has AVX512-BF16
    model = inject(base, CONFIG)
    for name, layer in layers.items():
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), name
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        if "dq" in kind:  # within the 8-bit quantization of the scales
            assert (weight - rounded[name]).abs().max() <= 2**-8 * rounded[name].abs().max(), name
        else:
            assert torch.equal(weight, rounded[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, expected, rtol=0.02, atol=0.02)  # bf16 kernel vs fp32
    _, grads = input_gradients(model, x)
    for name, adapter in find_adapters(model):
        grad_in, grad_out = grads[name]
        expected_grad = grad_out @ adapter.dense_weight().float()
        torch.testing.assert_close(grad_in, expected_grad, rtol=1e-5, atol=1e-6 * float(expected_grad.abs().max()))


def test_a_4bit_causal_lm_run_evaluates_and_still_trains_with_the_dequantized_gradients(tmp_path, monkeypatch) -> None:
    """``adalora train --task causal-lm --precision bf16 --quantize bnb-4bit``: perplexity is measured before
    training and after each epoch (eval mode, no gradients), and at every training step each 4-bit layer of layer 1
    passes ``g @ W`` to its input, W its dequantized weight read before the first evaluation. (Layer 0's first
    projections read the frozen embeddings, whose inputs need no gradient.)"""
    import bitsandbytes.functional as bnbf
    from lm_helpers import qa_train_args, write_tiny_lm

    import adalora.run.train
    from adalora.cli import main

    checked, wrong = Counter(), []

    def check(name: str, dense: torch.Tensor, module, grad_in, grad_out) -> None:
        if grad_in[0] is None:
            return
        checked[name] += 1
        expected = grad_out[0].float() @ dense
        scale = float(expected.abs().max())
        if not (scale > 0 and torch.allclose(grad_in[0].float(), expected, rtol=0.02, atol=0.02 * scale)):  # bf16
            wrong.append((name, checked[name]))

    def prepare(settings, log):
        data, model, method = prepare_run(settings, log)
        for name, layer in model.module.named_modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                dense = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
                layer.register_full_backward_hook(functools.partial(check, name, dense))
        return data, model, method

    prepare_run = adalora.run.train.prepare
    monkeypatch.setattr(adalora.run.train, "prepare", prepare)
    model = write_tiny_lm(tmp_path / "model", hidden=64)  # 64 inputs at least for 4-bit layers
    args = qa_train_args(model, tmp_path, "--precision", "bf16", "--quantize", "bnb-4bit")
    assert main([*args, "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_before"]
    steps = json.loads((tmp_path / "run" / "run.json").read_text())["derived"]["total_steps"]
    layer_1 = [f"model.layers.1.{part}.base_layer" for part in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    assert all(checked[name] == steps for name in layer_1), (checked, steps)
    assert wrong == []


# ---------------------------------------------------------------------- refusals and imports
class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class PlainSubclass(nn.Linear):
    pass


def test_an_unsupported_linear_subclass_is_refused_with_its_name_and_what_is_supported() -> None:
    model = nn.Sequential(ScaledLinear(8, 8), PlainSubclass(8, 8))
    with pytest.raises(ValueError, match=r"ScaledLinear.*own forward.*bitsandbytes Linear4bit"):
        inject(model, AdaLoRAConfig(target_modules=("0",), total_steps=10, warmup_steps=1, final_steps=1))
    inject(model, AdaLoRAConfig(target_modules=("1",), total_steps=10, warmup_steps=1, final_steps=1))  # no forward


def test_an_unquantized_linear8bit_is_refused() -> None:
    model = nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=True))
    with pytest.raises(ValueError, match="not int8"):
        inject(model, AdaLoRAConfig(target_modules=("0",), total_steps=10, warmup_steps=1, final_steps=1))


def test_import_adalora_imports_neither_bitsandbytes_nor_torchao() -> None:
    code = (
        "import sys, adalora, adalora.layers, adalora.merge; "
        "print(sorted(m for m in sys.modules if m.startswith(('bitsandbytes', 'torchao'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_quantize_model_names_the_extra_when_the_package_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with pytest.raises(QuantizationUnavailable, match=r"pip install 'adalora\[quant\]'"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), "torchao-int8")
    with pytest.raises(ValueError, match="choose one of"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), "gptq")


def test_quantize_model_keeps_the_output_embedding_and_named_heads_in_float() -> None:
    model = tiny_bert(hidden=64)
    names = quantize_model(model, "bnb-4bit", skip=("classifier",))
    assert names and "classifier" not in names and type(model.classifier) is nn.Linear
    llama = tiny_llama(hidden=64)
    assert "lm_head" not in quantize_model(llama, "bnb-8bit") and type(llama.lm_head) is nn.Linear
    assert set(QUANTIZATIONS) == {"bnb-4bit", "bnb-8bit", "torchao-nf4", "torchao-int8"}


# ---------------------------------------------------------------------- adapter files
def test_the_fingerprint_uses_logical_shapes_and_is_unchanged_for_float_models(llama: nn.Module) -> None:
    shapes = {n: list(p.shape) for n, p in llama.named_parameters()}  # how the fingerprint was always computed
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    assert base_model_fingerprint(llama)["sha256"] == digest
    for kind in ("bnb-nf4-dq", "bnb-8bit", "torchao-nf4"):
        base = quantized(llama, kind)
        assert logical_shape(base.model.layers[0].self_attn.q_proj.weight) == (64, 64)
        assert base_model_fingerprint(base)["sha256"] == digest
        assert base_model_fingerprint(inject(base, CONFIG))["sha256"] == digest
    assert base_model_precision(quantized(llama, "bnb-nf4-dq")) == {"bnb-nf4-dq": 14, "float32": 7}
    assert base_model_precision(quantized(llama, "torchao-int8")) == {"float32": 7, "torchao-int8": 14}


@pytest.mark.parametrize("kind", ["bnb-nf4-dq", "bnb-8bit", "torchao-nf4"])
def test_an_adapter_moves_between_quantized_and_float_bases(llama: nn.Module, kind: str, tmp_path) -> None:
    x = token_batch(vocab=100)
    model = inject(quantized(llama, kind), CONFIG)
    fake_training(model, ranks=[1, 3])
    expected = logits(model, x)
    save_adapter(model, tmp_path / "q", CONFIG)
    # Onto the same quantized base: the same model (up to float rounding: the loaded adapters hold only the kept
    # triplets, the saved model masked ones too).
    reloaded = load_adapter(quantized(llama, kind), tmp_path / "q")
    torch.testing.assert_close(logits(reloaded, x), expected, rtol=1e-4, atol=5e-5)  # sums over other ranks
    # Onto the float base: loads, with a warning naming both precisions; the update is the same.
    stored = {"bnb-8bit": "bnb-int8"}.get(kind, kind)
    with pytest.warns(UserWarning, match=rf"differently quantized base.*{stored}.*float32"):
        on_float = load_adapter(copy.deepcopy(llama), tmp_path / "q")
    for (_, a), (_, b) in zip(find_adapters(on_float), find_adapters(model), strict=True):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())
    # And back: saved from the float base, loaded onto the quantized one.
    save_adapter(on_float, tmp_path / "f", CONFIG)
    with pytest.warns(UserWarning, match="differently quantized"):
        again = load_adapter(quantized(llama, kind), tmp_path / "f")
    torch.testing.assert_close(logits(again, x), expected, rtol=1e-4, atol=5e-5)  # sums over other ranks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float onto float: nothing to say
        load_adapter(copy.deepcopy(llama), tmp_path / "f")


def test_export_peft_writes_logical_shapes(llama: nn.Module, tmp_path) -> None:
    from safetensors.torch import load_file

    model = inject(quantized(llama, "bnb-nf4-dq"), CONFIG)
    fake_training(model, ranks=[2])
    export_peft(model, tmp_path, CONFIG)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = next(v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert a.shape == (2, 64) and b.shape == (64, 2)


# ---------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind", KINDS)
def test_merge_gives_float_layers_that_compute_the_adapted_model(llama: nn.Module, kind: str) -> None:
    x = token_batch(vocab=100)
    model = inject(quantized(llama, kind), CONFIG)
    fake_training(model, ranks=[2])
    for _, adapter in find_adapters(model):
        adapter.E.data.mul_(0.05)  # a moderate update, so that the comparison below is not dominated by it
    expected = logits(model, x)
    model.eval()
    with torch.no_grad():
        model(x)  # an evaluation, where bitsandbytes would repack 4-bit CPU weights (inject keeps them as they are)
    merged = merge(model)
    assert not find_adapters(merged)
    layers = [m for n, m in merged.named_modules() if n.endswith(LLAMA_TARGETS)]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in layers)
    assert all(type(m.weight) is nn.Parameter for m in layers)  # plain tensors, not quantized subclasses
    # The quantized layers compute (in training mode, on the CPU) with exactly the weights that are dequantized:
    # only float rounding differs.
    assert (logits(merged, x) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["bnb-nf4-dq", "bnb-fp4", "bnb-8bit", "torchao-nf4", "torchao-int8"])
def test_merge_can_requantize(llama: nn.Module, kind: str) -> None:
    x = token_batch(vocab=100)
    model = inject(quantized(llama, kind), CONFIG)
    fake_training(model, ranks=[2])
    for _, adapter in find_adapters(model):
        adapter.E.data.mul_(0.005)  # an update smaller than the weights, as after fine-tuning
    expected = logits(model, x)
    base_type = type(quantized(llama, kind).model.layers[0].self_attn.q_proj)
    weight_type = type(quantized(llama, kind).model.layers[0].self_attn.q_proj.weight)
    merged = merge(model, requantize=True)
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is base_type and type(layer.weight) is weight_type
    # One more rounding of every weight: the error is that of quantization, not of the merge.
    float_error = (logits(llama, x) - logits(quantized(llama, kind), x)).abs().max()
    assert (logits(merged, x) - expected).abs().max() < 3 * float_error


def test_unload_puts_back_the_quantized_layers(llama: nn.Module) -> None:
    base = quantized(llama, "bnb-nf4-dq")
    layer = base.model.layers[0].self_attn.q_proj
    restored = unload(inject(base, CONFIG))
    assert restored.model.layers[0].self_attn.q_proj is layer


# ---------------------------------------------------------------------- transformers' own quantized loading
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, llama: nn.Module):
    path = tmp_path_factory.mktemp("llama")
    llama.save_pretrained(path)
    return path


def test_transformers_bitsandbytes_models_inject_and_train_with_the_trainer(saved_llama, llama, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from adalora.integrations.trainer import AdaLoRATrainer

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(saved_llama, quantization_config=config, device_map="cpu")
    assert model.is_quantized and type(model.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    assert base_model_fingerprint(model)["sha256"] == base_model_fingerprint(llama)["sha256"]
    x = token_batch(vocab=100)
    expected = logits(model, x)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1000, seed=0,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in token_batch(batch=24, vocab=100, seed=1)]
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=data)  # transformers' refusal, without adapters
    model = inject(model, CONFIG.replace(total_steps=None))
    assert torch.equal(logits(model, x), expected)
    trainer = AdaLoRATrainer(
        model=model, args=args, train_dataset=data, adalora_config=CONFIG.replace(total_steps=None)
    )
    assert model._hf_peft_config_loaded is False  # only set while transformers checks the model
    trainer.train()
    assert trainer.adalora.allocator.step_count == 6
    assert any(a.E.abs().sum() > 0 for _, a in find_adapters(model))


def test_transformers_torchao_models_train_with_the_trainer(saved_llama, tmp_path) -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig, TrainingArguments

    from adalora.integrations.trainer import AdaLoRATrainer

    model = AutoModelForCausalLM.from_pretrained(
        saved_llama, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu"
    )
    model = inject(model, CONFIG.replace(total_steps=None))
    assert type(find_adapters(model)[0][1]) is SVDTorchAOLinear
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1000, seed=0,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in token_batch(batch=12, vocab=100, seed=1)]
    AdaLoRATrainer(model=model, args=args, train_dataset=data, adalora_config=CONFIG.replace(total_steps=None)).train()
    assert type(merge(model).model.layers[0].self_attn.q_proj.weight) is nn.Parameter


def test_bert_with_a_4bit_base(tmp_path) -> None:
    bert = tiny_bert(hidden=64)
    for module in bert.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the comparisons below run in training mode (see logits)
    base = copy.deepcopy(bert)
    quantize_model(base, "bnb-4bit", skip=("classifier",))
    x = token_batch(vocab=100)
    base.train()
    expected = base(x).logits.detach()
    config = AdaLoRAConfig(
        target_modules=("query", "value", "dense"), init_r=4, target_r=2, total_steps=10, warmup_steps=1,
        final_steps=1, modules_to_save=("classifier",),
    )  # fmt: skip
    model = inject(base, config)
    assert torch.equal(model(x).logits.detach(), expected)
    fake_training(model, ranks=[2])
    expected = model(x).logits.detach()
    save_adapter(model, tmp_path, config)
    with pytest.warns(UserWarning, match="differently quantized"):
        on_float = load_adapter(bert, tmp_path)
    for (_, a), (_, b) in zip(find_adapters(on_float), find_adapters(model), strict=True):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())
    merged = merge(model)
    merged.train()
    assert (merged(x).logits - expected).abs().max() < 1e-4


# ---------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kind", ["bnb-4bit", "bnb-8bit", "torchao-nf4"])
def test_cuda_quantized_bases_forward_backward_and_merge(llama: nn.Module, kind: str) -> None:
    base = copy.deepcopy(llama).to("cuda", torch.bfloat16)
    quantize_model(base, kind, compute_dtype=torch.bfloat16)
    x = token_batch(vocab=100).cuda()
    base.train()
    expected = base(x).logits.detach()
    model = inject(base, CONFIG)
    assert find_adapters(model)[0][1].P.device.type == "cuda"
    assert find_adapters(model)[0][1].P.dtype == torch.float32
    assert torch.equal(model(x).logits.detach(), expected)
    fake_training(model, ranks=[2])
    model(x, labels=x).loss.backward()
    assert all(a.E.grad is not None and a.E.grad.abs().sum() > 0 for _, a in find_adapters(model))
    expected = model(x).logits.detach().float()
    merged = merge(model)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert (merged(x).logits.float() - expected).abs().max() < 0.1  # bf16 rounding of the merged weights


@cuda
@pytest.mark.parametrize("kind", ["bnb-4bit", "bnb-8bit", "torchao-nf4", "torchao-int8"])
def test_cuda_input_gradients_are_the_dequantized_layers_after_an_evaluation(llama: nn.Module, kind: str) -> None:
    """On CUDA (bfloat16), after an evaluation: each adapter's input gradient at lambda = 0 is ``g @ W``."""
    base = copy.deepcopy(llama).to("cuda", torch.bfloat16)
    quantize_model(base, kind, compute_dtype=torch.bfloat16)
    model = inject(base, CONFIG)
    x = token_batch(vocab=100).cuda()
    model.eval()
    with torch.no_grad():
        model(x)
    _, grads = input_gradients(model, x)
    assert len(grads) == 2 * len(LLAMA_TARGETS)
    for name, adapter in find_adapters(model):
        grad_in, grad_out = grads[name]
        expected = grad_out.float() @ adapter.dense_weight().float()
        assert expected.abs().max() > 0, name
        scale = float(expected.abs().max())
        torch.testing.assert_close(grad_in.float(), expected, rtol=0.02, atol=0.02 * scale)  # bfloat16 products


def test_gpt2_loaded_in_4bit_by_transformers(tmp_path) -> None:
    """transformers turns GPT-2's Conv1D (weight (in, out)) into Linear4bit (logical weight (out, in))."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_gpt2(hidden=64).save_pretrained(tmp_path / "gpt2")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def load() -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", quantization_config=config, device_map="cpu")
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model

    base = load()
    x = token_batch(vocab=100)
    expected = logits(base, x)
    gpt2_config = AdaLoRAConfig(
        target_modules=("c_attn", "c_proj", "c_fc"), init_r=4, target_r=2, total_steps=10, warmup_steps=1,
        final_steps=1,
    )  # fmt: skip
    model = inject(base, gpt2_config)
    adapter = model.transformer.h[0].attn.c_attn
    assert type(adapter) is SVDLinear4bit and adapter.P.shape == (192, 4) and adapter.Q.shape == (4, 64)
    assert torch.equal(logits(model, x), expected)
    fake_training(model, ranks=[2])
    model.train()
    model(x, labels=x).loss.backward()
    assert all(a.E.grad is not None and a.E.grad.abs().sum() > 0 for _, a in find_adapters(model))
    expected = logits(model, x)
    save_adapter(model, tmp_path / "adapter", gpt2_config)
    torch.testing.assert_close(logits(load_adapter(load(), tmp_path / "adapter"), x), expected, rtol=1e-5, atol=1e-5)
    assert (logits(merge(model), x) - expected).abs().max() < 1e-4
