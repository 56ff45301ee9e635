#!/usr/bin/env bash
# Fetch, into bench/wheels/ (git-ignored through .git/info/exclude), the wheels that the
# device machine lacks for bench/gpu.sh: our diffusers and transformers, and fmn's own
# imports that its image does not hold (pydantic, its core for CPython 3.12, ...).
# About 23 MB, under the device tool's 64 MiB carry limit. Run here, once, with network
# access to the package index; then carry bench/wheels (see bench/gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p bench/wheels
grep -qxF '/bench/wheels/' .git/info/exclude 2>/dev/null || echo '/bench/wheels/' >> .git/info/exclude
pkgs=()
for p in diffusers transformers pydantic pydantic_core annotated-types typing-inspection \
    importlib_metadata regex typing_extensions; do
    pkgs+=("$p==$(ver "$p")")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d bench/wheels "${pkgs[@]}"
du -sh bench/wheels
