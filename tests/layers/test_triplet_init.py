"""``AdaLoRAConfig.triplet_init``: where P, lambda and Q start (:class:`adalora.layers.TripletStart`), on every kind
of adapter, and everything downstream of the opt-in ``"lora"`` start (P = 0, lambda = 1, Q as LoRA's A): the output
at step 0, the gradients of eq. 3 at step 0 against hand formulas, the regulariser at P = 0, save/load, merge, PEFT
exports, checkpoints and resume, a 4-bit base, MoE experts and the CLI flag."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model
from conftest import tiny_gpt2, tiny_llama, tiny_qwen3_moe, token_batch
from lm_helpers import train_lm
from resume_helpers import KILLER, SETTINGS, assert_same_run
from torch import nn

from adalora import AdaLoRAConfig, RankAllocator, export_peft, find_adapters, inject, load_adapter, merge, save_adapter
from adalora.cli import main
from adalora.files.checkpoint import load_checkpoint, save_checkpoint
from adalora.layers import SVDLinear, TripletStart, keep_differentiable_layout
from adalora.regularizer import add_regularization_gradient, regularization
from adalora.run.quantize import quantize_model
from adalora.run.settings import RunSettings
from adalora.run.train import prepare

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 8 steps: 2 of warm-up, masks at steps 3 to 6, 2 final steps.
SCHEDULE = {"init_r": 4, "target_r": 2, "total_steps": 8, "warmup_steps": 2, "final_steps": 2, "mask_interval": 1}


class Convs(nn.Module):
    """Two convolutions, the second grouped: SVDConv's two ways of computing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(torch.relu(self.conv(x)))


def quantized_llama(method: str) -> nn.Module:
    pytest.importorskip(method.split("-")[0].replace("bnb", "bitsandbytes"))
    model = tiny_llama(hidden=64)
    quantize_model(model, method)  # in place
    keep_differentiable_layout(model)  # the base computes as inject makes the adapted layers compute (eval mode too)
    return model


# kind: (model, target modules, input)
KINDS = {
    "linear": (tiny_llama, LLAMA, token_batch),
    "conv1d": (tiny_gpt2, ("c_attn", "c_proj", "c_fc"), token_batch),
    "conv": (Convs, ("conv", "grouped"), lambda: torch.randn(2, 3, 6, 6)),
    "embedding": (tiny_llama, ("embed_tokens",), token_batch),
    "experts": (tiny_qwen3_moe, ("q_proj", "experts"), token_batch),
    **{m: (functools.partial(quantized_llama, m), LLAMA, token_batch) for m in ("bnb-4bit", "bnb-8bit", "torchao-nf4")},
}


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)


def lora_config(targets=LLAMA, **changes) -> AdaLoRAConfig:
    return AdaLoRAConfig(target_modules=targets, triplet_init="lora", **{**SCHEDULE, **changes})


# ---------------------------------------------------------------------------------------------- the start itself
@pytest.mark.parametrize("init", ["paper", "lora"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_adapter_kind_starts_as_told_and_computes_the_base_model(kind, init):
    build, targets, make_input = KINDS[kind]
    base = build()
    x = make_input()
    expected = outputs(base, x)
    model = inject(base, AdaLoRAConfig(target_modules=targets, triplet_init=init, init_r=4, target_r=2))
    adapters = find_adapters(model)
    assert adapters
    for name, adapter in adapters:
        P, E, Q = adapter.P, adapter.E, adapter.Q
        assert P.requires_grad and E.requires_grad and Q.requires_grad, name
        if init == "paper":
            assert not E.any() and P.abs().min() > 0 and Q.abs().min() > 0, name
            continue
        assert not P.any() and torch.equal(E, torch.ones_like(E)), name
        # LoRA's A: U(-1/sqrt(d_in), 1/sqrt(d_in)) for every matrix, every expert's own (not 1/sqrt(r d_in) of the
        # stacked (E, r, d_in) tensor); the largest of its r * d_in draws lies close to the bound.
        bound = 1 / math.sqrt(adapter.d_in)
        for q in Q.detach().reshape(-1, *Q.shape[-2:]):
            assert 0.6 * bound < q.abs().max() <= bound, name
    assert torch.equal(outputs(model, x), expected)  # the update is exactly zero: P = 0, or lambda = 0


def test_the_same_seed_gives_the_same_start_and_another_seed_another():
    """Every process of a DDP run seeds alike before injecting, so all start from the same factors."""

    def factors(seed: int) -> list[torch.Tensor]:
        base = tiny_llama()
        torch.manual_seed(seed)
        model = inject(base, lora_config())
        return [p.detach().clone() for _, a in find_adapters(model) for p in (a.P, a.E, a.Q)]

    first, again, other = factors(1), factors(1), factors(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_an_unknown_start_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"AdaLoRAConfig.triplet_init: unknown value 'zero'. Choose one of paper, lo"):
        AdaLoRAConfig(triplet_init="zero")
    with pytest.raises(ValueError, match="unknown triplet start 'svd'; choose one of paper, lora"):
        TripletStart("svd")  # type: ignore[arg-type]
    assert AdaLoRAConfig.from_json(lora_config().to_json()).triplet_start == TripletStart("lora", 0.02)


# ---------------------------------------------------------------------------------------------- step 0 (eq. 3)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("init", ["paper", "lora"])
def test_step_zero_gradients_equal_the_hand_formulas(init, fused):
    """y = W0 x + scale * P diag(lambda) Q x; with G = dL/dy, summed over tokens: dL/dP = scale G x^T Q^T diag(lambda),
    dL/dQ = scale diag(lambda) P^T G x^T, dL/dlambda_i = scale P_i^T G x^T Q_i^T. The fused path (linear_svd) has
    a backward of its own; a trainable base weight takes the plain path."""
    base = nn.Linear(7, 5).double().requires_grad_(not fused)
    adapter = SVDLinear.from_base(base, r=3, scale=2.0, start=TripletStart(init))
    x = torch.randn(4, 6, 7, dtype=torch.float64)
    G = torch.randn(4, 6, 5, dtype=torch.float64)
    (adapter(x) * G).sum().backward()  # dL/dy = G
    P, E, Q, scale = adapter.P.detach(), adapter.E.detach(), adapter.Q.detach(), adapter.scale
    GX = G.reshape(-1, 5).T @ x.reshape(-1, 7)  # sum over tokens of G x^T, (d_out, d_in)
    torch.testing.assert_close(adapter.P.grad, scale * GX @ Q.T * E)
    torch.testing.assert_close(adapter.Q.grad, scale * E[:, None] * (P.T @ GX))
    torch.testing.assert_close(adapter.E.grad, scale * ((P.T @ GX) * Q).sum(-1))
    if init == "lora":  # P learns at once, densely, as LoRA's B: scale G x^T Q^T; lambda and Q wait for P
        torch.testing.assert_close(adapter.P.grad, scale * GX @ Q.T)
        assert adapter.P.grad.abs().min() > 0
        assert not adapter.Q.grad.any() and not adapter.E.grad.any()
    else:  # lambda = 0: only lambda learns
        assert not adapter.P.grad.any() and not adapter.Q.grad.any()
        assert adapter.E.grad.abs().min() > 0


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_the_regulariser_leaves_p_at_zero_and_pulls_q_towards_orthonormal_rows(form):
    """At P = 0, D_P = P^T P - I = -I: R's gradient on P (4 P D_P, or P D_P / (n ||D_P||)) is zero, its value on P
    is r (squared) or sqrt(r) per matrix; Q (Kaiming rows, not orthonormal) gets 4 D_Q Q or D_Q Q / (n ||D_Q||)."""
    n, r, gamma = 2, 3, 0.5
    adapters = [
        SVDLinear.from_base(nn.Linear(9, 6).double(), r=r, scale=1.0, start=TripletStart("lora")) for _ in range(n)
    ]
    D = [a.Q.detach() @ a.Q.detach().T - torch.eye(r, dtype=torch.float64) for a in adapters]
    if form == "paper":
        value = sum(r + d.square().sum() for d in D)
        grads = [4 * d @ a.Q.detach() for d, a in zip(D, adapters, strict=True)]
    else:
        value = (n * math.sqrt(r) + sum(torch.linalg.matrix_norm(d) for d in D)) / (2 * n)
        grads = [d @ a.Q.detach() / (n * torch.linalg.matrix_norm(d)) for d, a in zip(D, adapters, strict=True)]
    torch.testing.assert_close(add_regularization_gradient(adapters, gamma, form), gamma * value)
    closed = [(a.P.grad.clone(), a.Q.grad.clone()) for a in adapters]
    for a in adapters:
        a.zero_grad(set_to_none=True)
    (gamma * regularization(adapters, form)).backward()
    for a, grad, (closed_p, closed_q) in zip(adapters, grads, closed, strict=True):
        for p_grad, q_grad in ((closed_p, closed_q), (a.P.grad, a.Q.grad)):
            assert not p_grad.any()
            torch.testing.assert_close(q_grad, gamma * grad)
        assert a.E.grad is None


# ---------------------------------------------------------------------------------------------- downstream
@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained 8 steps from the lora start, with the budget schedule (masks applied)."""
    torch.manual_seed(0)
    base = tiny_llama()
    config = lora_config()
    model = inject(copy.deepcopy(base), config)
    train_lm(model, config, 8)
    masks = [a.rank_mask for _, a in find_adapters(model)]
    assert not all(m.all() for m in masks) and any(m.any() for m in masks)  # some triplets masked, some kept
    return base, model.eval(), config


def test_save_and_load_round_trip(trained, tmp_path):
    base, model, config = trained
    x = token_batch()
    save_adapter(model, tmp_path / "adapter", config)
    saved = json.loads((tmp_path / "adapter" / "adalora_config.json").read_text())["config"]
    assert saved["triplet_init"] == "lora"
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")  # the kept triplets only: rounding may differ
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x))


def test_merge_equals_the_adapted_forward(trained):
    _, model, _ = trained
    x = token_batch()
    torch.testing.assert_close(outputs(merge(copy.deepcopy(model)), x), outputs(model, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["compact", "uniform"])
def test_peft_export_reloads_in_peft_to_the_same_logits(trained, tmp_path, layout):
    peft = pytest.importorskip("peft")
    base, model, config = trained
    x = token_batch()
    export_peft(model, tmp_path / "lora", config, layout=layout)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(outputs(theirs, x), outputs(model, x), atol=1e-5, rtol=1e-4)


def test_a_checkpoint_continues_exactly_whatever_the_fresh_start(tmp_path):
    """Resuming injects afresh (another random Q) and restores the checkpoint: the run goes on as if never stopped."""
    config = lora_config()
    base = tiny_llama()
    reference = inject(copy.deepcopy(base), config)
    optimizer, allocator = train_lm(reference, config, 4)
    save_checkpoint(tmp_path / "ckpt.pt", model=reference, optimizer=optimizer, allocator=allocator)
    train_lm(reference, config, 4, optimizer, allocator, seed=1)
    torch.manual_seed(123)
    resumed = inject(copy.deepcopy(base), config)
    optimizer2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    allocator2 = RankAllocator(resumed, config, optimizer2)
    load_checkpoint(tmp_path / "ckpt.pt", model=resumed, optimizer=optimizer2, allocator=allocator2)
    train_lm(resumed, config, 4, optimizer2, allocator2, seed=1)
    assert allocator2.rank_pattern() == allocator.rank_pattern()
    for (_, a), (_, b) in zip(find_adapters(reference), find_adapters(resumed), strict=True):
        for attr in ("P", "E", "Q"):
            assert torch.equal(getattr(a, attr), getattr(b, attr)), attr


@pytest.mark.parametrize("kind", ["bnb-4bit", "experts"])
def test_a_step_from_the_lora_start_on_a_4bit_base_and_on_moe_experts(kind):
    """At step 0 the loss reaches every routed P (dense) and no Q or lambda; one optimizer step moves P."""
    build, targets, _ = KINDS[kind]
    model = inject(build(), lora_config(targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(model, lora_config(targets), optimizer)
    ids = token_batch()
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, adapter in find_adapters(model):
        assert not adapter.Q.grad.any() and not adapter.E.grad.any(), name
        # Each P_e is (d_out, r): an expert that got no token has no gradient; one that did, a dense one.
        reached = adapter.P.grad.reshape(-1, *adapter.P.shape[-2:]).flatten(1).abs().amin(-1) > 0
        assert reached.any(), name
        assert not adapter.weight.requires_grad and adapter.weight.grad is None
    allocator.add_regularization_gradient()
    optimizer.step()
    allocator.step()
    assert all(a.P.any() and torch.isfinite(a.P).all() for _, a in find_adapters(model))


# ---------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("assets")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


@pytest.fixture(scope="module")
def cli_run(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(tiny_train_args(*assets, out, *SETTINGS, "--triplet-init", "lora")) == 0
    return out


def test_the_flag_reaches_the_adapters_and_run_json(assets, cli_run, tmp_path):
    run = json.loads((cli_run / "run.json").read_text())
    assert run["settings"]["adalora"]["triplet_init"] == "lora"
    saved = json.loads((cli_run / "adapter" / "adalora_config.json").read_text())["config"]
    assert saved["triplet_init"] == "lora"
    # What the run trained from: the run's own stages up to (not including) training.
    settings = RunSettings.from_dict(run["settings"])
    _, model, _ = prepare(settings, log=lambda line: None)
    adapters = find_adapters(model.module)
    assert adapters and all(not a.P.any() and bool((a.E == 1).all()) for _, a in adapters)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_run_resumes_to_the_uninterrupted_ones_end(assets, cli_run, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_train_args(*assets, out, *SETTINGS, "--triplet-init", "lora")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run(
        [sys.executable, "-c", KILLER, "step", "10", *args], env=env, capture_output=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert main(["train", "--resume", str(out)]) == 0
    assert "at step 8/24" in capsys.readouterr().out
    assert_same_run(out, cli_run)
