#!/usr/bin/env bash
# The GPU check in one command: set up the project if needed, read a CUDA capture back against a
# CPU one, then print the throughput table (blockcap vs bare, like for like). Prints the GPU name.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if python3 -c 'import torch, zarr, numcodecs, fire, tqdm, blockcap' 2>/dev/null; then
  py=(python3)
else
  .ci/poetry install --with dev --all-extras
  py=(.ci/poetry run python)
fi
"${py[@]}" -m pytest -q -p no:cacheprovider benchmarks/test_gpu.py -m cuda
exec "${py[@]}" -m benchmarks.gpu "$@"
