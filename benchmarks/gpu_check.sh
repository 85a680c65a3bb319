#!/usr/bin/env bash
# Device check (issue 18): GPU tests, a sync-free CUDA training step, BERT-base MFU at L=128/512,
# an MAE ViT-B step and attention time/memory per backend, written to results.md (or $1).
#
# Installs nothing. Needs the project's environment as `.ci/setup` makes it (torch 2.9.1 CUDA
# build, xformers 0.0.33, transformers, pytest): $PYTHON, else .venv/bin/python, else python3.
# Budget: 330 s of sections (under 6 minutes with start-up on one H100/H200). Without CUDA it
# skips every section, says so in the report and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results.md}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
exec "$py" -m benchmarks.gpu_check --out "$out" --budget-s "${GPU_CHECK_BUDGET_S:-330}"
