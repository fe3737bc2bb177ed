"""What a run is called: ``<model>-<task>-<method>``, e.g. ``smollm2-causal-lm-adalora``.

The name is the run's default output directory (``runs/<name>``, when ``--output-dir`` is not given), the first
word of its description line, the title of its rank heatmap and what ``adalora inspect`` calls it. It is made from
the settings alone, before anything loads:

- the model: a short name for each packaged model (``minilm``, ``smollm2``), else the name of the ``--model``
  directory or ``.gguf`` file (without a GGUF quantization suffix such as ``.Q4_1``; a Hugging Face cache snapshot
  is named after its repository), lowercase, with every other character than letters, digits, ``.`` and ``_``
  turned into ``-``;
- the task: the built-in task, ``causal-lm``, or ``classification`` for the user's files (a data file's name, such
  as ``train``, says nothing about the task);
- the method.
"""

from __future__ import annotations

import re
from pathlib import Path

from .settings import CAUSAL_LM, RunSettings
from .tasks import kind_of

RUNS_DIR = Path("runs")  # where runs go without --output-dir, relative to the working directory
_GGUF_QUANTIZATION = re.compile(r"[.-](?:i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)  # ".Q4_1", "-Q4_K_M", "-f16"
_SNAPSHOT = re.compile(r"[0-9a-f]{40}")  # .../models--org--name/snapshots/<commit>


def slug(text: str) -> str:
    """``text`` lowercase, every run of characters other than letters, digits, ``.`` and ``_`` made one ``-``."""
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.")


def model_name(model: str | None, packaged: str) -> str:
    """A short name for ``--model`` (module docstring); ``packaged`` is the name of the model used without it."""
    if model is None:
        return packaged
    path = Path(model).expanduser()
    name = path.name
    if path.suffix.lower() == ".gguf":
        name = _GGUF_QUANTIZATION.sub("", path.stem)
    elif _SNAPSHOT.fullmatch(name) and path.parent.name == "snapshots":
        name = path.parent.parent.name.rpartition("--")[2]
    return slug(name) or "model"


def task_name(settings: RunSettings) -> str:
    """The task part of a run's name: ``causal-lm``, the built-in task, or ``classification`` for files."""
    if settings.task == CAUSAL_LM:
        return CAUSAL_LM
    return "classification" if settings.train_file is not None else settings.task


def run_name(settings: RunSettings) -> str:
    """``<model>-<task>-<method>`` (module docstring)."""
    model = model_name(settings.model, kind_of(settings.task).packaged_name)
    return f"{model}-{task_name(settings)}-{settings.method}"


def default_output_dir(settings: RunSettings) -> Path:
    """Where a run goes without ``--output-dir``: ``runs/<name>``."""
    return RUNS_DIR / run_name(settings)
