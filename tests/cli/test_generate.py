"""``adalora generate`` on a tiny Llama trained by ``adalora train --task causal-lm``: the prompt through the chat
template, greedy decoding that matches a hand-written argmax loop, the same text with the adapter merged, and one-line
errors for what cannot generate (a classification run, a missing, unfinished or failed run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adalora import load_adapter
from adalora.cli import main
from adalora.run.generate import load_run_model, prompt_ids

WORDS = ["<unk>", "<pad>", "</s>", "Q:", "A:", "the", "cat", "dog", "sat", "ran", "on", "mat", "yes", "no", "a", "to"]
# A chat template in the words of the vocabulary: a user turn is "Q: ...", the assistant's "A: ...".
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}{% else %} A: {{ m['content'] }} </s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
)


def word_tokenizer(chat_template: str | None = TEMPLATE):
    """A whitespace word-level tokenizer over WORDS (ids = positions), EOS ``</s>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def write_tiny_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    word_tokenizer().save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=None, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: 60 questions whose answer follows from the animal (54 train, 6 held out), 4 epochs of 18
    steps, the output layer trained fully beside the adapters (so that the tiny model learns the answers)."""
    root = tmp_path_factory.mktemp("generate")
    model = write_tiny_llama(root / "tiny-llama")
    rows = [{"prompt": f"Q: the {a} sat", "completion": f" A: {y}"} for a, y in [("cat", "yes"), ("dog", "no")] * 30]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--task", "causal-lm", "--model", str(model), "--train", str(root / "qa.jsonl")]
    args += ["--output-dir", str(root / "run"), "--max-length", "8", "--batch-size", "3", "--epochs", "4"]
    args += ["--init-r", "4", "--target-r", "2", "--mask-interval", "1", "--lr", "2e-2", "--threads", "1"]
    args += ["--modules-to-save", "lm_head"]
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def completion(capsys, *argv: str) -> str:
    """What ``adalora generate`` prints; it prints nothing else (stderr)."""
    capsys.readouterr()
    assert main(["generate", *argv]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_the_prompt_is_one_user_turn_of_the_chat_template_unless_told_otherwise() -> None:
    tokenizer = word_tokenizer()
    assert prompt_ids(tokenizer, "the cat sat").tolist() == [ids("Q: the cat sat A:")]
    assert prompt_ids(tokenizer, "Q: the cat sat", chat_template=False).tolist() == [ids("Q: the cat sat")]
    plain = word_tokenizer(chat_template=None)  # no template: the prompt as it is
    assert prompt_ids(plain, "Q: the dog sat").tolist() == [ids("Q: the dog sat")]


def greedy_by_hand(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Argmax of the last position's logits, appended, ``steps`` times or until EOS (id 2)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            if token == WORDS.index("</s>"):
                break
            tokens.append(token)
    return tokens[len(prompt) :]


@pytest.mark.parametrize("animal", ["cat", "dog"])
def test_greedy_completions_match_a_hand_loop_and_the_merged_model(trained, capsys, animal: str) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(trained.parent / "tiny-llama").eval()
    adapted = load_adapter(base, trained / "adapter").eval()
    expected = " ".join(WORDS[t] for t in greedy_by_hand(adapted, ids(f"Q: the {animal} sat A:"), 6))
    assert expected == {"cat": "yes", "dog": "no"}[animal]  # the run learned the answers
    with_adapter = completion(capsys, str(trained), "--prompt", f"the {animal} sat", "--max-new-tokens", "6")
    merged = completion(capsys, str(trained), "--prompt", f"the {animal} sat", "--max-new-tokens", "6", "--merged")
    plain = completion(
        capsys, str(trained), "--prompt", f"Q: the {animal} sat A:", "--max-new-tokens", "6", "--no-chat-template"
    )
    assert with_adapter == merged == plain == expected + "\n"


def test_merged_and_adapter_models_compute_the_same_logits(trained) -> None:
    adapter, merged = load_run_model(trained), load_run_model(trained, merged=True)
    x = torch.tensor([ids("Q: the cat sat A:")])
    with torch.no_grad():
        torch.testing.assert_close(merged.module(x).logits, adapter.module(x).logits, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded(trained, capsys) -> None:
    argv = [str(trained), "--prompt", "the cat", "--temperature", "5", "--max-new-tokens", "8"]
    assert completion(capsys, *argv, "--seed", "3") == completion(capsys, *argv, "--seed", "3")


@pytest.fixture
def broken(trained, tmp_path) -> dict[str, Path]:
    """Copies of the run that cannot generate: a classification run, an unfinished one, a failed one."""
    runs = {name: tmp_path / name for name in ("classification", "unfinished", "failed")}
    for path in runs.values():
        shutil.copytree(trained, path)
    (runs["unfinished"] / "metrics.json").unlink()
    for name, change in (("classification", {"task": "rotten-tomatoes"}), ("failed", None)):
        run = json.loads((runs[name] / "run.json").read_text())
        if change:
            run["settings"] |= change
        else:
            run["failure"] = {"message": "the loss became NaN at step 3"}
        (runs[name] / "run.json").write_text(json.dumps(run))
    return runs


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("classification", (), "a classification run (--task rotten-tomatoes) predicts labels, not text"),
        ("unfinished", (), "the run has not finished (no metrics.json); finish it with adalora train --resume"),
        ("failed", (), "the run failed (the loss became NaN at step 3)"),
        ("missing", (), "no such directory"),
        ("unfinished", ("--max-new-tokens", "0"), "--max-new-tokens must be at least 1, got 0"),
        ("unfinished", ("--temperature", "-1"), "--temperature must be 0 (greedy) or a finite number above it"),
        ("unfinished", ("--temperature", "inf"), "--temperature must be 0 (greedy) or a finite number above it"),
    ],
)
def test_what_cannot_generate_is_one_line(broken, tmp_path, capsys, target: str, extra: tuple, message: str) -> None:
    path = broken.get(target, tmp_path / target)
    assert main(["generate", str(path), "--prompt", "the cat", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adalora: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
