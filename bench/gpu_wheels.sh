#!/usr/bin/env bash
# The wheels bench/gpu.py needs on a GPU machine that has torch, transformers, pyarrow and accelerate but no trl or
# datasets, and no network: the versions of this checkout's environment, pure-Python, into .whl/ (git-ignored
# through .git/info/exclude). Never transformers: a newer one needs a huggingface_hub that does not install there,
# and the device's own (5.17) serves TRL 1.16. The device's image runs Python 3.12 and holds the rest of their needs (pyarrow,
# pandas, xxhash, fsspec, huggingface-hub, tokenizers, accelerate: /work/.library/device/KINDS.md); a machine without
# them needs their wheels too. See bench/README.md, "gpu.py", for the command that installs and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "trl==$(version trl)" "datasets==$(version datasets)" "dill==$(version dill)" \
  "multiprocess==$(version multiprocess)"
du -sh .whl
