#!/usr/bin/env bash
# Install b3stream into a virtual environment (default: .venv in the repo root).
#
#   bash tools/install.sh          # the package, its runtime stack and KaMinPar (the recipe's partitioner)
#   bash tools/install.sh --test   # ... plus the test extras (pytest, pytest-xdist, pyarrow, psutil, datasets, kaminpar)
#   bash tools/install.sh --gpu    # ... with faiss-gpu instead of faiss-cpu (CUDA machines)
#   bash tools/install.sh --bench  # ... plus matplotlib for tools/bench_quality.py's plot
#
# torch is installed first and pinned, so that resolving the rest never swaps a CPU build for a
# multi-GB CUDA one. On a CPU-only box without a local CPU wheel, point pip at PyTorch's CPU index:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --gpu) extras+=(gpu) ;;
    --bench) extras+=(bench) ;;
    *) echo "usage: bash tools/install.sh [--test] [--gpu] [--bench]" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

torch_args=("torch==$TORCH_VERSION")
[ -n "${TORCH_INDEX_URL:-}" ] && torch_args+=(--index-url "$TORCH_INDEX_URL")
"$PY" -m pip install -q "${torch_args[@]}"
before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)

extras+=(kaminpar)  # the recipe's partitioner (configs/mine_code_recipe.yaml); small, MIT
spec=".[$(IFS=,; echo "${extras[*]}")]"
"$PY" -m pip install -q -e "$spec" "torch==$before"
if [[ " ${extras[*]-} " == *" gpu "* ]]; then
  # faiss-cpu and faiss-gpu both provide the `faiss` module; keep only the GPU build. Removing faiss-cpu
  # deletes files the two share, so the GPU package is reinstalled (its CUDA 12 runtime wheels came with the
  # extra). Without a GPU FAISS build, mining still ranks on the GPU (rank.py's torch index).
  "$PY" -m pip uninstall -q -y faiss-cpu || true
  "$PY" -m pip install -q --force-reinstall --no-deps "faiss-gpu>=1.15"
fi

after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$before" != "$after" ]; then
  echo "install.sh: torch changed from $before to $after while installing dependencies" >&2
  exit 1
fi
echo "b3stream installed in $VENV (torch $after)"
