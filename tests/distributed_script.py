"""Run under ``torchrun`` by tests/parallel/test_distributed.py (and in-process there, for the single-process
reference).

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_script.py OUT MODEL DATA``
runs, in the same processes, ``adalora train`` (the CLI's ``main``) and an :class:`AdaLoRATrainer` run, with
the outputs under ``OUT/cli`` and ``OUT/trainer``; neither knows it runs in several processes. Between the two,
``adalora train`` into ``OUT/held``, whose lock rank 0 holds, must be refused on every process.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

TRAINER_CONFIG = {
    "target_modules": ["query", "value"],
    "init_r": 4,
    "target_r": 2,
    "warmup_steps": 2,
    "final_steps": 3,
    "mask_interval": 1,
    "total_steps": None,
    "modules_to_save": ["classifier"],
}
GLOBAL_BATCH = 4


def cli_args(model: Path, data: Path, output_dir: Path) -> list[str]:
    from cli_helpers import tiny_train_args

    return tiny_train_args(model, data, output_dir, "--save-every", "5")


def trainer_data(seed: int = 0) -> tuple[list[dict], torch.nn.Module]:
    """48 random examples and a tiny BERT classifier without dropout, with adapters (``torch.manual_seed(seed)``)."""
    from transformers import BertConfig, BertForSequenceClassification

    from adalora import AdaLoRAConfig, inject

    generator = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": torch.randint(0, 100, (8,), generator=generator), "labels": i % 2} for i in range(48)]
    torch.manual_seed(seed)
    bert = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,  # dropout masks differ between a batch and its halves
        attention_probs_dropout_prob=0.0,
    )
    return dataset, inject(BertForSequenceClassification(bert), AdaLoRAConfig(**TRAINER_CONFIG))


def trainer_arguments(output_dir: Path, world: int, **changes: object):
    """12 optimizer steps of 2 accumulated micro-batches, the same global batch for any number of processes,
    checkpoints at 6 and 12; ``changes`` to any ``TrainingArguments`` field."""
    from transformers import TrainingArguments

    settings = {
        "output_dir": str(output_dir),
        "max_steps": 12,
        "per_device_train_batch_size": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "save_strategy": "steps",
        "save_steps": 6,
        # transformers multiplies the loss by the number of processes when the model takes loss kwargs, which
        # BERT's classification loss then ignores: gradients twice too large with 2 processes. Not adalora's.
        "average_tokens_across_devices": False,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 1000,
        "seed": 0,
    }
    return TrainingArguments(**{**settings, **changes})


def run_trainer(output_dir: Path, world: int) -> dict:
    """12 optimizer steps of AdaLoRATrainer (2 accumulated micro-batches each, checkpoints at 6 and 12)."""
    from adalora import AdaLoRAConfig
    from adalora.integrations.trainer import AdaLoRATrainer

    config = AdaLoRAConfig(**TRAINER_CONFIG)
    dataset, model = trainer_data()
    args = trainer_arguments(output_dir, world)
    trainer = AdaLoRATrainer(model=model, args=args, train_dataset=dataset, adalora_config=config)
    trainer.train()
    adapter_keys = (".P", ".E", ".Q", ".rank_mask")
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(adapter_keys)}
    return {"ranks": trainer.adalora.allocator.rank_pattern(), "state": state}


def main(out: Path, model: Path, data: Path) -> None:
    from adalora.cli import main as cli
    from adalora.parallel import get_world_size, init_from_env, is_main_process
    from adalora.run.lock import locked

    init_from_env("gloo")
    assert cli(cli_args(model, data, out / "cli")) == 0
    # Rank 0 alone locks the output directory: into one another process holds, every rank is refused (none hangs).
    held = contextlib.ExitStack()
    if is_main_process():
        held.enter_context(locked(out / "held", "train", exclusive=True, fix="", create=True))
    with held:
        assert cli(cli_args(model, data, out / "held")) == 2
    result = run_trainer(out / "trainer", get_world_size())
    if is_main_process():
        torch.save(result, out / "trainer.pt")
        (out / "world.json").write_text(json.dumps(get_world_size()))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers
    main(*(Path(arg) for arg in sys.argv[1:4]))
