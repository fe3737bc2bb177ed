"""``--device``, ``--precision`` and ``--gradient-checkpointing`` on the CPU: 16-bit autocast for the base
computation with float32 parameters and optimizer state, fp16 loss scaling with unscaled gradients for the
allocator, checkpointing that changes no gradient, devices that are not there refused (test_bad_invocations)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model
from conftest import small_config, tiny_bert, token_batch
from safetensors.torch import load_file

from adalora import inject
from adalora.cli import main
from adalora.integrations.loop import fit
from adalora.run.hardware import DeviceLoss, grad_scaler, resolve_device
from adalora.run.settings import RunError, RunSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = small_config(total_steps=10, warmup_steps=2, mask_interval=10)


def batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": token_batch(n, 12, seed=seed), "labels": torch.randint(0, 2, (n,), generator=generator)}


def adapted() -> torch.nn.Module:
    model = inject(tiny_bert(), CONFIG).train()
    with torch.no_grad():  # lambda = 0 at init: give the adapters a non-zero update so that they get gradients
        for name, param in model.named_parameters():
            if name.endswith(".E"):
                param.fill_(0.1)
    return model


def test_auto_is_the_cpu_here_and_missing_devices_are_refused() -> None:
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") in ("cpu", "mps")
        with pytest.raises(RunError, match="--device cuda: this machine has no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(RunError, match="not a device"):
        resolve_device("tpu")


def test_bf16_autocasts_the_base_products_and_keeps_parameters_and_optimizer_state_float32() -> None:
    model = adapted()
    seen: list[torch.dtype] = []
    base = model.bert.encoder.layer[0].intermediate.dense  # not adapted: the base computation
    base.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    fit(model, [batch()], optimizer, loss_fn=DeviceLoss("cpu", "bf16"))
    assert seen == [torch.bfloat16]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.float32}
    seen.clear()
    fit(model, [batch()], optimizer, loss_fn=DeviceLoss("cpu", "fp32"))
    assert seen == [torch.float32]


def test_fp16_scales_the_loss_and_unscales_the_gradients_before_the_optimizer_reads_them() -> None:
    """With a loss scale of 2^16 the gradients that clipping, the optimizer and the allocator see must be the true
    ones: close to the fp32 gradients, neither 65536 times larger nor clipped as if they were."""
    reference, scaled = adapted(), None
    scaled = copy.deepcopy(reference)
    grads: dict[str, list[torch.Tensor]] = {}

    def recorder(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        original = optimizer.step

        def step(*args, **kwargs):
            grads[name] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            return original(*args, **kwargs)

        optimizer.step = step
        return optimizer

    for name, model, precision in (("fp32", reference, "fp32"), ("fp16", scaled, "fp16")):
        optimizer = recorder(name, model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
        scaler = grad_scaler("cpu", precision)
        # Clipping well above the true norm (~0.4) must change nothing: it has to see the unscaled gradients.
        fit(model, [batch()], optimizer, max_grad_norm=10.0, loss_fn=DeviceLoss("cpu", precision), grad_scaler=scaler)
        assert (scaler is None) == (precision == "fp32")
    assert grad_scaler("cpu", "bf16") is None  # bf16 has float32's exponent range
    # The tiny random model's adapter gradients (~1e-7) are rounding noise in 16 bits; the head's are not.
    # Each adapter gradient is still of its fp32 size, not 2^16 times larger.
    torch.testing.assert_close(grads["fp16"][-1], grads["fp32"][-1], rtol=0.01, atol=1e-4)  # classifier.bias
    for exact, half in zip(grads["fp32"], grads["fp16"], strict=True):
        assert 0.2 < float(half.norm() / exact.norm()) < 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("assets")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def test_gradient_checkpointing_changes_no_gradient(assets) -> None:
    from adalora.run.train import prepare

    model_dir, data_dir = assets
    settings = RunSettings(
        model=str(model_dir), train_file=str(data_dir / "train.csv"), eval_file=str(data_dir / "eval.csv"),
        max_length=16, batch_size=8, threads=1, device="cpu",
    ).replace(init_r=4, target_r=2)  # fmt: skip
    grads = []
    for checkpointing in (False, True):
        data, model, _ = prepare(settings.replace(gradient_checkpointing=checkpointing), log=lambda line: None)
        assert model.module.is_gradient_checkpointing == checkpointing
        with torch.no_grad():
            for name, param in model.module.named_parameters():
                if name.endswith(".E"):
                    param.fill_(0.1)
        model.module.train()
        rows = {key: value[:8] for key, value in data.train.items()}
        model.module(**rows).loss.backward()
        grads.append({n: p.grad for n, p in model.module.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_a_bf16_run_records_device_and_precision_and_saves_float32_adapters(assets, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = tiny_train_args(*assets, out, "--precision", "bf16", "--device", "cpu", "--gradient-checkpointing")
    assert main(args) == 0
    assert "on cpu in bf16, gradient checkpointing" in capsys.readouterr().out
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["device"], settings["precision"], settings["gradient_checkpointing"]) == ("cpu", "bf16", True)
    assert {t.dtype for t in load_file(out / "adapter" / "adalora_adapter.safetensors").values()} == {torch.float32}


def test_auto_is_resolved_once_by_the_check_stage_and_saved_so(tmp_path) -> None:
    from adalora.run.check import check_run

    settings = check_run(RunSettings(threads=1), tmp_path / "new", resume=False, overwrite=False, log=print)
    assert settings.device == resolve_device("auto") and settings.device != "auto" and settings.threads == 1
    assert RunSettings.from_dict(settings.to_dict()).device == settings.device  # what run.json keeps
    assert not (tmp_path / "new").exists()  # the check writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resuming_a_gpu_run_without_the_gpu_is_one_line(assets, tmp_path, monkeypatch, capsys) -> None:
    import adalora.run.train as train_module

    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train", interrupted)
        assert main(tiny_train_args(*assets, out, "--method", "lora")) == 130
    run = json.loads((out / "run.json").read_text())
    run["settings"]["device"] = "cuda:0"  # as if it had started on a GPU machine
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "trains on cuda:0" in err, err


def test_a_4bit_run_trains_adapters_that_load_onto_the_float_base_and_merge(assets, tmp_path, capsys) -> None:
    """--quantize bnb-4bit: the base is stored in 4 bits, the adapter is saved as usual and loads onto the float
    model (the fingerprint uses logical shapes); merge then gives plain float layers."""
    from transformers import AutoModelForSequenceClassification

    from adalora import load_adapter, merge

    # 64 inputs at least: bitsandbytes' CPU inference kernel repacks 4-bit weights in blocks of 64 inputs.
    assets = write_tiny_model(tmp_path / "model", hidden=64), assets[1]
    out = tmp_path / "run"
    assert main(tiny_train_args(*assets, out, "--quantize", "bnb-4bit", "--precision", "bf16")) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["quantize"] == "bnb-4bit"
    assert json.loads((out / "run.json").read_text())["derived"]["quantized_layers"] > 0
    base = AutoModelForSequenceClassification.from_pretrained(assets[0], num_labels=2)
    with pytest.warns(UserWarning, match="quantiz"):  # trained on a 4-bit base, loaded onto a float one
        load_adapter(base, out / "adapter")
    merged = merge(base)
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith(("query", "value")))


def test_quantize_is_refused_with_full_fine_tuning(assets, tmp_path, capsys) -> None:
    assert main(tiny_train_args(*assets, tmp_path / "run", "--quantize", "bnb-4bit", "--method", "full")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--method full has nothing to train" in err
    assert not (tmp_path / "run").exists()
