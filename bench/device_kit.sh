#!/usr/bin/env bash
# What travels with bench/cuda_check.py to the GPU machine (PyTorch there, no package index, no Ray):
#   .whl/      the pure-Python and cp312 wheels the loop needs and that machine lacks
#   .devdata/  Fashion-MNIST's idx files (31 MB)
# Both are ignored through .git/info/exclude and named in the device call's `carry`. Then, on the
# device (one call, about 5 minutes; see bench/RESULTS.md, "Prepared GPU check"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/cuda_check.py \
#     --data .devdata/fashion-mnist --out $OUT --work /tmp/cc --budget-s 400
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for d in /.whl/ /.devdata/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done

# the versions gelato's own environment pins (keep one version of each: two stop the install there)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7

src=/usr/share/datasets/fashion-mnist
[ -d "$src" ] || { echo "no $src: run .ci/ensure-fashion-mnist first (apt-get install dataset-fashion-mnist)" >&2; exit 1; }
mkdir -p .devdata/fashion-mnist
cp "$src"/*-ubyte.gz .devdata/fashion-mnist/
du -sh .whl .devdata
