#!/usr/bin/env bash
# Idempotent environment set-up for `make test`, `make bench` and `make gpu-check`:
#   1. choose the interpreter: an existing .venv; else a python3 that already imports torch (the GPU machine's,
#      used as it is, no network needed); else a new .venv with requirements-dev.txt (torch==2.13.0, CPU);
#   2. build and install dlcore in editable mode (pip --no-build-isolation) when its C++/CUDA sources changed;
#   3. write the interpreter's path to .dlcore-python for the Makefile.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1

pip_quiet() {  # pip, minus this machine's warnings about local index folders that do not exist
  "$PY" -m pip "$@" 2>&1 | { grep -v "WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

if [ -x .venv/bin/python ]; then
  PY="$PWD/.venv/bin/python"
elif python3 -c "import torch" 2>/dev/null; then
  PY="$(command -v python3)"
  echo "setup: using the existing torch of $PY ($(python3 -c 'import torch; print(torch.__version__)'))"
else
  echo "setup: creating .venv (no importable torch found)"
  python3 -m venv .venv
  PY="$PWD/.venv/bin/python"
fi

if [ "$PY" = "$PWD/.venv/bin/python" ]; then
  stamp=".venv/.deps-$(sha1sum requirements-dev.txt | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    echo "setup: installing requirements-dev.txt into .venv"
    pip_quiet install -q --upgrade pip "setuptools>=70.1" wheel
    pip_quiet install -q -r requirements-dev.txt
    touch "$stamp"
  fi
else
  missing=$("$PY" - <<'PYEOF'
import importlib
need = ["torch", "pybind11", "pytest", "setuptools", "numpy"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)
  if [ -n "$missing" ]; then
    echo "setup: $PY lacks: $missing; trying pip" >&2
    pip_quiet install -q $missing
  fi
fi

# Rebuild only when what the extensions are built from changed (or the build is missing / for another Python).
src_hash=$( (cat setup.py; find csrc -type f | sort | xargs cat; "$PY" -c 'import sys; print(sys.version)'; \
             echo "${DLCORE_BUILD_CUDA:-}${DLCORE_CUDA_ARCHS:-}${DLCORE_NATIVE:-}") | sha1sum | cut -c1-16)
stamp_file=build/.dlcore-build-stamp
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$src_hash" ] || ! "$PY" -c "import dlcore._C_cpu" 2>/dev/null; then
  echo "setup: building dlcore (CPU extension; CUDA extension when nvcc is found)"
  mkdir -p build
  if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > build/pip-install.log 2>&1; then
    grep -v "WARNING: Location" build/pip-install.log | tail -40 >&2
    echo "setup: building dlcore failed (full log: build/pip-install.log)" >&2
    exit 1
  fi
  mkdir -p build && echo "$src_hash" > "$stamp_file"
fi
echo "$PY" > .dlcore-python
