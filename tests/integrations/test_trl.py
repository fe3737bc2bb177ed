"""TRL: SFTTrainer and DPOTrainer with AdaLoRACallback alone, on a tiny Llama built from a config and a word-level
tokenizer built in memory (nothing downloaded): the regulariser acts, the allocator steps once per optimizer step
under gradient accumulation with T inferred, and resume_from_checkpoint continues exactly."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import small_config, tiny_llama

from adalora import AdaLoRAConfig, inject
from adalora.integrations.trainer import ALLOCATOR_FILE, AdaLoRACallback

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = ["<unk>", "<pad>", "</s>", "Q:", "A:", "the", "cat", "dog", "sat", "ran", "on", "mat", "yes", "no"]
CONFIG = small_config(target_modules=("q_proj", "v_proj", "down_proj"), modules_to_save=())


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def word_tokenizer():
    """A whitespace word-level fast tokenizer over WORDS (ids = positions), EOS ``</s>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def adapted_llama(config: AdaLoRAConfig = CONFIG):
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.use_cache = False
    return inject(model, config)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".P", ".E", ".Q", ".rank_mask"))}


def sft_rows(n: int = 16):
    pairs = [("cat", "yes"), ("dog", "no")] * (n // 2)
    return datasets.Dataset.from_list([{"prompt": f"Q: the {a} sat", "completion": f" A: {b}"} for a, b in pairs])


def dpo_rows(n: int = 16):
    pairs = [("cat", "yes", "no"), ("dog", "no", "yes")] * (n // 2)
    return datasets.Dataset.from_list(
        [{"prompt": f"Q: the {a} sat", "chosen": f" A: {c}", "rejected": f" A: {r}"} for a, c, r in pairs]
    )


def common_args(output_dir: Path, **overrides) -> dict:
    values = {
        "output_dir": str(output_dir),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 1000,
        "seed": 0,
        "dataloader_drop_last": False,
    }
    return {**values, **overrides}


def sft_trainer(output_dir: Path, config: AdaLoRAConfig = CONFIG, **overrides):
    callback = AdaLoRACallback(config)
    args = trl.SFTConfig(**common_args(output_dir, **overrides), max_length=16)
    trainer = trl.SFTTrainer(
        model=adapted_llama(config),
        args=args,
        train_dataset=sft_rows(),
        processing_class=word_tokenizer(),
        callbacks=[callback],
    )
    return trainer, callback


def dpo_trainer(output_dir: Path, config: AdaLoRAConfig = CONFIG, **overrides):
    callback = AdaLoRACallback(config)
    args = trl.DPOConfig(**common_args(output_dir, **overrides), max_length=16)
    torch.manual_seed(0)
    reference = tiny_llama()  # the policy's base (lambda = 0 at init): DPO would otherwise load it from the hub
    trainer = trl.DPOTrainer(
        model=adapted_llama(config),
        ref_model=reference,
        args=args,
        train_dataset=dpo_rows(),
        processing_class=word_tokenizer(),
        callbacks=[callback],
    )
    return trainer, callback


@pytest.mark.slow
@pytest.mark.parametrize("build", [sft_trainer, dpo_trainer], ids=["sft", "dpo"])
def test_callback_alone_allocates_and_regularises(tmp_path: Path, build) -> None:
    states = {}
    for gamma in (0.1, 0.0):
        trainer, callback = build(tmp_path, CONFIG.replace(orth_reg_weight=gamma))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no misuse: pairing, regulariser, total steps
            trainer.train()
        allocator = callback.allocator
        # 16 rows / batch 2 = 8 micro-batches = 4 optimizer steps per epoch, 2 epochs: T inferred by the Trainer.
        assert allocator.config.total_steps == trainer.state.max_steps == allocator.step_count == 8
        assert sum(allocator.rank_pattern().values()) == allocator.target_budget
        states[gamma] = adapter_state(trainer.model)
    key = "model.layers.0.self_attn.q_proj.P"
    assert not torch.allclose(states[0.1][key], states[0.0][key])  # the regulariser acted


@pytest.mark.slow
@pytest.mark.parametrize("build", [sft_trainer, dpo_trainer], ids=["sft", "dpo"])
def test_resume_from_checkpoint_is_exact(tmp_path: Path, build) -> None:
    from transformers import TrainerCallback

    class Crash(Exception):
        pass

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Crash

    overrides = {"save_strategy": "steps", "save_steps": 3}
    uninterrupted, done = build(tmp_path / "a", **overrides)
    uninterrupted.train()
    crashed, _ = build(tmp_path / "b", **overrides)
    crashed.add_callback(CrashAt())
    with pytest.raises(Crash):
        crashed.train()
    assert (tmp_path / "b" / "checkpoint-3" / ALLOCATOR_FILE).is_file()
    resumed, callback = build(tmp_path / "b", **overrides)
    resumed.train(resume_from_checkpoint=True)
    assert callback.allocator.history == done.allocator.history
    expected = adapter_state(uninterrupted.model)
    for key, value in adapter_state(resumed.model).items():
        torch.testing.assert_close(value, expected[key])


def test_an_adapter_on_the_fused_lm_head_is_named_as_the_cause(tmp_path: Path) -> None:
    config = CONFIG.replace(target_modules=("q_proj", "lm_head"), warmup_steps=1, final_steps=1)
    trainer, _ = sft_trainer(tmp_path, config, num_train_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"lm_head is a language-model head.*SFTTrainer"):
        trainer.train()
