#!/usr/bin/env bash
# The GPU check in one command: set up the project (nothing else) and print the GPU table.
# On a machine with torch already installed and no registry, put zarr, numcodecs, fire and
# google-crc32c on PYTHONPATH instead and run: python3 -m benchmarks.gpu
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if python3 -c 'import torch, zarr, numcodecs, fire, tqdm, blockcap' 2>/dev/null; then
  exec python3 -m benchmarks.gpu "$@"
fi
.ci/poetry install --with dev
exec .ci/poetry run python -m benchmarks.gpu "$@"
