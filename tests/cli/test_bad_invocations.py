"""Every way to call ``adalora`` wrongly that we know of: exit status 2, one line on stderr, no traceback, and
every file the command could reach exactly as it was (names and SHA-256 of everything under the test's world,
compared before and after). The list of cases is docs/cli.md's table of errors.

Read-only locations are real read-only mounts (a tmpfs, and read-only bind mounts of a run); they need root
and are skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model

from adalora.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # {world}, {model}, {data}, {run}, ... are filled in from World
    message: str  # a phrase the one line must contain
    needs: str = ""  # "root": read-only mounts; "no-tensorboard": the package hidden


def train(*extra: str) -> tuple[str, ...]:
    """``adalora train`` on the tiny model and files into {world}/new (a directory that does not exist)."""
    return tuple(tiny_train_args(Path("{model}"), Path("{data}"), Path("{world}/new"), *extra))


CASES = [
    # numbers: parsed (negative ones too), checked against their range, refused naming the flag
    Case("lr-negative", train("--lr", "-1e-3"), "argument --lr: expected a number > 0, got '-1e-3'"),
    Case("lr-negative-equals", train("--lr=-0.001"), "argument --lr: expected a number > 0"),
    Case("lr-zero", train("--lr", "0"), "argument --lr: expected a number > 0"),
    Case("lr-nan", train("--lr", "nan"), "argument --lr: expected a number > 0"),
    Case("lr-word", train("--lr", "fast"), "argument --lr: expected a number > 0, got 'fast'"),
    Case("epochs-zero", train("--epochs", "0"), "argument --epochs: expected an integer >= 1"),
    Case("epochs-fraction", train("--epochs", "1.5"), "argument --epochs: expected an integer >= 1"),
    Case("batch-size-negative", train("--batch-size", "-4"), "argument --batch-size: expected an integer >= 1"),
    Case("grad-accum-zero", train("--grad-accum", "0"), "argument --grad-accum: expected an integer >= 1"),
    Case("dropout-one", train("--dropout", "1"), "argument --dropout: expected a number in [0, 1)"),
    Case("beta1-above-one", train("--beta1", "1.5"), "argument --beta1: expected a number strictly between 0 and 1"),
    Case("warmup-fraction-negative", train("--warmup-fraction", "-0.1"), "argument --warmup-fraction: expected"),
    Case("final-steps-negative", train("--final-steps", "-1"), "argument --final-steps: expected an integer >= 0"),
    Case("max-train-negative", train("--max-train", "-5"), "argument --max-train: expected an integer >= 1 or 'all'"),
    Case("threads-zero", train("--threads", "0"), "argument --threads: expected an integer >= 1"),
    Case("seed-negative", train("--seed", "-1"), "argument --seed: expected an integer >= 0"),
    Case("init-r-zero", train("--init-r", "0"), "argument --init-r: expected an integer >= 1"),
    # other argparse mistakes: one line and where to read more
    Case("method-unknown", train("--method", "qlora"), "argument --method: invalid choice: 'qlora'"),
    Case("importance-unknown", train("--importance", "fisher"), "argument --importance: invalid choice"),
    Case("flag-unknown", train("--learning-rate", "1e-3"), "unrecognized arguments: --learning-rate"),
    Case("value-missing", ("train", "--init-r"), "argument --init-r: expected one argument"),
    Case("no-command", (), "the following arguments are required: COMMAND"),
    Case("command-unknown", ("fine-tune",), "invalid choice: 'fine-tune'"),
    Case("merge-without-out", ("merge", "{run}"), "the following arguments are required: --out"),
    Case("export-format-unknown", ("export", "{run}", "--format", "onnx"), "argument --format: invalid choice"),
    # output directories: new, empty, or a run of ours; nothing written before every check has passed
    Case("output-dir-is-a-file", train("--output-dir", "{world}/notes.txt"), "is a file"),
    Case("output-dir-foreign", train("--output-dir", "{foreign}"), "holds files that are not an adalora run"),
    Case("output-dir-foreign-overwrite", train("--output-dir", "{foreign}", "--overwrite"), "not an adalora run"),
    Case("output-dir-holds-a-run", train("--output-dir", "{run}"), "already holds a run"),
    Case("resume-foreign", ("train", "--resume", "{foreign}"), "is not an adalora run directory"),
    Case("resume-missing", ("train", "--resume", "{world}/nothing"), "no such directory"),
    Case("resume-complete", ("train", "--resume", "{run}"), "already complete"),
    Case("resume-with-settings", ("train", "--resume", "{incomplete}", "--epochs", "3"), "drop --epochs"),
    Case("device-unknown", train("--device", "tpu"), "argument --device: expected auto, cpu, cuda, cuda:N or mps"),
    Case("device-missing", train("--device", "cuda:99"), "--device cuda:99: this machine has"),
    Case("precision-unknown", train("--precision", "int8"), "argument --precision: invalid choice: 'int8'"),
    Case("target-r-above-init-r", train("--target-r", "8"), "--target-r: the final rank must be smaller than --init-r"),
    Case("compact-at-final", train("--compact-at-final"), "--compact-at-final: adalora train cannot resume"),
    Case("tensorboard-missing", train("--tensorboard"), "pip install tensorboard", needs="no-tensorboard"),
    # data and model
    Case("train-without-eval", ("train", "--train", "{data}/train.csv"), "give both --train and --eval"),
    Case("data-missing", train("--train", "{world}/missing.csv"), "no such data file"),
    Case("data-ragged", train("--train", "{world}/ragged.csv"), "line 3: expected 2 fields as in the header, got 3"),
    Case("data-not-utf8", train("--train", "{world}/latin1.csv"), "line 2: not UTF-8"),
    Case("data-column", train("--text-column", "review"), "no column 'review' (--text-column)"),
    Case("model-missing", train("--model", "{world}/no-model"), "not a local Hugging Face model directory"),
    Case("batch-larger-than-data", train("--batch-size", "500"), "larger than the 48 training rows"),
    # inspect / plot / merge / export on what is not a run of ours
    Case("inspect-foreign", ("inspect", "{foreign}"), "is not an adalora run directory"),
    Case("inspect-missing", ("inspect", "{world}/nothing"), "no such directory"),
    Case("inspect-file", ("inspect", "{world}/notes.txt"), "a file, not an adalora run directory"),
    Case("inspect-damaged", ("inspect", "{damaged}"), "run.json cannot be read"),
    Case("plot-foreign", ("plot", "{foreign}"), "is not an adalora run directory"),
    Case("merge-foreign", ("merge", "{foreign}", "--out", "{world}/merged"), "no AdaLoRA adapter"),
    Case("merge-out-foreign", ("merge", "{run}", "--out", "{foreign}"), "refusing to replace it"),
    Case("export-foreign", ("export", "{foreign}"), "no AdaLoRA adapter"),
    Case("export-out-file", ("export", "{run}", "--out", "{world}/notes.txt"), "is a file"),
    Case("generate-classification", ("generate", "{run}", "--prompt", "hi"), "a classification run"),
    Case("generate-foreign", ("generate", "{foreign}", "--prompt", "hi"), "is not an adalora run directory"),
    Case("generate-without-prompt", ("generate", "{run}"), "the following arguments are required: --prompt"),
    # read-only locations (real read-only mounts)
    Case("output-dir-read-only-fs", train("--output-dir", "{ro}/run"), "read-only file system", needs="root"),
    Case("output-dir-read-only-empty", train("--output-dir", "{ro}"), "read-only file system", needs="root"),
    Case("overwrite-read-only-run", train("--output-dir", "{ro_run}", "--overwrite"), "read-only", needs="root"),
    Case("resume-read-only", ("train", "--resume", "{ro_incomplete}"), "read-only file system", needs="root"),
    Case("plot-read-only", ("plot", "{ro_run}"), "read-only file system", needs="root"),
    Case("export-read-only", ("export", "{ro_run}"), "read-only file system", needs="root"),
    Case("merge-out-read-only", ("merge", "{run}", "--out", "{ro}/merged"), "read-only file system", needs="root"),
]


@dataclass
class World:
    root: Path
    mounts: list[Path]
    mount_error: str | None

    def paths(self) -> dict[str, str]:
        names = ("model", "data", "run", "incomplete", "foreign", "damaged", "ro", "ro_run", "ro_incomplete")
        return {"world": str(self.root), **{name: str(self.root / name) for name in names}}


def _mount(args: list[str]) -> str | None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr.strip() or f"mount exited {result.returncode}")


def _read_only_mounts(root: Path) -> tuple[list[Path], str | None]:
    """A read-only tmpfs at root/ro and read-only bind mounts of the finished and the incomplete run."""
    if os.geteuid() != 0:
        return [], "read-only mounts need root (run the tests as root to cover these cases)"
    if shutil.which("mount") is None:
        return [], "no mount command"
    done: list[Path] = []
    for target, args in (
        ("ro", ["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"]),
        ("ro_run", ["--bind", str(root / "run")]),
        ("ro_incomplete", ["--bind", str(root / "incomplete")]),
    ):
        (root / target).mkdir()
        error = _mount([*args, str(root / target)])
        if error is None and target != "ro":
            error = _mount(["-o", "remount,bind,ro", str(root / target)])
            done.append(root / target)
        elif error is None:
            done.append(root / target)
        if error is not None:
            return done, f"mount refused ({error})"
    return done, None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("world")
    model, data = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    threads = __import__("torch").get_num_threads()
    assert main(tiny_train_args(model, data, root / "run", "--method", "lora", "--epochs", "1")) == 0
    __import__("torch").set_num_threads(threads)
    shutil.copytree(root / "run", root / "incomplete")
    (root / "incomplete" / "metrics.json").unlink()
    shutil.copytree(root / "run", root / "damaged")
    (root / "damaged" / "run.json").write_text("{not json")
    foreign = root / "foreign"  # a user's directory with names a run also writes
    (foreign / "adapter").mkdir(parents=True)
    (foreign / "metrics.json").write_text('{"mine": true}\n')
    (foreign / "rank_pattern.json").write_text("[1, 2, 3]\n")
    (foreign / "adapter" / "weights.bin").write_bytes(b"\x00\x01")
    (root / "notes.txt").write_text("a file\n")
    (root / "ragged.csv").write_text("text,label\ngood film,1\nbad, awful film,0\n")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9 film,1\n".encode("latin-1"))
    mounts, error = _read_only_mounts(root)
    yield World(root, mounts, error)
    for mount in reversed(mounts):
        subprocess.run(["umount", str(mount)], check=False)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: "dir", or the SHA-256 of the file."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_invocation(case: Case, world: World, capsys, monkeypatch) -> None:
    if case.needs == "root" and world.mount_error:
        pytest.skip(world.mount_error)
    if case.needs == "no-tensorboard":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    argv = [arg.format(**world.paths()) for arg in case.argv]
    before = snapshot(world.root)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line
    assert err.startswith(("adalora: error: ", "adalora train: error: ", "adalora merge: error: ")) or (
        ": error: " in err
    ), err
    assert "Traceback" not in err
    assert case.message in err, err
    assert snapshot(world.root) == before


def test_there_are_at_least_30_cases_over_every_subcommand() -> None:
    assert len(CASES) >= 30
    commands = {case.argv[0] for case in CASES if case.argv}
    assert {"train", "inspect", "plot", "merge", "export", "generate"} <= commands


def test_one_line_without_traceback_from_the_console_script(world: World) -> None:
    """The same promise end to end, in a new process: ``python -m adalora`` prints one line and exits 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for argv in (["train", "--lr", "-1e-3"], ["inspect", str(world.root / "foreign")]):
        result = subprocess.run([sys.executable, "-m", "adalora", *argv], capture_output=True, text=True, env=env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
