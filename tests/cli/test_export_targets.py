"""``adalora export`` writes each format and layout to its own default place, and neither ``export`` nor ``merge``
replaces an earlier output without ``--overwrite``: one line, exit status 2, naming the flag, nothing touched. With
``--overwrite`` the new output replaces the old one whole (written aside, then swapped in)."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
from pathlib import Path

import pytest
from adapter_helpers import fake_training
from conftest import tiny_gpt2

import adalora.files.peft
from adalora import AdaLoRAConfig, inject, save_adapter
from adalora.cli import main

DEFAULTS = {  # (argv after RUN, default output inside RUN)
    "peft-compact": ((), "export-peft-compact"),
    "peft-uniform": (("--layout", "uniform"), "export-peft-uniform"),
    "gguf": (("--format", "gguf"), "export-lora.gguf"),
    "rank-pattern": (("--format", "rank-pattern"), "export-rank-pattern.json"),
}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory holding the adapter of a tiny GPT-2 whose base is saved beside it (for merge)."""
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    config = AdaLoRAConfig(target_modules=["c_attn", "c_fc"], init_r=4, target_r=2)
    model = inject(copy.deepcopy(base), config)
    fake_training(model, [1, 3, 2, 4])
    save_adapter(model, tmp_path / "run" / "adapter", config, metadata={"model": str(tmp_path / "base")})
    return tmp_path / "run"


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("adalora: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_each_format_and_layout_has_its_own_default_and_is_never_replaced_silently(run, capsys) -> None:
    for argv, name in DEFAULTS.values():
        assert main(["export", str(run), *argv]) == 0
        assert f"written to {run / name}" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("export-")) == sorted(
        name for _, name in DEFAULTS.values()
    )
    for argv, name in DEFAULTS.values():
        before = digest(run / name)
        assert main(["export", str(run), *argv]) == 2
        err = one_error_line(capsys)
        assert f"the default --out {run / name} already holds" in err and "add --overwrite to replace it" in err
        assert digest(run / name) == before


def test_overwrite_replaces_an_earlier_export_whole(run, capsys) -> None:
    assert main(["export", str(run)]) == 0
    out = run / "export-peft-compact"
    assert main(["export", str(run), "--overwrite", "--base-model-name", "org/other"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/other"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert main(["export", str(run), "--format", "gguf", "--out", str(run / "mine.gguf")]) == 0
    assert main(["export", str(run), "--format", "gguf", "--out", str(run / "mine.gguf")]) == 2
    assert "--out " + str(run / "mine.gguf") + " already holds a gguf adapter" in one_error_line(capsys)
    assert main(["export", str(run), "--format", "gguf", "--out", str(run / "mine.gguf"), "--overwrite"]) == 0


def test_a_failed_overwrite_leaves_the_earlier_export_as_it_was(run, capsys, monkeypatch) -> None:
    assert main(["export", str(run)]) == 0
    out = run / "export-peft-compact"
    before = digest(out)

    def full_disk(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adalora.files.peft, "save_file", full_disk)
    assert main(["export", str(run), "--overwrite"]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert digest(out) == before and not [p for p in run.iterdir() if p.name.startswith(".")]


def test_what_is_not_an_earlier_export_is_never_replaced_even_with_overwrite(run, tmp_path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine\n")
    assert main(["export", str(run), "--out", str(mine), "--overwrite"]) == 2
    assert "holds no adapter_config.json: refusing to replace it" in one_error_line(capsys)
    assert main(["export", str(run), "--format", "gguf", "--out", str(mine), "--overwrite"]) == 2
    assert "is a directory; a gguf adapter is one file" in one_error_line(capsys)
    assert (mine / "notes.md").read_text() == "mine\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run), "--out", str(empty)]) == 0  # an empty directory is a new place


def test_merge_asks_for_overwrite_before_replacing_a_merged_model(run, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    before = digest(out)
    assert main(["merge", str(run), "--out", str(out)]) == 2
    assert f"--out {out} already holds a merged model: add --overwrite" in one_error_line(capsys)
    assert digest(out) == before
    assert main(["merge", str(run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file()
