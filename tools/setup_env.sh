#!/usr/bin/env bash
# Create ./.venv and install the project with the tested pins. Used by the README and by .ci/run,
# so that what a newcomer runs and what CI checks cannot drift apart.
# Needs: python3 (>= 3.10) with venv, a C++ compiler (DeepSpeed builds a small CPU comm op on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v g++ >/dev/null 2>&1; then
  echo "setup_env: g++ missing, installing build-essential" >&2
  apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
rm -rf tokenbridge.egg-info  # a stale one in the checkout would shadow the fresh entry points (plugins) below
# torch/torchvision pins and the project must be in ONE pip command, or the resolver may pick a torchvision built for another torch.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
.venv/bin/python -m pip check
n_torch=$(.venv/bin/python -m pip list 2>/dev/null | grep -cE '^torch ')
[ "$n_torch" = 1 ] || { echo "setup_env: expected exactly one torch, found $n_torch" >&2; exit 1; }
echo "setup_env: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
