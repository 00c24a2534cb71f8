#!/usr/bin/env bash
# The GPU check (issue 17): one prepared run, at most 6 minutes, on a lent GPU machine.
#
# The machine brings torch, transformers, safetensors, numpy, pandas and pyarrow (FACTS.md); the
# library also needs pydantic, fsspec, pyyaml and numba. Missing ones are installed from WHEELS
# (wheels carried with the tree; fill it here with `bash benchmarks/gpu_check.sh --fetch-wheels`,
# which downloads them for the machine's Python, default 3.11). Prefect and lm-eval are not
# needed: the check calls the library, which never imports them.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --fetch-wheels  # here, before carrying shared/wheels
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-shared/wheels}
PY=${PYTHON:-python3}
NEEDED="pydantic fsspec yaml numba"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  "${PIP:-.venv/bin/pip}" download --quiet --only-binary=:all: --python-version "${PYVER:-3.11}" \
    -c requirements/constraints.txt -d "$WHEELS" pydantic fsspec pyyaml numba
  du -sh "$WHEELS"
  exit 0
fi

missing=""
for m in $NEEDED; do "$PY" -c "import $m" 2>/dev/null || missing="$missing $m"; done
if [ -n "$missing" ]; then
  pkgs=$(echo "$missing" | sed 's/\byaml\b/pyyaml/')
  echo "installing from $WHEELS:$pkgs"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $pkgs
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. timeout 360 "$PY" benchmarks/gpu_check.py --device cuda --size qwen2-0.5b "$@"
