"""save_adapter / load_adapter: compact files, exact round trips, atomic writes, clear errors, no partial loads."""

import copy
import json

import pytest
import torch
from adapter_helpers import fake_training, logits
from conftest import tiny_bert, tiny_gpt2, token_batch
from safetensors.torch import load_file, save_file

import adalora.files.adapter
import adalora.files.atomic
from adalora import AdaLoRAConfig, compact, find_adapters, inject, load_adapter, save_adapter
from adalora.files.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

BERT_CONFIG = AdaLoRAConfig(
    target_modules=["query", "key", "value", "dense"], init_r=6, target_r=2, alpha=8.0, modules_to_save=("classifier",)
)
GPT2_CONFIG = AdaLoRAConfig(target_modules=["c_attn", "c_proj", "c_fc"], init_r=6, target_r=2, alpha=8.0)


def _trained(build=tiny_bert, config=BERT_CONFIG, ranks=(0, 1, 2, 3, 6)):
    base = build()
    model = inject(copy.deepcopy(base), config)
    kept = fake_training(model, list(ranks))
    return base, model, kept


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state) -> bool:
    now = model.state_dict()
    return not find_adapters(model) and now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)


@pytest.mark.parametrize(
    ("build", "config"), [(tiny_bert, BERT_CONFIG), (tiny_gpt2, GPT2_CONFIG)], ids=["bert", "gpt2"]
)
def test_round_trip_gives_the_same_outputs_and_ranks(tmp_path, build, config):
    base, model, kept = _trained(build, config)
    x = token_batch()
    expected = logits(model, x)

    save_adapter(model, tmp_path / "adapter", config, metadata={"model": "tiny", "task": "test"})
    loaded = load_adapter(base, tmp_path / "adapter")

    assert loaded is base
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=1e-4)
    for name, adapter in find_adapters(loaded):
        assert adapter.r == kept[name]
        assert adapter.scale == config.alpha / config.init_r  # alpha / init_r, not alpha / kept rank
        assert adapter.rank_mask.all()
    info = read_adapter_config(tmp_path / "adapter")
    assert {n: m["rank"] for n, m in info["modules"].items()} == kept
    assert info["metadata"] == {"model": "tiny", "task": "test"}
    assert info["library_version"] == adalora.__version__
    assert AdaLoRAConfig.from_dict(info["config"]) == config


def test_modules_to_save_are_saved_and_restored(tmp_path):
    base, model, _ = _trained()
    assert not torch.equal(model.classifier.weight, base.classifier.weight)  # fake_training moved the head
    save_adapter(model, tmp_path / "a", BERT_CONFIG)
    assert set(read_adapter_config(tmp_path / "a")["modules_to_save_tensors"]) == {
        "classifier.weight",
        "classifier.bias",
    }
    load_adapter(base, tmp_path / "a")
    assert torch.equal(base.classifier.weight, model.classifier.weight)
    assert base.classifier.weight.requires_grad and not base.bert.embeddings.word_embeddings.weight.requires_grad


def test_saved_tensors_are_the_kept_triplets_and_compaction_changes_nothing(tmp_path):
    _, model, _ = _trained()
    save_adapter(model, tmp_path / "masked", BERT_CONFIG)
    masked = load_file(tmp_path / "masked" / WEIGHTS_NAME)
    for name, adapter in find_adapters(model):
        m = adapter.rank_mask
        assert torch.equal(masked[f"{name}.P"], adapter.P[:, m])
        assert torch.equal(masked[f"{name}.E"], adapter.E[m])
        assert torch.equal(masked[f"{name}.Q"], adapter.Q[m])
    compact(model)
    save_adapter(model, tmp_path / "compacted", BERT_CONFIG)
    compacted = load_file(tmp_path / "compacted" / WEIGHTS_NAME)
    assert masked.keys() == compacted.keys()
    assert all(torch.equal(masked[k], compacted[k]) for k in masked)


def test_average_rank_2_from_12_is_about_a_sixth_of_the_size(tmp_path):
    config = AdaLoRAConfig(target_modules=["query", "key", "value", "dense"], init_r=12, target_r=2)
    model = inject(tiny_bert(hidden=64), config)
    save_adapter(model, tmp_path / "full", config)  # nothing masked yet: every triplet is saved
    ranks = [0, 1, 2, 3, 4, 2, 2, 2, 1, 3, 4, 0, 2]  # 13 adapters (2 layers x 6 + the pooler), average 2
    fake_training(model, ranks)
    adapters = [a for _, a in find_adapters(model)]
    assert len(adapters) == len(ranks) and sum(int(a.rank_mask.sum()) for a in adapters) == 2 * len(ranks)
    save_adapter(model, tmp_path / "trained", config)
    full, trained = (_payload_bytes(tmp_path / d / WEIGHTS_NAME) for d in ("full", "trained"))
    floats = sum(k * (a.d_out + 1 + a.d_in) for k, a in zip(ranks, adapters, strict=True))
    assert trained == 4 * floats  # float32 P (d_out, k), E (k,), Q (k, d_in) of the kept triplets, nothing else
    assert full == 4 * sum(12 * (a.d_out + 1 + a.d_in) for a in adapters)
    assert 0.15 < trained / full < 0.18  # "about a sixth" (the JSON header adds ~100 bytes per tensor)


def _payload_bytes(path):
    """Size of a safetensors file without its 8-byte length prefix and JSON header."""
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def test_load_checks_the_base_model_fingerprint(tmp_path):
    _, model, _ = _trained()
    save_adapter(model, tmp_path / "a", BERT_CONFIG)
    for other, problem in [
        (tiny_bert(num_labels=3), r"shape differs: .*classifier\.weight \(saved \[2, 32\], this model \[3, 32\]\)"),
        (tiny_bert(layers=1), r"missing here: bert\.encoder\.layer\.1\."),
        (tiny_gpt2(), r"missing here: bert\..*not in the saved base: transformer\."),
    ]:
        state = _state(other)
        with pytest.raises(ValueError, match=rf"does not match the one the adapter.*{problem}"):
            load_adapter(other, tmp_path / "a")
        assert _unchanged(other, state)


def test_load_refuses_a_model_that_already_has_adapters(tmp_path):
    _, model, _ = _trained()
    save_adapter(model, tmp_path / "a", BERT_CONFIG)
    with pytest.raises(ValueError, match="already has AdaLoRA adapters"):
        load_adapter(model, tmp_path / "a")


def _corrupt(directory, edit_tensors=None, edit_info=None):
    if edit_tensors is not None:
        tensors = load_file(directory / WEIGHTS_NAME)
        edit_tensors(tensors)
        save_file(tensors, directory / WEIGHTS_NAME)
    info = json.loads((directory / CONFIG_NAME).read_text())
    if edit_tensors is not None:  # keep the recorded size consistent so that the specific check is reached
        info["weights_file"]["bytes"] = (directory / WEIGHTS_NAME).stat().st_size
    if edit_info is not None:
        edit_info(info)
    (directory / CONFIG_NAME).write_text(json.dumps(info))


def _key(model, attr="P"):
    return f"{find_adapters(model)[1][0]}.{attr}"


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("missing_dir", FileNotFoundError, "does not exist"),
        ("missing_config", FileNotFoundError, f"{CONFIG_NAME} is missing"),
        ("missing_weights", FileNotFoundError, "weights .* are missing"),
        ("truncated_weights", ValueError, r"are truncated: \d+ bytes"),
        ("truncated_config", ValueError, "is not valid JSON"),
        ("wrong_shape", ValueError, r"has shape \[32, 7\], but adalora_config.json records \[32, 1\]"),
        ("wrong_dtype", ValueError, "has dtype float64, but adalora_config.json records float32"),
        ("extra_tensor", ValueError, r"unexpected tensors \['intruder'\]"),
        ("tampered_values", ValueError, "fail their SHA-256 check"),
        ("rank_edited", ValueError, r"needs \[32, 2\]"),
        ("newer_format", ValueError, "Upgrade adalora"),
        ("malformed_config", ValueError, r"is malformed \(KeyError: 'rank'\)"),
    ],
)
def test_damaged_adapters_fail_clearly_and_load_nothing(tmp_path, damage, error, message):
    base, model, _ = _trained(ranks=(1,))
    directory = tmp_path / "a"
    save_adapter(model, directory, BERT_CONFIG)
    key = _key(model)
    if damage == "missing_dir":
        directory = tmp_path / "nowhere"
    elif damage == "missing_config":
        (directory / CONFIG_NAME).unlink()
    elif damage == "missing_weights":
        (directory / WEIGHTS_NAME).unlink()
    elif damage == "truncated_weights":
        data = (directory / WEIGHTS_NAME).read_bytes()
        (directory / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    elif damage == "truncated_config":
        text = (directory / CONFIG_NAME).read_text()
        (directory / CONFIG_NAME).write_text(text[: len(text) // 2])
    elif damage == "wrong_shape":
        _corrupt(directory, lambda t: t.__setitem__(key, torch.zeros(32, 7)))
    elif damage == "wrong_dtype":
        _corrupt(directory, lambda t: t.__setitem__(key, t[key].double()))
    elif damage == "extra_tensor":
        _corrupt(directory, lambda t: t.__setitem__("intruder", torch.zeros(1)))
    elif damage == "tampered_values":
        _corrupt(directory, lambda t: t[key].add_(1.0))
    elif damage == "rank_edited":  # a consistent file whose recorded rank does not fit the tensors
        _corrupt(directory, edit_info=lambda i: i["modules"][key.rpartition(".")[0]].update(rank=2))
    elif damage == "malformed_config":
        _corrupt(directory, edit_info=lambda i: i["modules"][key.rpartition(".")[0]].pop("rank"))
    elif damage == "newer_format":
        _corrupt(directory, edit_info=lambda i: i.update(format_version=99))
    state = _state(base)
    with pytest.raises(error, match=message):
        load_adapter(base, directory)
    assert _unchanged(base, state)


def test_a_failed_save_leaves_the_previous_adapter_in_place(tmp_path, monkeypatch):
    base, model, _ = _trained()
    directory = tmp_path / "a"
    save_adapter(model, directory, BERT_CONFIG)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    fake_training(model, [2], seed=7)  # a different adapter, whose save crashes half-way through the weights

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(adalora.files.adapter, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory, BERT_CONFIG)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # the temporary directory is gone
    load_adapter(base, directory)  # still the first adapter, complete


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_saving_again_replaces_the_adapter(tmp_path, monkeypatch, exchange):
    if not exchange:  # platforms without an atomic directory exchange: rename the old one aside first
        monkeypatch.setattr(adalora.files.atomic, "_exchange", lambda a, b: False)
    base, model, _ = _trained()
    save_adapter(model, tmp_path / "a", BERT_CONFIG)
    fake_training(model, [3], seed=5)
    save_adapter(model, tmp_path / "a", BERT_CONFIG)
    load_adapter(base, tmp_path / "a")
    x = token_batch()
    torch.testing.assert_close(logits(base, x), logits(model, x), atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_refuses_to_overwrite_other_directories_and_bad_input(tmp_path):
    _, model, _ = _trained()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace it"):
        save_adapter(model, precious, BERT_CONFIG)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        save_adapter(model, tmp_path / "b", BERT_CONFIG, metadata={"tensor": torch.zeros(1)})
    with pytest.raises(ValueError, match="do not match config.target_modules"):
        save_adapter(model, tmp_path / "c", BERT_CONFIG.replace(target_modules=("query",)))
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        save_adapter(tiny_bert(), tmp_path / "d", BERT_CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_fingerprint_ignores_adapters_and_dtype():
    base = tiny_gpt2()
    print_before = adalora.files.adapter.base_model_fingerprint(base)
    inject(base, GPT2_CONFIG)
    assert adalora.files.adapter.base_model_fingerprint(base) == print_before
    assert adalora.files.adapter.base_model_fingerprint(tiny_gpt2().to(torch.bfloat16)) == print_before


def test_load_onto_a_bfloat16_base(tmp_path):
    base, model, _ = _trained()
    save_adapter(model, tmp_path / "a", BERT_CONFIG)
    loaded = load_adapter(base.to(torch.bfloat16), tmp_path / "a")
    for name, adapter in find_adapters(loaded):
        assert adapter.E.dtype == torch.float32  # adapters stay float32 on half-precision bases
        assert torch.equal(adapter.E, model.get_submodule(name).E[model.get_submodule(name).rank_mask])


def test_frozen_factors_stay_frozen_after_loading(tmp_path):
    """E.g. the LoRA baseline: lambda is a frozen gate of ones."""
    config = BERT_CONFIG.replace(modules_to_save=())
    base = tiny_bert()
    model = inject(copy.deepcopy(base), config)
    fake_training(model, [4])
    for _, adapter in find_adapters(model):
        adapter.E.requires_grad_(False)
    save_adapter(model, tmp_path / "lora", config)
    loaded = load_adapter(base, tmp_path / "lora")
    for _, adapter in find_adapters(loaded):
        assert (adapter.P.requires_grad, adapter.E.requires_grad, adapter.Q.requires_grad) == (True, False, True)
    x = token_batch()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip_and_merge(tmp_path):
    base, model, _ = _trained()
    model.cuda()
    x = token_batch()
    expected = logits(model, x.cuda()).cpu()
    save_adapter(model, tmp_path / "a", BERT_CONFIG)
    on_cpu = load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(on_cpu, x), expected, atol=1e-4, rtol=1e-3)
    on_gpu = load_adapter(base.cuda(), tmp_path / "a")
    assert all(a.P.is_cuda for _, a in find_adapters(on_gpu))
    torch.testing.assert_close(logits(on_gpu, x.cuda()).cpu(), expected, atol=1e-4, rtol=1e-3)
    from adalora import merge

    torch.testing.assert_close(logits(merge(on_gpu), x.cuda()).cpu(), expected, atol=1e-4, rtol=1e-3)
