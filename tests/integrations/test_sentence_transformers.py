"""sentence-transformers: allocation and regulariser under SentenceTransformerTrainer with AdaLoRACallback alone,
model.save() refusing to drop the adapters silently, the documented routes (merge; save_adapter/load_adapter), and
resume_from_checkpoint=True continuing exactly. A tiny BERT and a word-piece vocabulary written to a temporary
directory stand in for a hub model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import small_config

import adalora
from adalora import AdaLoRAConfig
from adalora.integrations.trainer import ALLOCATOR_FILE, AdaLoRACallback

sentence_transformers = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "ran", "on", "mat", "a", "big"]
SENTENCES = ["the cat sat", "a dog ran", "the big mat", "a cat on the mat"]
CONFIG = small_config(modules_to_save=())


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny BERT and its tokenizer saved as a local model directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    (directory / "vocab.txt").write_text("\n".join(WORDS))
    BertTokenizerFast(str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def sentence_model(base_dir: Path):
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(base_dir))
    return sentence_transformers.SentenceTransformer(modules=[transformer, Pooling(32)], device="cpu")


def rows():
    pairs = [("the cat sat", "a cat ran", 1.0), ("the dog sat", "the big mat", 0.0)] * 8
    return datasets.Dataset.from_list([{"s1": a, "s2": b, "score": s} for a, b, s in pairs])


def trainer_for(base_dir: Path, output_dir: Path, config: AdaLoRAConfig = CONFIG, **overrides):
    torch.manual_seed(0)
    model = adalora.inject(sentence_model(base_dir), config)
    for module in model.modules():  # deterministic forward passes: resumed and uninterrupted runs must agree
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    values = {
        "output_dir": str(output_dir),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    args = sentence_transformers.SentenceTransformerTrainingArguments(**{**values, **overrides})
    callback = AdaLoRACallback(config)
    from sentence_transformers.sentence_transformer import losses

    loss = losses.CosineSimilarityLoss(model)
    trainer = sentence_transformers.SentenceTransformerTrainer(
        model=model, args=args, train_dataset=rows(), loss=loss, callbacks=[callback]
    )
    return trainer, callback


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".P", ".E", ".Q", ".rank_mask"))}


def test_allocation_and_regulariser_run_under_the_trainer(base_dir: Path, tmp_path: Path) -> None:
    states = {}
    for gamma in (0.1, 0.0):
        trainer, callback = trainer_for(base_dir, tmp_path, CONFIG.replace(orth_reg_weight=gamma))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            trainer.train()
        # 16 pairs / 2 = 8 micro-batches = 4 optimizer steps per epoch, 2 epochs
        assert callback.allocator.config.total_steps == callback.allocator.step_count == 8
        assert sum(callback.allocator.rank_pattern().values()) == callback.allocator.target_budget
        states[gamma] = adapter_state(trainer.model)
    key = next(k for k in states[0.1] if k.endswith("query.P"))
    assert not torch.allclose(states[0.1][key], states[0.0][key])


def test_save_refuses_to_drop_the_adapters_and_the_documented_routes_work(base_dir: Path, tmp_path: Path) -> None:
    trainer, _ = trainer_for(base_dir, tmp_path / "run", num_train_epochs=1)
    trainer.train()
    model = trainer.model
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    with pytest.raises(RuntimeError, match=r"adalora.merge\(model\), then model.save"):
        model.save(str(tmp_path / "unmerged"))
    with pytest.raises(RuntimeError, match="SentenceTransformer\\(dir\\) would load"):
        trainer.save_model(str(tmp_path / "unmerged"))
    # The adapter on its own: save_adapter / load_adapter onto a fresh base.
    adalora.save_adapter(model, tmp_path / "adapter", CONFIG)
    reloaded = adalora.load_adapter(sentence_model(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), expected, rtol=1e-5, atol=1e-6)
    # A plain model: merge, then save; SentenceTransformer(dir) gives the trained embeddings.
    merged = adalora.merge(model)
    merged.save(str(tmp_path / "merged"))
    plain = sentence_transformers.SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    torch.testing.assert_close(plain.encode(SENTENCES, convert_to_tensor=True), expected, rtol=1e-5, atol=1e-6)


def test_resume_from_checkpoint_is_exact(base_dir: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    class Crash(Exception):
        pass

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Crash

    overrides = {"save_strategy": "steps", "save_steps": 3}
    uninterrupted, done = trainer_for(base_dir, tmp_path / "a", **overrides)
    uninterrupted.train()
    crashed, _ = trainer_for(base_dir, tmp_path / "b", **overrides)
    crashed.add_callback(CrashAt())
    with pytest.raises(Crash):
        crashed.train()
    assert (tmp_path / "b" / "checkpoint-3" / ALLOCATOR_FILE).is_file()
    resumed, callback = trainer_for(base_dir, tmp_path / "b", **overrides)
    resumed.train(resume_from_checkpoint=True)
    assert callback.allocator.history == done.allocator.history
    expected = adapter_state(uninterrupted.model)
    for key, value in adapter_state(resumed.model).items():
        torch.testing.assert_close(value, expected[key])
