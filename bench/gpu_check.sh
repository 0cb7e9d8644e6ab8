#!/usr/bin/env bash
# The GPU check with the right python (bench/gpu_check.py; its options pass through): .venv-gpu/ (installed from
# the offline bundle), else .venv/ (`make install`), else, where gpu-bundle/ is here, install .venv-gpu/ from it
# first, and its built models into the models cache (python3, or $PYTHON, with the system's torch), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
for python in .venv-gpu/bin/python .venv/bin/python; do
  if [ -x "$python" ]; then
    exec "$python" bench/gpu_check.py "$@"
  fi
done
if [ -f gpu-bundle/requirements.txt ]; then
  exec "${PYTHON:-python3}" bench/gpu_check.py --install "$@"
fi
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
